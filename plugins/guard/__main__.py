"""``python -m plugins.guard --config FILE --state-dir DIR --hash H``: the guard process (see
``plugins.guard.server``). ``GuardWatchdog`` starts it; it is not meant to be started by hand."""
from __future__ import annotations

import argparse
import sys

from plugins.guard.server import main


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m plugins.guard", description=__doc__)
    p.add_argument("--config", default="", help="the config file the agent runs with")
    p.add_argument("--state-dir", required=True, help="the agent's state directory")
    p.add_argument("--hash", required=True, help="hash of the config file's bytes, as the agent read them")
    a = p.parse_args(argv)
    return main(a.config, a.state_dir, a.hash)


if __name__ == "__main__":
    sys.exit(cli())
