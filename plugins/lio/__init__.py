"""The ``lio`` target backend (entry point ``plugins.lio:LioBackend``); see docs/backend-lio.md.

Parts: ``rts`` (the only module importing rtslib-fb: LIO configuration, errors translated), ``configfs``
(direct reads and the fence writes, no rtslib), ``krbd`` (kernel RBD mappings through sysfs, pure
parsers), ``record`` (what is ours), ``backend`` (``LioBackend``).
"""
from plugins.lio.backend import LioBackend

__all__ = ["LioBackend"]
