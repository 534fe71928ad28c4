"""Live wait status through the client against a REAL limiterd: updates, re-attach, early
give-up on the daemon's estimate or overload mark, and never a reservation left open."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from client_daemon import Daemon, over_backends
from wire import BreakStreams

from limiterd.ledger.model import Outcome, State
from limiterd_client import (
    Attempt,
    FallbackPolicy,
    FallbackTriggers,
    Limiter,
    ModelOverloadedHint,
    ProviderMeta,
    Reservation,
    RetryPolicy,
    SyncLimiter,
    Usage,
    WaitTooLong,
    WaitUpdate,
    run_call,
)
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from tests.conftest import eventually

# "tiny" refills 1000 input tokens a minute: a holder of all 1000 makes the next caller wait.


class Heard:
    """An on_wait callback that keeps every update and lets a test wait for the n-th one."""

    def __init__(self) -> None:
        self.updates: list[WaitUpdate] = []
        self._changed = asyncio.Event()

    def __call__(self, u: WaitUpdate) -> None:
        self.updates.append(u)
        self._changed.set()

    async def wait_for(self, n: int = 1) -> WaitUpdate:
        while len(self.updates) < n:
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), 10)
        return self.updates[n - 1]


async def hold_all(lim: Limiter) -> Reservation:
    r = lim.reserve("s1", "tiny", input_tokens=1000, max_output_tokens=0)
    await r.__aenter__()
    return r


@over_backends
async def test_on_wait_hears_queued_updates_in_order_then_the_grant(daemon: Daemon) -> None:
    async with Limiter(daemon.target) as lim:
        holder = await hold_all(lim)
        events: list[str] = []
        b_heard, c_heard = Heard(), Heard()

        async def waiter(heard: Heard, name: str) -> Reservation:
            def on_wait(u: WaitUpdate) -> None:
                heard(u)
                events.append(f"{name}:queued:{u.position}")

            r = lim.reserve("s1", "tiny", input_tokens=500, max_output_tokens=0, max_wait=30,
                            on_wait=on_wait)
            await r.__aenter__()
            events.append(f"{name}:granted")
            return r

        b = asyncio.create_task(waiter(b_heard, "b"))
        first_b = await b_heard.wait_for()
        c = asyncio.create_task(waiter(c_heard, "c"))
        first_c = await c_heard.wait_for()
        assert (first_b.position, first_c.position) == (1, 2)
        assert first_c.queue_depth == 2 and first_c.estimated_wait_s > first_b.estimated_wait_s
        assert isinstance(first_b, WaitUpdate) and not first_b.model_overloaded

        await holder.report(500, 0)  # 500 back: b fits, c moves up to first in line
        rb = await b
        while c_heard.updates[-1].position != 1:  # an estimate tick may come first
            await c_heard.wait_for(len(c_heard.updates) + 1)
        await rb.release()  # c fits now
        rc = await c
        await rc.release()

    positions = [u.position for u in c_heard.updates]
    assert positions[0] == 2 and positions[-1] == 1 and positions == sorted(positions,
                                                                           reverse=True)
    # Per stream: updates, then exactly one grant, nothing after it (two streams interleave
    # freely: b's grant and c's move up come on different streams).
    assert events[-1] == "c:granted" and events.count("c:granted") == 1
    assert not any(e.startswith("b:queued") for e in events[events.index("b:granted"):])
    assert rb.updates == b_heard.updates and rc.updates == c_heard.updates


@over_backends
async def test_async_callback_and_a_free_bucket_grant_without_updates(daemon: Daemon) -> None:
    heard: list[WaitUpdate] = []

    async def on_wait(u: WaitUpdate) -> None:
        heard.append(u)

    async with Limiter(daemon.target) as lim:
        async with lim.reserve("s1", "tiny", input_tokens=10, max_output_tokens=0,
                               on_wait=on_wait) as r:
            assert r.grant is not None and r.grant.mode == "daemon" and not r.grant.replayed
            r.mark_called()
            await r.report(10, 0)
    assert heard == []
    [res] = daemon.settled()
    assert res.request_id == r.request_id and res.settlement is not None


@over_backends
async def test_broken_stream_reattaches_and_keeps_its_place(daemon: Daemon) -> None:
    go = asyncio.Event()
    cut = BreakStreams(after=1, n=1, before_cut=go)
    async with Limiter(daemon.target) as lim, grpc.aio.insecure_channel(
            daemon.target, interceptors=[cut]) as ch:
        cutting = Limiter(channel=ch)
        holder = await hold_all(lim)
        a_heard, d_heard = Heard(), Heard()
        a = asyncio.create_task(cutting.reserve(
            "s1", "tiny", input_tokens=500, max_output_tokens=0, max_wait=30,
            on_wait=a_heard).__aenter__())
        assert (await a_heard.wait_for()).position == 1
        d = asyncio.create_task(lim.reserve(
            "s1", "tiny", input_tokens=500, max_output_tokens=0, max_wait=30,
            on_wait=d_heard).__aenter__())
        assert (await d_heard.wait_for()).position == 2
        go.set()  # now cut a's stream: it must come back ahead of d
        again = await a_heard.wait_for(2)
        assert cut.broken == 1 and cutting.counters.stream_reattaches == 1
        assert again.position == 1 and again.waited_s >= a_heard.updates[0].waited_s

        await holder.release()  # 1000 back: a then d fit
        ra, rd = await a, await d
        assert ra.grant is not None and not ra.grant.replayed
        leases = {le.reservation_id for le in await daemon.open_leases()}
        assert leases == {ra.reservation_id, rd.reservation_id}
        await ra.release()
        await rd.release()
    by_request = [r.request_id for r in daemon.settled()]
    assert by_request.count(ra.request_id) == 1 and len(by_request) == 3


async def has_leases(daemon: Daemon, n: int) -> bool:
    return len(await daemon.open_leases()) == n


@over_backends
async def test_grant_made_while_detached_is_claimed_on_reattach(daemon: Daemon) -> None:
    """The stream is cut; while the client backs off, the holder releases and the daemon
    grants the detached waiter. The re-attach gets that same grant (replayed)."""
    async with Limiter(daemon.target) as lim, grpc.aio.insecure_channel(
            daemon.target, interceptors=[BreakStreams(after=1)]) as ch:
        holder = await hold_all(lim)

        async def backoff(_: float) -> None:
            if holder.settled:  # a later sleep (the keepalive's): just wait
                await asyncio.sleep(3600)
            await holder.release()
            await eventually(lambda: has_leases(daemon, 1), "the daemon grants the waiter")

        cutting = Limiter(channel=ch, sleep=backoff)
        async with cutting.reserve("s1", "tiny", input_tokens=500, max_output_tokens=0,
                                   max_wait=30, on_wait=Heard()) as r:
            assert r.grant is not None and r.grant.replayed
            [lease] = await daemon.open_leases()
            assert lease.reservation_id == r.reservation_id
            r.mark_called()
            await r.report(500, 0)
    assert [s.request_id for s in daemon.settled()].count(r.request_id) == 1


@over_backends
async def test_estimate_beyond_the_budget_gives_up_at_once(daemon: Daemon) -> None:
    async with Limiter(daemon.target) as lim:
        holder = await hold_all(lim)
        heard = Heard()
        with pytest.raises(WaitTooLong) as info:
            async with lim.reserve("s1", "tiny", input_tokens=1000, max_output_tokens=0,
                                   max_wait=60, on_wait=heard, wait_budget=20):
                raise AssertionError("not granted")
        # Decided on the first update (the daemon sends one per second as the estimate moves)
        # and the place is gone now, not after the re-attach grace.
        assert len(heard.updates) == 1 and info.value.retry_after_ms is not None
        assert info.value.retry_after_ms > 20_000
        assert (await daemon.bucket("tiny")).queue_depth == 0
        assert len(await daemon.open_leases()) == 1
        await holder.release()


@over_backends
async def test_fallback_on_the_estimate_hops_without_waiting(daemon: Daemon) -> None:
    called: list[str] = []

    async def attempt(params: dict[str, object], r: Reservation) -> Attempt[str]:
        called.append(str(params["model"]))
        return Attempt("ok", Usage(10, 5), ProviderMeta(http_status=200))

    heard = Heard()
    async with Limiter(daemon.target) as lim:
        holder = await hold_all(lim)
        result = await run_call(
            lim, scope="s1", params={"model": "tiny", "max_tokens": 0},
            attempt=attempt, estimate=lambda p: 1000, on_wait=heard,
            retry=RetryPolicy(max_elapsed=60),
            fallback=FallbackPolicy(("tiny", "claude-sonnet-x"),
                                    FallbackTriggers(limiter_wait=20)))
        assert (await daemon.bucket("tiny")).queue_depth == 0
        await holder.release()
    assert result.model == "claude-sonnet-x" and called == ["claude-sonnet-x"]
    assert [(h.from_model, h.reason) for h in result.path] == [("tiny", "limiter_wait")]
    assert len(heard.updates) == 1 and heard.updates[0].estimated_wait_s > 20
    assert lim.counters.fallbacks == 1
    # The holder and the sonnet call: the waiter on tiny never held anything.
    assert sorted(r.model for r in daemon.settled()) == ["claude-sonnet-x", "tiny"]


@over_backends
async def test_give_up_releases_a_grant_made_in_the_meantime(daemon: Daemon) -> None:
    """The callback frees the bucket (the daemon grants the waiter at once) and then raises:
    the client leaves, re-attaches with max_wait 0, finds the grant and releases it."""
    async with Limiter(daemon.target) as lim:
        holder = await hold_all(lim)

        async def on_wait(u: WaitUpdate) -> None:
            await holder.release()
            await eventually(lambda: has_leases(daemon, 1), "the daemon grants the waiter")
            raise LookupError("the browser went away")

        r = lim.reserve("s1", "tiny", input_tokens=500, max_output_tokens=0, max_wait=30,
                        on_wait=on_wait)
        with pytest.raises(LookupError):
            async with r:
                raise AssertionError("not granted")
        assert await daemon.open_leases() == []
    [held, waiter] = daemon.settled()
    assert waiter.request_id == r.request_id
    assert waiter.settlement is not None and waiter.settlement.state is State.RELEASED


async def mark_overloaded(lim: Limiter, model: str) -> None:
    for _ in range(3):  # overload_threshold
        async with lim.reserve("s1", model, input_tokens=1, max_output_tokens=1) as r:
            r.mark_called()
            await r.report(1, 0, outcome=pb.OVERLOADED)


@over_backends
async def test_overload_hint_hops_before_calling_the_provider(daemon: Daemon) -> None:
    called: list[str] = []

    async def attempt(params: dict[str, object], r: Reservation) -> Attempt[str]:
        called.append(str(params["model"]))
        return Attempt("ok", Usage(1, 1), ProviderMeta(http_status=200))

    async def call(hint: bool) -> str:
        result = await run_call(
            lim, scope="s1", params={"model": "claude-opus-x", "max_tokens": 1},
            attempt=attempt, estimate=lambda p: 1, retry=RetryPolicy(max_elapsed=10),
            fallback=FallbackPolicy(("claude-opus-x", "claude-haiku-x"),
                                    FallbackTriggers(overloaded_hint=hint)))
        return f"{result.model}:{','.join(h.reason for h in result.path)}"

    async with Limiter(daemon.target) as lim:
        await mark_overloaded(lim, "claude-opus-x")
        assert (await daemon.bucket("claude-opus-x")).overloaded_until_ms > 0
        assert await call(True) == "claude-haiku-x:overloaded_hint"
        assert await call(False) == "claude-opus-x:"
        with pytest.raises(ModelOverloadedHint):
            async with lim.reserve("s1", "claude-opus-x", input_tokens=1, max_output_tokens=1,
                                   overloaded_hint=True):
                raise AssertionError("not entered")
    assert called == ["claude-haiku-x", "claude-opus-x"]
    released = [r for r in daemon.settled() if r.settlement is not None
                and r.settlement.state is State.RELEASED]
    assert len(released) == 2  # the two grants given up on the hint
    assert all(r.settlement is not None and r.settlement.outcome is not Outcome.OK
               for r in released)



@over_backends
async def test_sync_limiter_on_wait_then_grant_and_give_up(daemon: Daemon) -> None:
    """SyncLimiter in a worker thread; the daemon and the holder on this loop."""
    loop = asyncio.get_running_loop()
    async with Limiter(daemon.target) as lim:
        holder = await hold_all(lim)
        first = asyncio.Event()
        heard: list[WaitUpdate] = []

        def on_wait(u: WaitUpdate) -> None:
            heard.append(u)
            loop.call_soon_threadsafe(first.set)

        def blocking() -> tuple[bool, str]:
            with SyncLimiter(daemon.target) as sl:
                with pytest.raises(WaitTooLong):
                    with sl.reserve("s1", "tiny", input_tokens=1000, max_output_tokens=0,
                                    max_wait=60, wait_budget=20):
                        raise AssertionError("not granted")
                with sl.reserve("s1", "tiny", input_tokens=500, max_output_tokens=0,
                                max_wait=30, on_wait=on_wait) as r:
                    r.mark_called()
                    r.report(500, 0)
                assert r.grant is not None
                return r.grant.replayed, r.request_id

        worker = asyncio.create_task(asyncio.to_thread(blocking))
        await asyncio.wait_for(first.wait(), 10)
        assert (await daemon.bucket("tiny")).queue_depth == 1  # the give-up left the queue
        await holder.release()
        replayed, request_id = await worker
    assert not replayed and heard[0].position == 1
    assert [r.request_id for r in daemon.settled()].count(request_id) == 1


@over_backends
async def test_overload_hint_on_a_queued_event_leaves_the_queue(daemon: Daemon) -> None:
    async with Limiter(daemon.target) as lim:
        await mark_overloaded(lim, "tiny")  # 3 input tokens used
        holder = lim.reserve("s1", "tiny", input_tokens=997, max_output_tokens=0)
        await holder.__aenter__()
        heard = Heard()
        with pytest.raises(ModelOverloadedHint):
            async with lim.reserve("s1", "tiny", input_tokens=100, max_output_tokens=0,
                                   max_wait=30, on_wait=heard, overloaded_hint=True):
                raise AssertionError("not granted")
        assert len(heard.updates) == 1 and heard.updates[0].model_overloaded
        assert (await daemon.bucket("tiny")).queue_depth == 0
        await holder.release()
    assert len(daemon.settled()) == 4  # 3 overloaded calls and the holder; the waiter none
