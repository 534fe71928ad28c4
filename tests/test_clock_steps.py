"""The wall clock stepping under a running daemon (issue 10, item 7).

A step back of 120 s once stopped refills until wall time caught up; a step forward of 900 s
settled an open 10-minute lease as consumed. The daemon reads the wall clock once, at start,
and measures intervals with the monotonic clock; the fake clock here reads its two sources
through the same code (AnchoredTime) and `step_wall` moves only the wall one. Stored times
(expiries, levels as of a time) keep meaning wall time across a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

from limiterd.clock import FakeClock, SystemClock
from limiterd.engine import Engine
from limiterd.ledger.ledger import Granted, Rejected
from limiterd.ledger.model import AcquireRequest, BucketKey, State
from limiterd.storage.memory import MemoryJournal
from limiterd.storage.sqlite import SqliteJournal
from tests.conftest import make_test_config

TINY = BucketKey("s", "tiny")  # 1000 input tokens a minute: 100 tokens refill in 6 s


def tiny(tokens: int, lease_s: float | None = None) -> AcquireRequest:
    return AcquireRequest("s", "tiny", "", tokens, 0, lease_s=lease_s)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_the_system_clock_reads_the_wall_once() -> None:
    wall, mono = [1_700_000_000.0], [50.0]
    clock = SystemClock(lambda: wall[0], lambda: mono[0])
    assert clock.now() == 1_700_000_000.0
    wall[0] -= 120  # stepped back
    mono[0] += 2
    assert clock.now() == 1_700_000_002.0
    wall[0] += 1020  # and forward
    mono[0] += 3
    assert clock.now() == 1_700_000_005.0


async def test_refills_continue_and_a_lease_holds_through_wall_steps() -> None:
    clock = FakeClock()
    engine = Engine(make_test_config(), MemoryJournal(), clock)
    await engine.start()
    try:
        held = await engine.acquire(tiny(1000, lease_s=600), 0)  # empties the bucket
        assert isinstance(held, Granted)
        clock.step_wall(-120)
        waiting = asyncio.create_task(engine.acquire(tiny(100), 30))
        await settle()
        clock.advance(6.01)  # refilled in 6 s of real (monotonic) time, not 126
        await settle()
        assert isinstance(waiting.result(), Granted)
        clock.step_wall(+900)
        clock.advance(1)
        await settle()
        lease = engine.ledger.get(held.reservation.id)
        assert lease is not None and lease.state is State.OPEN  # not settled as consumed
        clock.advance(600 - 7.01 - 0.1)
        assert engine.ledger.get(held.reservation.id).state is State.OPEN  # type: ignore[union-attr]
        clock.advance(0.2)  # ten minutes after the grant, by the monotonic clock
        assert engine.ledger.get(held.reservation.id).state is State.EXPIRED  # type: ignore[union-attr]
    finally:
        await engine.stop()


async def test_stored_times_are_wall_time_across_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "steps.sqlite3"
    clock = FakeClock()
    engine = Engine(make_test_config(), SqliteJournal(db, clock=clock), clock)
    await engine.start()
    short = await engine.acquire(tiny(500, lease_s=600), 0)
    long = await engine.acquire(tiny(500, lease_s=3000), 0)
    assert isinstance(short, Granted) and isinstance(long, Granted)
    await engine.stop()
    # Down while the wall clock moves 900 s on: the 10-minute lease lapsed, by wall time.
    later = FakeClock(clock.wall + 900)
    engine = Engine(make_test_config(), SqliteJournal(db, clock=later), later)
    await engine.start()
    assert engine.ledger.get(short.reservation.id).state is State.EXPIRED  # type: ignore[union-attr]
    assert engine.ledger.get(long.reservation.id).state is State.OPEN  # type: ignore[union-attr]
    drain = await engine.acquire(tiny(1000), 0)  # the downtime refilled the bucket
    assert isinstance(drain, Granted)
    await engine.stop()
    # Down again, and the wall clock comes back 120 s behind the last state written:
    # refills go on from the restart, not from when the wall clock catches up.
    behind = FakeClock(later.wall - 120)
    engine = Engine(make_test_config(), SqliteJournal(db, clock=behind), behind)
    await engine.start()
    try:
        assert isinstance(await engine.acquire(tiny(100), 0), Rejected)
        behind.advance(6.01)
        assert isinstance(await engine.acquire(tiny(100), 0), Granted)
    finally:
        await engine.stop()
