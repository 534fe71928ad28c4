"""MarkSent end to end (issue 15): a real daemon over a real channel, on both ledgers.

A caller that promises marks_sent and takes a bucket down from full is asked for a mark; the
bucket's refill is held until the mark, then resumes one allowance later. Real clock (the
shared ledger refills on Redis' clock): bounds are taken from times measured around the calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from limiterd.config.loader import parse_config
from limiterd.server import RunningServer, running_server
from limiterd.shared.settings import SharedLedger
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.conftest import TEST_CONFIG_TOML
from tests.metrics_scrape import calls_counted, scrape_once
from tests.redis_server import redis_server

Code = grpc.StatusCode
ALLOWANCE_S = 0.2
TINY_PER_S = 1000 / 60  # "tiny" output tokens refilled per second


@pytest.fixture(params=["local", "redis"])
async def limiter(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[
        tuple[pb_grpc.LimiterStub, pb_grpc.AdminStub]]:
    # "out": output tokens only (1000 a minute), so a call taking none leaves it full.
    base = parse_config(TEST_CONFIG_TOML + '[models."out"]\noutput_tokens_per_minute = 1000\n',
                        "<tests>")
    config = replace(base, settings=replace(base.settings, refill_allowance_s=ALLOWANCE_S))

    async def talk(srv: RunningServer) -> AsyncIterator[
            tuple[pb_grpc.LimiterStub, pb_grpc.AdminStub]]:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            yield pb_grpc.LimiterStub(ch), pb_grpc.AdminStub(ch)

    if request.param == "local":
        async with running_server(config=config) as srv:
            async for stubs in talk(srv):
                yield stubs
        return
    with redis_server(tmp_path / "redis") as server:
        async with running_server(config=config, shared=SharedLedger(server.url)) as srv:
            async for stubs in talk(srv):
                yield stubs


def acq(out: int, marks: bool = True, wait_ms: int = 0, model: str = "tiny"
        ) -> pb.AcquireRequest:
    return pb.AcquireRequest(scope="s1", model=model, input_tokens=0, max_output_tokens=out,
                             marks_sent=marks, max_wait_ms=wait_ms)


async def output_level(admin: pb_grpc.AdminStub, model: str = "tiny") -> float:
    buckets = (await admin.GetBuckets(pb.GetBucketsRequest(model=model))).buckets
    [b] = [b for b in buckets if not b.user]
    return next(d.level for d in b.dimensions if d.name == "output_tokens")


async def test_a_burst_is_held_until_the_mark_then_one_allowance(
    limiter: tuple[pb_grpc.LimiterStub, pb_grpc.AdminStub],
) -> None:
    stub, admin = limiter
    burst = await stub.Acquire(acq(1000))  # from full to empty
    assert burst.mark_sent_wanted
    await asyncio.sleep(ALLOWANCE_S * 2)  # longer than the allowance: still no refill
    assert await output_level(admin) == pytest.approx(0.0, abs=1e-6)
    sent = time.time()
    await stub.MarkSent(pb.MarkSentRequest(reservation_id=burst.reservation_id))
    waiter = await stub.Acquire(acq(10, marks=False, wait_ms=10_000))
    assert not waiter.mark_sent_wanted
    waited = waiter.granted_at_ms / 1000 - sent
    assert waited >= ALLOWANCE_S + 10 / TINY_PER_S - 0.005, f"granted {waited:.3f} s after"


async def test_a_caller_that_does_not_promise_is_not_asked(
    limiter: tuple[pb_grpc.LimiterStub, pb_grpc.AdminStub],
) -> None:
    stub, _ = limiter
    g = await stub.Acquire(acq(990, marks=False))  # charged the allowance at once instead
    assert not g.mark_sent_wanted
    later = await stub.Acquire(acq(0, marks=True))  # nothing taken from full: no hold
    assert not later.mark_sent_wanted


async def test_release_of_an_unsent_holder_ends_the_hold(
    limiter: tuple[pb_grpc.LimiterStub, pb_grpc.AdminStub],
) -> None:
    stub, admin = limiter
    burst = await stub.Acquire(acq(990))
    assert burst.mark_sent_wanted
    await stub.Release(pb.ReleaseRequest(reservation_id=burst.reservation_id))
    assert await output_level(admin) == pytest.approx(1000.0, abs=1e-6)
    again = await stub.Acquire(acq(1000))  # full again: a new hold, a new mark wanted
    assert again.mark_sent_wanted


async def test_mark_sent_validates_and_is_idempotent(
    limiter: tuple[pb_grpc.LimiterStub, pb_grpc.AdminStub],
) -> None:
    stub, _ = limiter
    for bad in ("", "not-hex"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.MarkSent(pb.MarkSentRequest(reservation_id=bad))
        assert err.value.code() == Code.INVALID_ARGUMENT
        assert "reservation_id" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.MarkSent(pb.MarkSentRequest(reservation_id="0" * 32))
    assert err.value.code() == Code.NOT_FOUND
    g = await stub.Acquire(acq(1000))
    for _ in range(2):  # again: the same empty answer
        assert await stub.MarkSent(pb.MarkSentRequest(reservation_id=g.reservation_id)) \
            == pb.MarkSentResponse()
    await stub.Report(pb.ReportRequest(reservation_id=g.reservation_id, outcome=pb.OK,
                                       actual_output_tokens=1000))
    # Late (after the Report): nothing to do, still no error.
    await stub.MarkSent(pb.MarkSentRequest(reservation_id=g.reservation_id))


async def test_a_mark_from_an_earlier_hold_does_not_end_this_one_and_a_report_does(
    limiter: tuple[pb_grpc.LimiterStub, pb_grpc.AdminStub],
) -> None:
    stub, admin = limiter
    first = await stub.Acquire(acq(1000, model="out"))  # hold 1
    early = await stub.Acquire(acq(0, model="out"))  # granted during hold 1: may end it
    assert first.mark_sent_wanted and early.mark_sent_wanted
    await stub.Release(pb.ReleaseRequest(reservation_id=first.reservation_id))  # ends hold 1
    holder = await stub.Acquire(acq(1000, model="out"))  # full again: hold 2
    assert holder.mark_sent_wanted
    await stub.MarkSent(pb.MarkSentRequest(reservation_id=early.reservation_id))
    await asyncio.sleep(ALLOWANCE_S * 2)
    assert await output_level(admin, "out") == pytest.approx(0.0, abs=1e-6)  # still held
    reported = time.time()
    await stub.Report(pb.ReportRequest(reservation_id=holder.reservation_id, outcome=pb.OK,
                                       actual_output_tokens=1000))
    waiter = await stub.Acquire(acq(10, marks=False, wait_ms=10_000, model="out"))
    waited = waiter.granted_at_ms / 1000 - reported
    # Refill resumed at the Report (no mark came), without an allowance on top.
    assert waited >= 10 / TINY_PER_S - 0.005, f"granted {waited:.3f} s after the Report"


async def test_mark_sent_is_counted_by_the_rpc_metrics() -> None:
    base = parse_config(TEST_CONFIG_TOML, "<tests>")
    config = replace(base, settings=replace(base.settings, refill_allowance_s=ALLOWANCE_S))
    async with running_server(config=config, metrics_listen="127.0.0.1:0") as srv, \
            grpc.aio.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LimiterStub(ch)
        g = await stub.Acquire(acq(1000))
        await stub.MarkSent(pb.MarkSentRequest(reservation_id=g.reservation_id))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.MarkSent(pb.MarkSentRequest(reservation_id=""))
        after = await scrape_once(srv.metrics_target, calls_counted("MarkSent", 2))
        counted = ("limiterd_rpc_duration_seconds_count", (("method", "MarkSent"),))
        assert after[counted] == 2
