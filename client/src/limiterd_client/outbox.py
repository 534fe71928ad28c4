"""Settlements the daemon has not acknowledged yet, delivered in the background.

When the daemon is killed or restarting while a provider call runs, the provider has still
served the call: its answer belongs to the app. Report and Release are idempotent on the
daemon, so the client returns the answer at once and keeps sending the settlement (with
backoff) until it lands or the lease is over (then the daemon has settled it as consumed and
there is nothing left to tell it). The outbox is bounded, and flushed when the limiter closes.
This module holds the pure bookkeeping; the async and the sync limiter each drive it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from ._core import Counters, log

SettleRequest = object  # a pb.ReportRequest or pb.ReleaseRequest


@dataclass
class Pending:
    method: str  # "Report" or "Release"
    request: SettleRequest
    reservation_id: str
    give_up_at: float  # clock time at which the lease is over
    due: float  # clock time of the next try
    tries: int = 0


class Outbox:
    """Thread-safe. `add` returns True when the caller must start a driver; a driver loops on
    `next()` until it returns None (and then must stop: the next `add` starts a new one)."""

    def __init__(self, counters: Counters, clock: Callable[[], float],
                 wall: Callable[[], float], *, limit: int = 1000, base_delay: float = 0.1,
                 max_delay: float = 5.0) -> None:
        if limit < 1:
            raise ValueError("outbox_limit: must be >= 1")
        self._counters, self._clock, self._wall = counters, clock, wall
        self.limit, self.base_delay, self.max_delay = limit, base_delay, max_delay
        self._pending: dict[str, Pending] = {}
        self._lock = threading.Lock()
        self._running = False
        self._delivered_since_quiet = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def add(self, method: str, request: SettleRequest, reservation_id: str,
            lease_expires_at_ms: int) -> bool:
        now = self._clock()
        left = max(0.0, lease_expires_at_ms / 1000 - self._wall()) if lease_expires_at_ms else 0
        with self._lock:
            if not self._pending:  # once per outage, not once per call
                log.warning("limiterd unreachable: settling reservations in the background "
                            "(answers are returned; Report/Release are retried until they "
                            "land or their lease is over)")
            if len(self._pending) >= self.limit:
                oldest = next(iter(self._pending))
                del self._pending[oldest]
                self._counters.settles_dropped += 1
                log.warning("settle outbox full (%d): dropped the oldest, %s; its lease "
                            "settles it as consumed", self.limit, oldest)
            self._pending[reservation_id] = Pending(method, request, reservation_id,
                                                    now + left, now)
            self._counters.settles_deferred += 1
            start, self._running = not self._running, True
            return start

    def next(self) -> tuple[Pending | None, float]:
        """The entry to try now (and 0), or the soonest one and how long until it is due;
        (None, 0) when there is nothing left: the driver stops."""
        now = self._clock()
        with self._lock:
            for p in list(self._pending.values()):
                if now > p.give_up_at:
                    self._drop(p, "its lease is over: the daemon settles it as consumed")
            if not self._pending:
                self._running = False
                if self._delivered_since_quiet:
                    log.info("limiterd reachable again: %d deferred settlements delivered",
                             self._delivered_since_quiet)
                    self._delivered_since_quiet = 0
                return None, 0.0
            p = min(self._pending.values(), key=lambda x: x.due)
            return p, max(0.0, p.due - now)

    def landed(self, p: Pending) -> None:
        with self._lock:
            if self._pending.pop(p.reservation_id, None) is not None:
                self._counters.settles_delivered += 1
                self._delivered_since_quiet += 1

    def retry_later(self, p: Pending) -> None:
        with self._lock:
            p.tries += 1
            p.due = self._clock() + min(self.max_delay, self.base_delay * 2 ** (p.tries - 1))

    def refused(self, p: Pending, why: str) -> None:
        """The daemon answered with a final error (e.g. the lease expired meanwhile)."""
        with self._lock:
            self._drop(p, why)

    def _drop(self, p: Pending, why: str) -> None:
        if self._pending.pop(p.reservation_id, None) is not None:
            self._counters.settles_dropped += 1
            log.warning("gave up settling %s (%s): %s", p.reservation_id, p.method, why)
