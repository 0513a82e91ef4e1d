"""The ``pathagent`` command line (``main`` in ``agent.cli.main``), and ``version()``."""
from __future__ import annotations

import configparser
import os
from typing import Sequence

DISTRIBUTION = "iscsi-path-agent"


def version() -> str:
    """The installed distribution's version (``importlib.metadata``); when it is not installed (run from a
    source tree), ``[metadata] version`` of the ``setup.cfg`` beside the package; ``unknown`` if neither."""
    from importlib import metadata
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    cfg = configparser.ConfigParser()
    try:
        cfg.read(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "setup.cfg"),
                 encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return "unknown"
    return cfg.get("metadata", "version", fallback="unknown")


def main(argv: Sequence[str] | None = None) -> int:
    from agent.cli.main import main as run
    return run(argv)
