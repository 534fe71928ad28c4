"""Live wait status (AcquireStream), overload marks and provider-synchronized buckets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest

from limiterd.api.provider_headers import provider_limits
from limiterd.clock import FakeClock
from limiterd.config.model import Config
from limiterd.engine import Engine, WaitStatus
from limiterd.ledger.ledger import Granted, Rejected
from limiterd.ledger.model import AcquireRequest, BucketKey, Outcome
from limiterd.storage.memory import MemoryJournal
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from tests.conftest import Clocked, make_test_config


def config(**settings: object) -> Config:
    base = make_test_config()
    return replace(base, settings=replace(base.settings, **settings), _cache={})


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    e = Engine(config(), MemoryJournal(), FakeClock())
    await e.start()
    yield e
    await e.stop()


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def tiny(tokens: int, request_id: str = "", user: str = "") -> AcquireRequest:
    return AcquireRequest("s", "tiny", user, tokens, 0, request_id=request_id)


class Events:
    def __init__(self) -> None:
        self.statuses: list[WaitStatus] = []

    async def __call__(self, status: WaitStatus) -> None:
        self.statuses.append(status)


async def test_stream_sends_queued_keepalives_then_one_grant(engine: Engine) -> None:
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    await engine.acquire(tiny(1000), 0)
    events = Events()
    task = asyncio.create_task(engine.acquire(tiny(200), 60, events))
    await settle()
    assert [(s.position, round(s.estimated_wait_s)) for s in events.statuses] == [(1, 12)]
    clock.advance(5.0)  # the keepalive interval
    await settle()
    assert len(events.statuses) == 2 and events.statuses[1].estimated_wait_s == pytest.approx(7)
    clock.advance(7.01)
    await settle()
    result = task.result()
    assert isinstance(result, Granted) and not result.replayed
    # At once, then the keepalive at 5 s; none after the grant.
    assert [s.waited_s for s in events.statuses] == [0.0, 5.0]


async def test_estimates_match_real_waits_within_100ms(engine: Engine) -> None:
    """Three callers queued behind an empty bucket: the estimate each hears at once is
    within 0.1 s of when it is actually granted (fake clock, deterministic)."""
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    await engine.acquire(tiny(1000), 0)
    streams = [Events() for _ in range(3)]
    tasks = [asyncio.create_task(engine.acquire(tiny(200), 120, s)) for s in streams]
    await settle()
    estimates = [s.statuses[0].estimated_wait_s for s in streams]
    assert [s.statuses[0].position for s in streams] == [1, 2, 3]
    start, granted_at = clock.now(), {}
    for _ in range(400):
        clock.advance(0.1)
        await settle()
        for i, t in enumerate(tasks):
            if t.done() and i not in granted_at:
                granted_at[i] = clock.now() - start
    for i in range(3):
        assert granted_at[i] == pytest.approx(estimates[i], abs=0.1)
    assert estimates == pytest.approx([12, 24, 36], abs=0.01)


async def test_position_moves_up_when_someone_ahead_leaves(engine: Engine) -> None:
    await engine.acquire(tiny(1000), 0)
    first = asyncio.create_task(engine.acquire(tiny(500), 60))
    await settle()
    events = Events()
    second = asyncio.create_task(engine.acquire(tiny(100), 60, events))
    await settle()
    assert events.statuses[-1].position == 2
    first.cancel()
    await settle()
    assert events.statuses[-1].position == 1
    assert events.statuses[-1].estimated_wait_s == pytest.approx(6, abs=0.01)
    second.cancel()
    await settle()
    assert engine.stats().waiting == 0  # no request_id: the place is given up at once


async def test_lost_stream_keeps_its_place_within_the_grace(engine: Engine) -> None:
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    await engine.acquire(tiny(1000), 0)
    lost = asyncio.create_task(engine.acquire(tiny(100, "r1"), 60, Events()))
    await settle()
    behind = asyncio.create_task(engine.acquire(tiny(100), 60, Events()))
    await settle()
    lost.cancel()  # a network blip
    await settle()
    clock.advance(3)  # within the 10 s grace
    events = Events()
    back = asyncio.create_task(engine.acquire(tiny(100, "r1"), 60, events))
    await settle()
    assert events.statuses[0].position == 1  # still first in line
    clock.advance(3.01)
    await settle()
    result = back.result()
    assert isinstance(result, Granted)
    assert not behind.done()
    behind.cancel()


async def test_grant_made_while_detached_is_returned_on_reattach(engine: Engine) -> None:
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    await engine.acquire(tiny(1000), 0)
    lost = asyncio.create_task(engine.acquire(tiny(100, "r2"), 60, Events()))
    await settle()
    lost.cancel()
    await settle()
    clock.advance(6.01)  # granted while nobody listens
    await settle()
    again = await engine.acquire(tiny(100, "r2"), 60, Events())
    assert isinstance(again, Granted) and again.replayed
    assert engine.stats().open_reservations == 2


async def test_place_is_given_up_after_the_grace(engine: Engine) -> None:
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    await engine.acquire(tiny(1000), 0)
    lost = asyncio.create_task(engine.acquire(tiny(500, "r3"), 60, Events()))
    await settle()
    lost.cancel()
    await settle()
    assert engine.stats().waiting == 1
    clock.advance(10.01)
    await settle()
    assert engine.stats().waiting == 0


async def test_rate_limit_headers_lower_a_bucket_beyond_rounding(engine: Engine) -> None:
    g = await engine.acquire(AcquireRequest("s", "claude-x", "", 1000, 1000), 0)
    assert isinstance(g, Granted)
    key = BucketKey("s", "claude-*")  # the budget claude-x draws on

    def levels() -> list[float]:
        b = next(b for b in engine.ledger.buckets(engine.clock.now()) if b.key == key)
        return list(b.levels)

    assert levels()[1] == 999_000
    # The provider rounds to thousands: 998,000 remaining is within tolerance.
    await engine.report(g.reservation.id, 1000, 10, Outcome.OK, 0, provider_limits({
        "anthropic-ratelimit-input-tokens-remaining": "998000",
        "anthropic-ratelimit-input-tokens-limit": "1000000",
    }))
    assert levels()[1] == 999_000
    g2 = await engine.acquire(AcquireRequest("s", "claude-x", "", 1000, 1000), 0)
    assert isinstance(g2, Granted)
    # Someone outside limiterd spends the key: the provider says much less remains.
    await engine.report(g2.reservation.id, 1000, 10, Outcome.OK, 0, provider_limits({
        "anthropic-ratelimit-input-tokens-remaining": "400000",
        "anthropic-ratelimit-output-tokens-remaining": "150000",
        "anthropic-ratelimit-requests-remaining": "garbage",
    }))
    assert levels()[1] == 400_000
    assert levels()[2] == 150_000
    # Never raised from headers (learning is off): capacity stays as configured.
    g3 = await engine.acquire(AcquireRequest("s", "claude-x", "", 10, 10), 0)
    assert isinstance(g3, Granted)
    await engine.report(g3.reservation.id, 10, 10, Outcome.OK, 0, provider_limits({
        "anthropic-ratelimit-input-tokens-limit": "5000000",
        "anthropic-ratelimit-input-tokens-remaining": "4990000",
    }))
    b = next(b for b in engine.ledger.buckets(engine.clock.now()) if b.key == key)
    assert b.caps[1] == 1_000_000 and b.levels[1] < 1_000_000


async def test_learned_limits_raise_capacity_when_allowed() -> None:
    engine = Engine(config(learn_limits=True), MemoryJournal(), FakeClock())
    await engine.start()
    try:
        g = await engine.acquire(AcquireRequest("s", "claude-x", "", 10, 10), 0)
        assert isinstance(g, Granted)
        await engine.report(g.reservation.id, 10, 10, Outcome.OK, 0, provider_limits({
            "anthropic-ratelimit-input-tokens-limit": "5000000",
        }))
        key = BucketKey("s", "claude-*")  # the budget claude-x draws on
        b = next(b for b in engine.ledger.buckets(engine.clock.now()) if b.key == key)
        assert b.caps[1] == 5_000_000
        assert engine.ledger.learned_fields(key) == {"input_tokens_per_minute"}
        big = await engine.acquire(AcquireRequest("s", "claude-x", "", 1_500_000, 1), 0)
        assert isinstance(big, Rejected)  # fits the learned capacity: waits, not refused
    finally:
        await engine.stop()


async def test_overload_mark_and_its_expiry(engine: Engine) -> None:
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    for i in range(3):
        g = await engine.acquire(AcquireRequest(f"s{i}", "claude-x", "", 1, 1), 0)
        assert isinstance(g, Granted)
        assert engine.ledger.overloaded_until("claude-*", clock.now()) == 0
        await engine.report(g.reservation.id, 1, 0, Outcome.OVERLOADED, 0)
        clock.advance(1)
    until = engine.ledger.overloaded_until("claude-*", clock.now())
    assert until == pytest.approx(clock.now() - 1 + 30)
    assert engine.ledger.overloaded_until("tiny", clock.now()) == 0  # another budget
    clock.advance(29.5)
    assert engine.ledger.overloaded_until("claude-*", clock.now()) == 0  # lifts on its own


async def test_overloads_outside_the_window_do_not_mark(engine: Engine) -> None:
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    for _ in range(3):
        g = await engine.acquire(AcquireRequest("s", "claude-x", "", 1, 1), 0)
        assert isinstance(g, Granted)
        await engine.report(g.reservation.id, 1, 0, Outcome.OVERLOADED, 0)
        clock.advance(31)
    assert engine.ledger.overloaded_until("claude-*", clock.now()) == 0


async def test_acquire_stream_over_a_real_channel(clocked: Clocked) -> None:
    limiter = clocked.limiter
    await limiter.Acquire(pb.AcquireRequest(scope="s", model="tiny", input_tokens=1000))
    call = limiter.AcquireStream(pb.AcquireRequest(
        scope="s", model="tiny", input_tokens=5, max_wait_ms=5000, request_id="st-1"))
    stream = aiter(call)
    first = await anext(stream)
    assert first.WhichOneof("event") == "queued"
    assert (first.queued.position, first.queued.estimated_wait_ms) == (1, 300)  # 5 at 1000/min
    clocked.clock.advance(0.3)
    events = [first] + [e async for e in stream]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["queued", "granted"]
    assert events[-1].granted.reserved_input_tokens == 5
    assert events[-1].granted.waited_ms == 300
    # Re-attaching after the grant returns the same grant, not a second one.
    again = [e async for e in limiter.AcquireStream(pb.AcquireRequest(
        scope="s", model="tiny", input_tokens=5, max_wait_ms=5000, request_id="st-1"))]
    assert [e.WhichOneof("event") for e in again] == ["granted"]
    assert again[0].granted.reservation_id == events[-1].granted.reservation_id
    assert again[0].granted.replayed


async def test_acquire_stream_failure_is_a_status(clocked: Clocked) -> None:
    limiter = clocked.limiter
    await limiter.Acquire(pb.AcquireRequest(scope="s", model="tiny", input_tokens=1000))
    call = limiter.AcquireStream(pb.AcquireRequest(
        scope="s", model="tiny", input_tokens=500, max_wait_ms=200))
    stream = aiter(call)
    seen = [(await anext(stream)).WhichOneof("event")]
    clocked.clock.advance(0.2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for e in stream:
            seen.append(e.WhichOneof("event"))
    assert seen == ["queued"]
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 0
