"""Where each waiting AcquireStream caller stands, kept per queue so that many thousands of
waiting streams cost the daemon little.

A stream used to recompute its own position by walking its queue, and every queue movement
woke every stream: O(streams x queue) work per movement. Here:
- a stream's status (position, estimate, depth) is computed once when it joins (the ledger
  answers a newcomer at the tail from bucket totals, without a walk);
- when the ledger says a queue moved (someone left, a level rose), the whole queue is
  recomputed in one pass (Ledger.queue_statuses), at most once per RECOMPUTE_S per queue,
  and only that queue's streams are looked at;
- a stream is woken only when its news matters (it reached the front few, its position moved
  by a tenth, or its estimate drifted from the countdown by more than a second or a tenth);
  between times the estimate counts down with the clock, and a keepalive goes out every
  `stream_update_interval_s` anyway.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from limiterd.clock import Clock, Timer
from limiterd.ledger.ledger import Ledger, QueueKey, Waiter

# A queue's statuses are recomputed at most this often (the first movement after a quiet
# spell is recomputed at once).
RECOMPUTE_S = 1.0
NEAR_FRONT = 3  # positions up to this are sent on every change
SHARE = 0.1  # otherwise a change of a tenth (position or estimate) is news
MIN_DRIFT_S = 1.0  # and an estimate is news when it drifts more than this from the countdown


@dataclass(slots=True, eq=False)
class Watch:
    """One waiting stream: its latest status, what it last sent, and how to wake it."""

    waiter: Waiter
    position: int
    estimate: float  # seconds, as of `at`
    depth: int
    at: float
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sent_position: int = 0
    sent_estimate: float = math.inf
    sent_at: float = -math.inf

    def estimate_at(self, now: float) -> float:
        """The estimate counted down to `now` (the wait shrinks as buckets refill)."""
        return max(0.0, self.estimate - (now - self.at))

    def sent(self, now: float) -> None:
        self.sent_position, self.sent_estimate, self.sent_at = (
            self.position, self.estimate_at(now), now)

    def update(self, position: int, estimate: float, depth: int, now: float) -> bool:
        """A fresh status; True when the caller should hear it now."""
        self.position, self.estimate, self.depth, self.at = position, estimate, depth, now
        moved = position != self.sent_position and (
            position <= NEAR_FRONT
            or abs(position - self.sent_position) >= SHARE * self.sent_position
        )
        expected = max(0.0, self.sent_estimate - (now - self.sent_at))
        drift = abs(estimate - expected) > max(MIN_DRIFT_S, SHARE * expected)
        return moved or drift


class Streams:
    """The waiting streams, by queue. The engine adds and removes them and says which
    queues moved; this keeps their statuses and wakes the ones with news."""

    def __init__(self, ledger: Ledger, clock: Clock) -> None:
        self._ledger = ledger
        self._clock = clock
        self._by_queue: dict[QueueKey, dict[Waiter, Watch]] = {}
        self._count = 0
        self._dirty: set[QueueKey] = set()
        self._next_ok: dict[QueueKey, float] = {}  # the soonest a queue is recomputed again
        self._flush_soon = False
        self._timer: Timer | None = None
        self._timer_at = math.inf

    def __len__(self) -> int:
        return self._count

    def add(self, w: Waiter) -> Watch:
        now = self._clock.now()
        position, estimate, depth = self._ledger.wait_status(w, now)
        watch = Watch(w, position, estimate, depth, now)
        self._by_queue.setdefault(w.queue, {})[w] = watch
        self._count += 1
        return watch

    def remove(self, watch: Watch) -> None:
        qk = watch.waiter.queue
        watches = self._by_queue.get(qk)
        if watches is None or watches.get(watch.waiter) is not watch:
            return
        del watches[watch.waiter]
        self._count -= 1
        if not watches:
            del self._by_queue[qk]
            self._next_ok.pop(qk, None)
            self._dirty.discard(qk)

    def refresh(self, watch: Watch) -> None:
        """Before a send: a movement of its queue not yet recomputed is, if it may be now."""
        qk = watch.waiter.queue
        now = self._clock.now()
        if qk in self._dirty and now >= self._next_ok.get(qk, -math.inf):
            self._dirty.discard(qk)
            self._recompute(qk, now)
            self._next_ok[qk] = now + RECOMPUTE_S

    def moved(self, queues: set[QueueKey]) -> None:
        """These queues moved: recompute the watched ones soon (at most once per
        RECOMPUTE_S each)."""
        watched = queues & self._by_queue.keys() if self._by_queue else set()
        if not watched:
            return
        self._dirty |= watched
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf
        now = self._clock.now()
        later: set[QueueKey] = set()
        done = False
        for qk in self._dirty:
            if not done and now >= self._next_ok.get(qk, -math.inf):
                self._recompute(qk, now)
                self._next_ok[qk] = now + RECOMPUTE_S
                done = True  # one queue per turn of the loop: callers in between get served
            elif qk in self._by_queue:
                later.add(qk)
        self._dirty = later
        if any(now >= self._next_ok.get(qk, -math.inf) for qk in later):
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)
        elif later:
            at = min(self._next_ok[qk] for qk in later)
            if at < self._timer_at:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer, self._timer_at = self._clock.call_at(at, self._flush), at

    def _recompute(self, qk: QueueKey, now: float) -> None:
        watches = self._by_queue.get(qk)
        if not watches:
            return
        depth, rows = self._ledger.queue_statuses(qk, now)
        for w, position, estimate in rows:
            watch = watches.get(w)
            if watch is not None and watch.update(position, estimate, depth, now):
                watch.wake.set()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
