"""A duplicate Report with other figures (issue 10, item 10): refused with
FAILED_PRECONDITION, yet the provider pause it carries is applied and journaled."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from limiterd.clock import FakeClock
from limiterd.engine import Engine
from limiterd.ledger.errors import AlreadySettled
from limiterd.ledger.ledger import Granted, Rejected
from limiterd.ledger.model import AcquireRequest, Outcome
from limiterd.storage.sqlite import SqliteJournal
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.conftest import make_test_config


async def test_over_a_real_server(limiter: pb_grpc.LimiterStub) -> None:
    g = await limiter.Acquire(pb.AcquireRequest(scope="d", model="claude-x", input_tokens=10,
                                                max_output_tokens=10))
    ok = pb.ReportRequest(reservation_id=g.reservation_id, actual_input_tokens=8,
                          actual_output_tokens=3, outcome=pb.OK)
    first = await limiter.Report(ok)
    again = await limiter.Report(ok)  # the same Report: its first answer
    assert again.replayed and again.settlement == first.settlement
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await limiter.Report(pb.ReportRequest(reservation_id=g.reservation_id,
                                              outcome=pb.RATE_LIMITED, retry_after_ms=60_000))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "8 input and 3 output tokens, OK, and this Report differs; its 60 s provider " \
           "pause is applied" in (e.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as paused:
        await limiter.Acquire(pb.AcquireRequest(scope="d", model="claude-y", input_tokens=1))
    assert paused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 59_000 <= int(dict(paused.value.trailing_metadata())["retry-after-ms"]) <= 60_000


async def test_the_pause_is_journaled(tmp_path: Path) -> None:
    clock, db = FakeClock(), tmp_path / "dup.sqlite3"
    engine = Engine(make_test_config(), SqliteJournal(db, clock=clock), clock)
    await engine.start()
    g = await engine.acquire(AcquireRequest("d", "claude-x", "", 10, 10), 0)
    assert isinstance(g, Granted)
    await engine.report(g.reservation.id, 8, 3, Outcome.OK, 0)
    with pytest.raises(AlreadySettled):
        await engine.report(g.reservation.id, 0, 0, Outcome.RATE_LIMITED, 60)
    await engine.stop()
    later = FakeClock(clock.wall + 30)
    engine = Engine(make_test_config(), SqliteJournal(db, clock=later), later)
    await engine.start()
    try:
        refused = await engine.acquire(AcquireRequest("d", "claude-y", "", 1, 0), 0)
        assert isinstance(refused, Rejected) and refused.retry_after_s == pytest.approx(30)
    finally:
        await engine.stop()
