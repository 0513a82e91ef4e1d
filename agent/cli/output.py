"""CLI output helpers shared by every command: text or ``--json``, errors on stderr, exit codes."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print ``data`` as JSON when ``--json`` was given, else ``text`` (if any)."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    elif text:
        print(text)


def fail(msg: str, code: int = EXIT_FAILED) -> int:
    """Report an error on stderr and return the exit code to use."""
    print(f"pathagent: {msg}", file=sys.stderr)
    return code
