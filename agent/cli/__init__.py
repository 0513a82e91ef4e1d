"""The ``pathagent`` command line (``main`` in ``agent.cli.main``)."""
from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from agent.cli.main import main as run
    return run(argv)
