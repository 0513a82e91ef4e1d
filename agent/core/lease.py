"""Self-fencing lease. Pure: the clock is passed in.

A successful consistent read of our session *sent* at time t proves that no other node can lock our
paths before ``t + lock_delay`` (+ failure detection). So we may keep serving until ``t + fence_after``;
after that, unless a new confirmation succeeded, we must stop serving on our own (see docs/fencing.md for
the inequality that makes this safe).
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Lease:
    fence_after: float
    confirmed_at: float | None = None   # send time (monotonic) of the newest successful confirmation

    def confirm(self, sent_at: float) -> "Lease":
        """A confirmation sent at ``sent_at`` succeeded. Out-of-order answers never move it backwards."""
        if self.confirmed_at is not None and sent_at <= self.confirmed_at:
            return self
        return replace(self, confirmed_at=sent_at)

    def deadline(self) -> float | None:
        return None if self.confirmed_at is None else self.confirmed_at + self.fence_after

    def expired(self, now: float) -> bool:
        d = self.deadline()
        return d is None or now >= d

    def reset(self) -> "Lease":
        return replace(self, confirmed_at=None)
