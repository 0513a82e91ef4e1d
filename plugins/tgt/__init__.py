"""The ``tgt`` target backend (entry point ``plugins.tgt:TgtBackend``); see docs/backend-tgt.md.

Parts: ``tgtadm`` (runner, pure parsers), ``record`` (the intent and its file), ``converge`` (pure op
lists), ``tgtd`` (the daemon: start, watch, kill), ``backend`` (``TgtBackend``).
"""
from plugins.tgt.backend import TgtBackend

__all__ = ["TgtBackend"]
