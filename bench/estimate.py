"""How good is the wait estimate? Predicted against actual waits, refill-only against
refill plus the refunds expected from calls in flight (daemon.expect_refunds).

The engine runs in this process on a fake clock (the figure is accuracy, not speed, so a
simulated minute costs milliseconds and every run gives the same numbers): 10 agents call
Opus under the built-in Tier 1 limits (8,000 output tokens a minute), each reserving
max_tokens=1024 and using 150 to 700 of them in calls of 2 to 8 s (fixed seed). Every caller
that has to wait records the estimate it first hears (AcquireStream's Queued) and how long
it actually waited.

    python -m bench.estimate
"""

from __future__ import annotations

import asyncio
import random
import statistics
from dataclasses import replace
from typing import Any

from limiterd.clock import FakeClock
from limiterd.config.loader import load_config
from limiterd.engine import Engine, WaitStatus
from limiterd.ledger.ledger import Granted
from limiterd.ledger.model import AcquireRequest, Outcome
from limiterd.storage.memory import MemoryJournal

AGENTS = 10
SIMULATED_S = 600.0
STEP_S = 0.05


async def run(expect_refunds: bool, seed: int = 7) -> list[tuple[float, float]]:
    """(predicted, actual) seconds for every wait in the simulated run."""
    base = load_config(None)
    config = replace(base, settings=replace(base.settings, expect_refunds=expect_refunds),
                     _cache={}, _by_name={})
    clock = FakeClock()
    engine = Engine(config, MemoryJournal(), clock)
    await engine.start()
    rng = random.Random(seed)
    waits: list[tuple[float, float]] = []
    end = clock.now() + SIMULATED_S

    async def agent(i: int) -> None:
        while clock.now() < end:
            heard: list[float] = []

            async def on_status(s: WaitStatus, heard: list[float] = heard) -> None:
                heard.append(s.estimated_wait_s)

            g = await engine.acquire(AcquireRequest(f"{i % 1}", "claude-opus-4-1", "", 100,
                                                    1024), 300, on_status)
            assert isinstance(g, Granted)
            if heard:
                waits.append((heard[0], g.reservation.waited_s))
            await sleep_until(clock, clock.now() + rng.uniform(2, 8))
            await engine.report(g.reservation.id, 100, rng.randint(150, 700), Outcome.OK, 0)

    tasks = [asyncio.create_task(agent(i)) for i in range(AGENTS)]
    while clock.now() < end + 300 and not all(t.done() for t in tasks):
        clock.advance(STEP_S)
        for _ in range(20):
            await asyncio.sleep(0)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await engine.stop()
    return waits


async def sleep_until(clock: FakeClock, when: float) -> None:
    while clock.now() < when:
        await asyncio.sleep(0)


def summary(waits: list[tuple[float, float]]) -> dict[str, Any]:
    errors = [p - a for p, a in waits]
    return {
        "waits": len(waits),
        "mean_actual_s": statistics.mean(a for _, a in waits) if waits else 0.0,
        "mean_abs_error_s": statistics.mean(abs(e) for e in errors) if errors else 0.0,
        "median_error_s": statistics.median(errors) if errors else 0.0,
        "overestimated_share": sum(e > 1 for e in errors) / len(errors) if errors else 0.0,
    }


def measure() -> dict[str, dict[str, Any]]:
    out = {}
    for name, flag in (("refill only", False), ("refill + expected refunds", True)):
        out[name] = summary(asyncio.run(run(flag)))
        r = out[name]
        print(f"  {name}: {r['waits']} waits, mean {r['mean_actual_s']:.1f} s; estimate error "
              f"mean |e| {r['mean_abs_error_s']:.1f} s, median {r['median_error_s']:+.1f} s, "
              f"over by > 1 s {r['overestimated_share']:.0%}", flush=True)
    return out


if __name__ == "__main__":
    measure()
