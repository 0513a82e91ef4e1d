"""CLI output helpers shared by every command: text or ``--json``, errors on stderr, exit codes, the path
table (``paths``, ``paths --watch`` and the demo draw it with ``paths_table``) and ``Live``, a block of
text redrawn in place."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from typing import Any, Mapping, Sequence, TextIO

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


PATH_COLUMNS = ("PATH", "NAME", "IP", "NODE", "STATE")


def paths_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of ``pathagent paths`` (keys ``disk``, ``index``, ``name``, ``ip``, ``node``, ``state``,
    optional ``error``) as a table under the header ``PATH NAME IP NODE STATE``; every column as wide as
    its longest value, so long node names (FQDNs) keep it aligned; a missing value is ``-``."""
    cells = [(f"{r['disk']}/{r['index']}", r.get("name") or "-", r.get("ip") or "-", r.get("node") or "-",
              str(r.get("state") or "-") + (f" ({r['error']})" if r.get("error") else "")) for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(PATH_COLUMNS[:-1])]
    widths = [max(w, m) for w, m in zip(widths, (24, 16, 16, 16))]

    def line(c: Sequence[str]) -> str:
        return " ".join(f"{v:<{w}}" for v, w in zip(c, widths)) + " " + c[-1]
    return "\n".join([line(PATH_COLUMNS)] + [line(c) for c in cells])


class Live:
    """A block of text shown again and again, each time in place of the last.

    On a terminal the cursor goes back up over the previous block and every line is redrawn and cleared
    to its end (what was printed above the block stays); each line is cut to the terminal's width and the
    block to its height (a wrapped or scrolled-away line could not be drawn over). On anything else (a
    pipe, a file) each block is printed after the previous one, followed by an empty line."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self._height = 0            # lines of the block on the screen now

    def show(self, text: str) -> None:
        lines = text.split("\n")
        if not self.tty:
            self.stream.write(text + "\n\n")
            self.stream.flush()
            return
        size = shutil.get_terminal_size()
        width, rows = max(size.columns, 20), max(size.lines - 1, 3)
        if len(lines) > rows:
            lines = lines[:rows - 1] + [f"... {len(lines) - rows + 1} more lines (the terminal is too small)"]
        up = f"\x1b[{self._height}F" if self._height else "\r"
        self.stream.write(up + "".join(ln[:width - 1] + "\x1b[K\n" for ln in lines) + "\x1b[J")
        self.stream.flush()
        self._height = len(lines)
