"""Retry timing: exponential backoff with full jitter under a hard deadline."""

from __future__ import annotations

import asyncio
import random as _random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .errors import ProviderError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry a failed provider call and how long to wait first.

    `max_attempts` counts every attempt on one model (the first included); `max_elapsed` (s)
    is a hard deadline over the whole call: no sleep ends past it, and a Retry-After longer
    than what remains gives up at once. Clock (monotonic seconds), sleeps and random are
    injectable so tests never wait.
    """

    max_attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_elapsed: float = 15.0
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, compare=False)
    sleep_sync: Callable[[float], None] = field(default=time.sleep, compare=False)
    random: Callable[[], float] = field(default=_random.random, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts: must be >= 1")
        if self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError("base_delay/max_delay: need 0 <= base_delay <= max_delay")
        if self.max_elapsed <= 0:
            raise ValueError("max_elapsed: must be > 0")

    @classmethod
    def interactive(cls, **overrides: object) -> RetryPolicy:
        """A person is waiting: 2 retries within 15 s."""
        return cls(**{"max_attempts": 3, "base_delay": 0.5, "max_delay": 4.0,
                      "max_elapsed": 15.0, **overrides})  # type: ignore[arg-type]

    @classmethod
    def analysis(cls, **overrides: object) -> RetryPolicy:
        """Batch work: 8 retries within 10 min."""
        return cls(**{"max_attempts": 9, "base_delay": 2.0, "max_delay": 120.0,
                      "max_elapsed": 600.0, **overrides})  # type: ignore[arg-type]

    @classmethod
    def none(cls) -> RetryPolicy:
        return cls(max_attempts=1)

    def backoff(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(max_delay, base * 2**(failures-1)))."""
        cap = min(self.max_delay, self.base_delay * (2.0 ** max(0, failures - 1)))
        return self.random() * cap

    def delay(self, err: ProviderError, failures: int, elapsed: float) -> float | None:
        """Seconds to wait before the next attempt, or None to give up now.

        `failures` is how many attempts on this model failed so far (>= 1).
        """
        if not err.retryable or failures >= self.max_attempts:
            return None
        return self.wait_within(err.retry_after_ms, failures, elapsed)

    def wait_within(self, retry_after_ms: int | None, failures: int,
                    elapsed: float) -> float | None:
        remaining = self.max_elapsed - elapsed
        if remaining <= 0:
            return None
        if retry_after_ms is not None:
            wait = retry_after_ms / 1000
            return wait if wait <= remaining else None
        return min(self.backoff(failures), remaining)

    async def run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Call `attempt` until it succeeds or the policy gives up (re-raising the last error)."""
        start = self.clock()
        failures = 0
        while True:
            try:
                return await attempt()
            except ProviderError as err:
                failures += 1
                wait = self.delay(err, failures, self.clock() - start)
                if wait is None:
                    raise
                await self.sleep(wait)

    def run_sync(self, attempt: Callable[[], T]) -> T:
        start = self.clock()
        failures = 0
        while True:
            try:
                return attempt()
            except ProviderError as err:
                failures += 1
                wait = self.delay(err, failures, self.clock() - start)
                if wait is None:
                    raise
                self.sleep_sync(wait)
