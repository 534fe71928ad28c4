"""Time, injected. Nothing else in limiterd reads the time or arms a timer.

Times are unix seconds as floats: they are persisted (lease expiries, bucket levels as of a
time) and must mean the same after a restart, so they are wall-clock times. But intervals
(refill, leases, wait deadlines) must not jump when someone steps the wall clock: a step back
of 120 s once stopped refills until wall time caught up, and a step forward of 900 s settled
an open 10-minute lease as consumed. So the wall clock is read once, at start, and from then
on time moves with the monotonic clock (AnchoredTime). A restart anchors again to the wall
clock, which is then the only judge of how long the daemon was down.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """Unix time in seconds."""
        ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` on the event loop once `now() >= when`."""
        ...


async def sleep(clock: Clock, seconds: float) -> None:
    """asyncio.sleep on `clock`: a FakeClock's periodic work runs when the test steps it."""
    woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake() -> None:
        if not woken.done():  # cancelled meanwhile
            woken.set_result(None)

    timer = clock.call_at(clock.now() + seconds, wake)
    try:
        await woken
    finally:
        timer.cancel()


class AnchoredTime:
    """Unix seconds that advance with the monotonic clock: the wall clock is read once, here.
    `wall` and `monotonic` are the sources (injected, so that tests can step them)."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._monotonic = monotonic
        self._offset = wall() - monotonic()

    def now(self) -> float:
        return self._offset + self._monotonic()


class SystemClock(AnchoredTime):
    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        loop = asyncio.get_running_loop()
        return loop.call_later(max(0.0, when - self.now()), callback)


class _FakeTimer:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock(AnchoredTime):
    """A clock that moves only when told to; timers run synchronously inside advance().

    It keeps its own wall and monotonic sources and reads them through AnchoredTime, as the
    daemon's clock does: `step_wall` moves only the wall clock (an operator or NTP stepping
    it), which the daemon must not notice while it runs."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.wall = start
        self.monotonic = 1000.0
        super().__init__(lambda: self.wall, lambda: self.monotonic)
        self._timers: list[tuple[float, int, _FakeTimer, Callable[[], None]]] = []
        self._seq = itertools.count()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = _FakeTimer()
        heapq.heappush(self._timers, (when, next(self._seq), timer, callback))
        return timer

    def advance(self, seconds: float) -> None:
        """Move time forward, running every timer that comes due, in order."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        target = self.now() + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, timer, callback = heapq.heappop(self._timers)
            self._move(max(0.0, when - self.now()))
            if not timer.cancelled:
                callback()
        self._move(target - self.now())

    def _move(self, seconds: float) -> None:
        self.wall += seconds
        self.monotonic += seconds

    def step_wall(self, seconds: float) -> None:
        """The wall clock jumps (either way); monotonic time does not."""
        self.wall += seconds
