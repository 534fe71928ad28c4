"""Waiting streams at scale (issue 10, item 3; issue 10 item 14's global waiter cap).

Positions and estimates are kept per queue and recomputed in one pass when the queue moves,
at most once per RECOMPUTE_S; only that queue's streams hear of it. These tests check that
what streams hear after movement is right (a fake clock, over a real server) and that the
caps answer RESOURCE_EXHAUSTED naming their setting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import pytest

from limiterd.clock import FakeClock
from limiterd.config.model import Config
from limiterd.engine import Engine
from limiterd.ledger.errors import QueueFull
from limiterd.ledger.ledger import Granted, Ledger, Waiter
from limiterd.ledger.model import AcquireRequest
from limiterd.server import running_server
from limiterd.storage.memory import MemoryJournal
from limiterd.streams import RECOMPUTE_S
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.conftest import make_test_config
from tests.test_wait_status import Events, settle

Code = grpc.StatusCode


def config(**settings: Any) -> Config:
    base = make_test_config()
    return replace(base, settings=replace(base.settings, **settings), _cache={})


def tiny(tokens: int, scope: str = "s", user: str = "", rid: str = "") -> AcquireRequest:
    return AcquireRequest(scope, "tiny", user, tokens, 0, request_id=rid)


# ---- the ledger's one-pass statuses agree with asking each waiter ---------------------------


def test_queue_statuses_match_each_waiters_own_status() -> None:
    """Several queues share the scope x budget bucket (users with their own buckets): the
    one-pass figures for a queue equal wait_status for each of its waiters, after waiters
    left from the middle and the front."""
    now = 1_700_000_000.0
    led = Ledger(make_test_config(), now)
    assert isinstance(led.acquire(tiny(1000), now, now), Granted)
    waiters = []
    assert isinstance(led.acquire(tiny(1000, scope="alone"), now, now), Granted)
    for i, user in enumerate(["a", "b", "a", "", "b", "a", "", "a"]):
        for scope in ("s", "alone"):  # "alone": one queue on its bucket (the fast path)
            w = led.acquire(tiny(50 + 10 * i, scope, "" if scope == "alone" else user),
                            now, now + 600)
            assert isinstance(w, Waiter)
            waiters.append(w)
    for gone in (4, 0, 3, 1):  # from the middle and the front, on both scopes
        led.cancel_wait(waiters[gone], now)
    led.take_ended()
    later = now + 7
    led.advance(later)
    for qk in {w.queue for w in waiters}:
        depth, rows = led.queue_statuses(qk, later)
        assert rows, qk
        for w, position, estimate in rows:
            assert led.wait_status(w, later) == (position, pytest.approx(estimate), depth)
    for scope in ("s", "alone"):
        positions = sorted(led.wait_status(w, later)[0] for w in waiters
                           if w.result is None and w.request.scope == scope)
        assert positions == list(range(1, len(positions) + 1))


# ---- over a real server on a fake clock ------------------------------------------------------


@pytest.fixture
async def served() -> AsyncIterator[tuple[pb_grpc.LimiterStub, FakeClock]]:
    clock = FakeClock()
    # Keepalives a minute apart: every event below is news, not a keepalive.
    async with running_server(config=config(stream_update_interval_s=60), clock=clock) as srv:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            yield pb_grpc.LimiterStub(ch), clock


async def next_event(call: Any) -> pb.AcquireEvent:
    event = await asyncio.wait_for(call.read(), timeout=10)  # a condition, not a sleep
    assert isinstance(event, pb.AcquireEvent)
    return event


def stream(stub: pb_grpc.LimiterStub, tokens: int, rid: str) -> Any:
    return stub.AcquireStream(pb.AcquireRequest(
        scope="s", model="tiny", input_tokens=tokens, max_wait_ms=60_000, request_id=rid))


async def test_positions_after_movement_over_a_real_server(
    served: tuple[pb_grpc.LimiterStub, FakeClock],
) -> None:
    stub, clock = served
    await stub.Acquire(pb.AcquireRequest(scope="s", model="tiny", input_tokens=1000))
    calls = []
    for i in range(4):  # 100 tokens each on a 1000/min bucket: 6 s apart
        calls.append(stream(stub, 100, ""))  # no request_id: a cancel gives the place up
        first = (await next_event(calls[-1])).queued
        assert (first.position, first.estimated_wait_ms) == (i + 1, 6000 * (i + 1))
    calls[1].cancel()  # leaves from the middle: the two behind move up at once
    for call, position, wait_ms in ((calls[2], 2, 12_000), (calls[3], 3, 18_000)):
        q = (await next_event(call)).queued
        assert (q.position, q.estimated_wait_ms) == (position, wait_ms)
    clock.advance(6.01)  # the head is granted; the next recompute is due (> RECOMPUTE_S)
    assert (await next_event(calls[0])).WhichOneof("event") == "granted"
    for call, position, wait_ms in ((calls[2], 1, 5990), (calls[3], 2, 11_990)):
        q = (await next_event(call)).queued
        assert (q.position, q.estimated_wait_ms) == (position, wait_ms)
    for call in calls[2:]:
        call.cancel()


async def test_streams_beyond_the_cap_are_refused_by_name() -> None:
    clock = FakeClock()
    async with running_server(config=config(max_streams=2), clock=clock) as srv:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LimiterStub(ch)
            await stub.Acquire(pb.AcquireRequest(scope="s", model="tiny", input_tokens=1000))
            held = [stream(stub, 10, f"r{i}") for i in range(2)]
            for call in held:
                assert (await next_event(call)).WhichOneof("event") == "queued"
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await next_event(stream(stub, 10, "r9"))
            assert e.value.code() == Code.RESOURCE_EXHAUSTED
            assert "daemon.max_streams" in (e.value.details() or "")
            assert int(dict(e.value.trailing_metadata())["retry-after-ms"]) > 0
            # A plain Acquire may still wait, and the refused stream holds no place.
            waiting = asyncio.ensure_future(stub.Acquire(pb.AcquireRequest(
                scope="s", model="tiny", input_tokens=10, max_wait_ms=60_000)))
            while srv.engine.stats().waiting < 3:
                await asyncio.sleep(0.01)  # polling a condition
            assert srv.engine.stats().waiting == 3
            clock.advance(2)
            await asyncio.wait_for(waiting, timeout=10)
            for call in held:
                call.cancel()


# ---- in process: who is woken, and how often ------------------------------------------------


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    e = Engine(config(), MemoryJournal(), FakeClock())
    await e.start()
    yield e
    await e.stop()


async def test_only_the_moved_queue_hears_and_recomputes_are_bounded(engine: Engine) -> None:
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    for scope in ("s", "t"):
        assert isinstance(await engine.acquire(tiny(1000, scope), 0), Granted)
    s_events = [Events() for _ in range(5)]
    s_tasks = [asyncio.create_task(engine.acquire(tiny(100), 60, ev)) for ev in s_events]
    t_events = Events()
    t_task = asyncio.create_task(engine.acquire(tiny(100, "t"), 60, t_events))
    await settle()
    assert [ev.statuses[-1].position for ev in s_events] == [1, 2, 3, 4, 5]
    s_tasks[0].cancel()
    await settle()
    assert [ev.statuses[-1].position for ev in s_events[1:]] == [1, 2, 3, 4]
    assert len(t_events.statuses) == 1  # another queue: not woken
    sent = [len(ev.statuses) for ev in s_events[1:]]
    s_tasks[1].cancel()  # within RECOMPUTE_S of the last recompute: deferred
    await settle()
    assert [len(ev.statuses) for ev in s_events[1:]] == sent
    clock.advance(RECOMPUTE_S)
    await settle()
    assert [ev.statuses[-1].position for ev in s_events[2:]] == [1, 2, 3]
    assert len(t_events.statuses) == 1
    for task in [*s_tasks[2:], t_task]:
        task.cancel()
    await settle()


async def test_total_waiters_are_capped_over_all_queues() -> None:
    engine = Engine(config(max_waiters=3), MemoryJournal(), FakeClock())
    await engine.start()
    try:
        scopes = ["a", "b", "c", "d"]
        for scope in scopes:
            assert isinstance(await engine.acquire(tiny(1000, scope), 0), Granted)
        tasks = [asyncio.create_task(engine.acquire(tiny(10, s), 60)) for s in scopes[:3]]
        await settle()
        with pytest.raises(QueueFull, match=r"3 callers already wait in total "
                                            r"\(daemon\.max_waiters\)"):
            await engine.acquire(tiny(10, "d"), 60)
        for task in tasks:
            task.cancel()
        await settle()
        assert engine.stats().waiting == 0
    finally:
        await engine.stop()


# A bound against a hang only: the burst's speed is bench/streams.py's business.
BURST_BOUND_S = 300


async def test_a_burst_of_streams_is_let_in_not_cancelled() -> None:
    """2,500 AcquireStream callers joining at once (well beyond gRPC core's default of 1,000
    pending calls): every one hears its first Queued event; none is CANCELLED."""
    clock = FakeClock()
    n = 2500
    cfg = config(max_waiters_per_queue=n, max_waiters=n, max_streams=n,
                 stream_update_interval_s=600)
    async with running_server(config=cfg, clock=clock) as srv:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LimiterStub(ch)
            await stub.Acquire(pb.AcquireRequest(scope="s", model="tiny", input_tokens=1000))
            calls = [stream(stub, 1, "") for _ in range(n)]
            # However long a loaded machine takes to let them all in, each either hears its
            # Queued event or fails: the bound only keeps a hang from lasting forever.
            firsts = await asyncio.wait_for(
                asyncio.gather(*(c.read() for c in calls), return_exceptions=True),
                timeout=BURST_BOUND_S)
            failed = [f for f in firsts if not isinstance(f, pb.AcquireEvent)]
            assert failed == []
            assert sorted(f.queued.position for f in firsts) == list(range(1, n + 1))
            for c in calls:
                c.cancel()
