"""Named steps of the disk commands where a test can kill the command, to prove that running the same
command again finishes the job.

``reached("create:image")`` does nothing unless the environment variable ``PATHAGENT_FAILPOINT`` names that
step; then the process sends itself ``SIGKILL`` right there, as an admin's Ctrl-C, an OOM kill or a lost SSH
session would, without any cleanup running. The steps are listed in docs/disks.md ("Interrupted
commands"). Never set in production; harmless if it is.
"""
from __future__ import annotations

import os
import signal

ENV = "PATHAGENT_FAILPOINT"


def reached(step: str) -> None:
    if os.environ.get(ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
