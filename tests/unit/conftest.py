"""Tier-1 fixtures shared by the modules that run agents on the in-memory store: a fake clock and a
``MemoryStore`` on it (``tests/unit/memstore.py``)."""
from __future__ import annotations

import pytest

from memstore import FakeClock, MemoryStore


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(clock)
