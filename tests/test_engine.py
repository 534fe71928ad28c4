"""The engine on a fake clock: waits, timeouts, lease expiry and cancellation, no sleeping.

Every test runs over each journal (in memory, and SQLite on a real file)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator

import pytest

from limiterd.clock import FakeClock
from limiterd.engine import Engine, ShuttingDown, Superseded, WaitStatus
from limiterd.ledger.ledger import Granted, Rejected
from limiterd.ledger.model import AcquireRequest, Outcome, State
from limiterd.storage import Journal
from tests.conftest import make_test_config


@pytest.fixture
async def engine_clock(any_journal: Journal) -> AsyncIterator[tuple[Engine, FakeClock]]:
    clock = FakeClock()
    engine = Engine(make_test_config(), any_journal, clock)
    await engine.start()
    yield engine, clock
    await engine.stop()


async def settle(engine: Engine) -> None:
    """Let woken callers run up to their commit, wait for the journal to have it (a real
    write on SQLite), then let them return."""
    for _ in range(5):
        await asyncio.sleep(0)
    await engine.flush()
    for _ in range(5):
        await asyncio.sleep(0)


def req(tokens: int, request_id: str = "", lease_s: float | None = None) -> AcquireRequest:
    return AcquireRequest("s", "tiny", "", tokens, 0, request_id=request_id, lease_s=lease_s)


async def test_waiter_granted_exactly_when_refill_allows(
    engine_clock: tuple[Engine, FakeClock],
) -> None:
    engine, clock = engine_clock
    assert isinstance(await engine.acquire(req(1000), 0), Granted)
    task = asyncio.create_task(engine.acquire(req(100), 60))
    await settle(engine)
    clock.advance(5.9)  # 100 tokens at 1000/min take 6 s
    await settle(engine)
    assert not task.done()
    clock.advance(0.11)
    await settle(engine)
    result = task.result()
    assert isinstance(result, Granted)
    assert result.reservation.waited_s == pytest.approx(6.0, abs=0.02)


async def test_waiter_times_out_at_its_deadline(engine_clock: tuple[Engine, FakeClock]) -> None:
    engine, clock = engine_clock
    await engine.acquire(req(1000), 0)
    task = asyncio.create_task(engine.acquire(req(100), 2))
    await settle(engine)
    clock.advance(1.99)
    await settle(engine)
    assert not task.done()
    clock.advance(0.02)
    await settle(engine)
    result = task.result()
    assert isinstance(result, Rejected)
    assert result.retry_after_s == pytest.approx(6.0 - 2.0, abs=0.05)
    assert engine.stats().waiting == 0


async def test_orphaned_lease_expires_and_frees_capacity(
    engine_clock: tuple[Engine, FakeClock],
) -> None:
    engine, clock = engine_clock
    granted = await engine.acquire(AcquireRequest("s", "conc", "", 1, 1, lease_s=30), 0)
    await engine.acquire(AcquireRequest("s", "conc", "", 1, 1, lease_s=300), 0)
    assert isinstance(granted, Granted)
    third = asyncio.create_task(engine.acquire(AcquireRequest("s", "conc", "", 1, 1), 120))
    await settle(engine)
    clock.advance(29.9)
    await settle(engine)
    assert not third.done()
    clock.advance(0.2)  # the first lease lapses: its concurrency slot goes to the waiter
    await settle(engine)
    assert isinstance(third.result(), Granted)
    expired = engine.ledger.get(granted.reservation.id)
    assert expired is not None and expired.state is State.EXPIRED
    assert expired.settlement is not None and expired.settlement.refunded.input_tokens == 0


async def test_cancelled_waiter_leaves_the_queue(engine_clock: tuple[Engine, FakeClock]) -> None:
    engine, clock = engine_clock
    await engine.acquire(req(1000), 0)
    first = asyncio.create_task(engine.acquire(req(500), 60))
    second = asyncio.create_task(engine.acquire(req(100), 60))
    await settle(engine)
    assert engine.stats().waiting == 2
    first.cancel()
    await settle(engine)
    assert engine.stats().waiting == 1
    clock.advance(6.01)  # enough for the second alone, not for the cancelled first
    await settle(engine)
    assert isinstance(second.result(), Granted)
    assert engine.stats().open_reservations == 2


async def test_retry_with_same_request_id_takes_over_the_wait(
    engine_clock: tuple[Engine, FakeClock],
) -> None:
    engine, clock = engine_clock
    await engine.acquire(req(1000), 0)
    first = asyncio.create_task(engine.acquire(req(100, request_id="r1"), 60))
    await settle(engine)
    second = asyncio.create_task(engine.acquire(req(100, request_id="r1"), 60))
    await settle(engine)
    with pytest.raises(Superseded):
        first.result()
    assert engine.stats().waiting == 1
    clock.advance(6.01)
    await settle(engine)
    result = second.result()
    assert isinstance(result, Granted)
    replay = await engine.acquire(req(100, request_id="r1"), 0)
    assert isinstance(replay, Granted) and replay.replayed
    assert replay.reservation.id == result.reservation.id


async def test_superseded_caller_that_left_logs_no_error(
    engine_clock: tuple[Engine, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    """A re-attach takes over while the first caller's stream is going away: the first never
    hears Superseded. That must not log "Future exception was never retrieved"."""
    engine, _ = engine_clock
    await engine.acquire(req(1000), 0)
    statuses: list[WaitStatus] = []

    async def on_status(status: WaitStatus) -> None:  # a stream: AcquireStream
        statuses.append(status)

    first = asyncio.create_task(engine.acquire(req(100, request_id="r1"), 60, on_status))
    await settle(engine)
    assert len(statuses) == 1
    second = asyncio.create_task(engine.acquire(req(100, request_id="r1"), 60, on_status))
    await asyncio.sleep(0)  # the second takes over; the first is woken with Superseded...
    first.cancel()  # ...but its stream broke: it is cancelled before it runs
    await settle(engine)
    assert first.cancelled() and not second.done()
    second.cancel()
    await settle(engine)
    del first, second
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_rate_limit_pause_holds_waiters_until_it_ends(
    engine_clock: tuple[Engine, FakeClock],
) -> None:
    engine, clock = engine_clock
    g = await engine.acquire(req(1), 0)
    assert isinstance(g, Granted)
    await engine.report(g.reservation.id, 0, 0, Outcome.RATE_LIMITED, 10.0)
    task = asyncio.create_task(engine.acquire(req(1), 60))
    await settle(engine)
    clock.advance(9.9)
    await settle(engine)
    assert not task.done()
    clock.advance(0.2)
    await settle(engine)
    assert isinstance(task.result(), Granted)


async def test_stopping_ends_waits_now_and_refuses_new_ones(
    engine_clock: tuple[Engine, FakeClock],
) -> None:
    engine, clock = engine_clock
    assert isinstance(await engine.acquire(req(1000), 0), Granted)
    task = asyncio.create_task(engine.acquire(req(100), 60))
    await settle(engine)
    assert engine.stats().waiting == 1
    assert engine.end_waits(1.0) == 1
    with pytest.raises(ShuttingDown) as err:
        await task
    assert err.value.retry_after_s == 1.0
    assert engine.stats().waiting == 0
    with pytest.raises(ShuttingDown):  # a wait that starts later ends the same way
        await engine.acquire(req(100), 60)
    assert engine.stats().waiting == 0
    clock.advance(60)  # refilled: a grant that needs no wait still goes through
    assert isinstance(await engine.acquire(req(100), 60), Granted)


async def test_a_wait_ended_as_its_stream_goes_away_logs_no_error(
    engine_clock: tuple[Engine, FakeClock], caplog: pytest.LogCaptureFixture,
) -> None:
    engine, _clock = engine_clock
    assert isinstance(await engine.acquire(req(1000), 0), Granted)

    async def stuck(_status: object) -> None:  # a stream whose client stopped reading
        await asyncio.Event().wait()

    task = asyncio.create_task(engine.acquire(req(100), 60, on_status=stuck))
    await settle(engine)
    assert engine.end_waits(1.0) == 1
    task.cancel()  # the server cancels the stream as it stops
    with pytest.raises(asyncio.CancelledError):
        await task
    del task
    gc.collect()
    await settle(engine)
    assert "never retrieved" not in caplog.text
