"""The async Limiter against a real limiterd: reserve/report semantics, never a leak."""

from __future__ import annotations

import asyncio
import socket

import grpc
import grpc.aio
import pytest
from client_daemon import CLIENT_TEST_CONFIG, Daemon, over_backends
from wire import LoseAnswers, Recorder

from limiterd.clock import FakeClock
from limiterd.config.loader import parse_config
from limiterd.ledger.model import Outcome, State
from limiterd.server import running_server
from limiterd_client import (
    FailOpen,
    Limiter,
    LimiterBusy,
    LimiterInvalidArgument,
    LimiterRejected,
    LimiterUnavailable,
    SafeCapacity,
)


class ManualSleep:
    """An injected sleep that returns only when the test ticks it."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self._gate: asyncio.Queue[None] = asyncio.Queue()
        self._sleeping = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        self._sleeping.set()
        await self._gate.get()

    async def asleep(self) -> None:
        """Until the sleeper sleeps (again): whatever it did after the last tick is done."""
        await asyncio.wait_for(self._sleeping.wait(), 10)

    async def tick(self) -> None:
        await self.asleep()
        self._sleeping.clear()
        self._gate.put_nowait(None)
        await self.asleep()  # the woken keepalive made its RPC and sleeps again


def dead_target() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"127.0.0.1:{port}"


@over_backends
async def test_reserve_report_settles_with_actual_usage(daemon: Daemon) -> None:
    async with Limiter(daemon.target) as lim:
        async with lim.reserve("s1", "tiny", input_tokens=300, max_output_tokens=400) as r:
            assert [le.reservation_id for le in await daemon.open_leases()] == [r.reservation_id]
            r.mark_called()
            s = await r.report(250, 100)
        assert s is not None and s.refunded_input_tokens == 50 and s.refunded_output_tokens == 300
    [res] = daemon.settled()
    assert res.settlement is not None and res.settlement.outcome is Outcome.OK
    assert res.request_id == r.request_id and len(r.request_id) == 32


@over_backends
async def test_exception_before_the_call_releases(daemon: Daemon) -> None:
    async with Limiter(daemon.target) as lim:
        with pytest.raises(KeyError):
            async with lim.reserve("s1", "tiny", input_tokens=10, max_output_tokens=10):
                raise KeyError("prompt")
    [res] = daemon.settled()
    assert res.settlement is not None and res.settlement.state is State.RELEASED


@over_backends
async def test_exception_after_the_call_reports_error_with_best_known_usage(
        daemon: Daemon) -> None:
    async with Limiter(daemon.target) as lim:
        with pytest.raises(ConnectionError):
            async with lim.reserve("s1", "tiny", input_tokens=100, max_output_tokens=100) as r:
                r.mark_called()
                r.record_usage(90, 7)
                raise ConnectionError("provider hung up")
    [res] = daemon.settled()
    st = res.settlement
    assert st is not None and st.state is State.REPORTED and st.outcome is Outcome.ERROR
    assert (st.refunded.input_tokens, st.refunded.output_tokens) == (10, 93)


@over_backends
async def test_cancelled_block_reports_cancelled(daemon: Daemon) -> None:
    async with Limiter(daemon.target) as lim:
        started = asyncio.Event()

        async def call() -> None:
            async with lim.reserve("s1", "tiny", input_tokens=10, max_output_tokens=10) as r:
                r.mark_called()
                started.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(call())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    [res] = daemon.settled()
    assert res.settlement is not None and res.settlement.outcome is Outcome.CANCELLED


@over_backends
async def test_leaving_without_report_reports_the_reserved_amounts(daemon: Daemon) -> None:
    async with Limiter(daemon.target) as lim:
        async with lim.reserve("s1", "tiny", input_tokens=100, max_output_tokens=200) as r:
            r.mark_called()
    [res] = daemon.settled()
    st = res.settlement
    assert st is not None and st.outcome is Outcome.OK
    assert st.refunded.input_tokens == st.refunded.output_tokens == 0


@over_backends
async def test_double_settle_is_refused(daemon: Daemon) -> None:
    async with Limiter(daemon.target) as lim:
        async with lim.reserve("s1", "tiny", input_tokens=1, max_output_tokens=1) as r:
            await r.release()
            with pytest.raises(RuntimeError, match="already settled"):
                await r.report(1, 1)


async def test_keepalive_extends_the_lease_before_it_ends() -> None:
    clock = FakeClock()
    config = parse_config(CLIENT_TEST_CONFIG, "<client tests>")
    async with running_server(config=config, clock=clock) as srv, \
            grpc.aio.insecure_channel(srv.target) as ch:
        daemon, sleep = Daemon(srv, ch), ManualSleep()
        async with Limiter(daemon.target, sleep=sleep, lease_ms=2000) as lim:
            async with lim.reserve("s1", "tiny", input_tokens=1, max_output_tokens=1) as r:
                first_expiry = r.lease_expires_at_ms
                await sleep.asleep()
                assert sleep.asked == [1.0]  # half the lease
                clock.advance(1.0)
                await sleep.tick()
                assert r.keepalives == 1 and r.lease_expires_at_ms == first_expiry + 1000
                [lease] = await daemon.open_leases()
                assert lease.lease_expires_at_ms == r.lease_expires_at_ms
                r.mark_called()
                await r.report(1, 1)


@over_backends
async def test_busy_daemon_answers_resource_exhausted_with_retry_after(daemon: Daemon) -> None:
    async with Limiter(daemon.target) as lim:
        async with lim.reserve("s1", "claude-scarce-1", input_tokens=1, max_output_tokens=1):
            async with lim.reserve("s1", "claude-scarce-1", input_tokens=1, max_output_tokens=1):
                with pytest.raises(LimiterBusy) as info:
                    async with lim.reserve("s1", "claude-scarce-1", input_tokens=1,
                                           max_output_tokens=1, max_wait=0.05):
                        pass
                assert info.value.retry_after_ms is not None
                assert info.value.retry_after_ms > 1000


@over_backends
async def test_never_fits_and_invalid_argument(daemon: Daemon) -> None:
    async with Limiter(daemon.target) as lim:
        with pytest.raises(LimiterRejected):
            async with lim.reserve("s1", "tiny", input_tokens=5000, max_output_tokens=1):
                pass
        with pytest.raises(LimiterInvalidArgument, match="scope"):
            async with lim.reserve("x" * 300, "tiny", input_tokens=1, max_output_tokens=1):
                pass
        with pytest.raises(ValueError, match="input_tokens"):
            lim.reserve("s1", "tiny", input_tokens=-1, max_output_tokens=1)


async def test_down_daemon_fails_closed_by_default() -> None:
    async with Limiter(dead_target(), transport_backoff=0.001, rpc_timeout=2) as lim:
        with pytest.raises(LimiterUnavailable):
            async with lim.reserve("s1", "tiny", input_tokens=1, max_output_tokens=1):
                raise AssertionError("must not run")
        assert lim.counters.acquire_retries == 2


async def test_down_daemon_fail_open_and_safe_capacity() -> None:
    target = dead_target()
    async with Limiter(target, on_unavailable=FailOpen(), transport_attempts=1) as lim:
        async with lim.reserve("s1", "tiny", input_tokens=1, max_output_tokens=1) as r:
            assert r.mode == "open"
        assert lim.counters.fail_open == 1
    safe = SafeCapacity(requests_per_minute=1, tokens_per_minute=100)
    async with Limiter(target, on_unavailable=safe, transport_attempts=1) as lim:
        async with lim.reserve("s1", "tiny", input_tokens=10, max_output_tokens=10) as r:
            assert r.mode == "local"
            r.mark_called()
            await r.report(5, 5)
        with pytest.raises(LimiterBusy):
            async with lim.reserve("s1", "tiny", input_tokens=10, max_output_tokens=10):
                pass


@over_backends
async def test_lost_acquire_answer_is_retried_with_the_same_request_id_and_replayed(
        daemon: Daemon) -> None:
    rec = Recorder()
    channel = grpc.aio.insecure_channel(daemon.target, interceptors=[LoseAnswers("Acquire"), rec])
    async with channel:
        lim = Limiter(channel=channel, transport_backoff=0.001)
        async with lim.reserve("s1", "tiny", input_tokens=10, max_output_tokens=10) as r:
            assert r.grant is not None and r.grant.replayed
            # the daemon holds exactly one reservation for the two Acquires
            [lease] = await daemon.open_leases()
            assert lease.reservation_id == r.reservation_id and lease.request_id == r.request_id
            r.mark_called()
            await r.report(10, 10)
        sent = rec.of("Acquire")
        assert len(sent) == 2 and sent[0].request_id == sent[1].request_id == r.request_id
    assert lim.counters.acquire_retries == 1
    assert len(daemon.settled()) == 1


@pytest.mark.parametrize("keepalive", [True, False])
async def test_keepalive_keeps_a_long_call_past_its_first_lease(keepalive: bool) -> None:
    """The daemon runs on a FakeClock; the client's keepalive sleeps are ticked by hand."""
    clock = FakeClock()
    config = parse_config(CLIENT_TEST_CONFIG, "<client tests>")
    async with running_server(config=config, clock=clock) as srv:
        sleep = ManualSleep()
        async with Limiter(srv.target, sleep=sleep, lease_ms=1000, keepalive=keepalive) as lim:
            async with lim.reserve("s1", "tiny", input_tokens=1, max_output_tokens=1) as r:
                r.mark_called()
                rid = r.reservation_id
                clock.advance(0.6)
                if keepalive:
                    await sleep.tick()  # half the lease: KeepAlive -> expires at 1.6 s
                    assert sleep.asked[0] == 0.5 and r.keepalives == 1
                clock.advance(0.6)  # 1.2 s: past the first lease (expiry runs in advance())
                held = srv.engine.ledger.get(rid)
                assert held is not None
                if keepalive:
                    assert held.settlement is None  # still open: the call goes on
                    await r.report(1, 1)
                else:
                    assert held.settlement is not None
                    assert held.settlement.state is State.EXPIRED
        assert srv.engine.ledger.open_count == 0
