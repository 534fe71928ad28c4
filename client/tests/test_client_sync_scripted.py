"""The sync client against scripted daemon answers through grpc_testing, on its fake time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import grpc_testing  # type: ignore[import-untyped]
import pytest

from limiterd_client import (
    FailOpen,
    LimiterBusy,
    LimiterInvalidArgument,
    LimiterRejected,
    LimiterUnavailable,
    ReservationNotFound,
    SafeCapacity,
    SyncLimiter,
)
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb

T = TypeVar("T")
SERVICE = pb.DESCRIPTOR.services_by_name["Limiter"]
ACQUIRE = SERVICE.methods_by_name["Acquire"]
REPORT = SERVICE.methods_by_name["Report"]
RELEASE = SERVICE.methods_by_name["Release"]
OK = grpc.StatusCode.OK


class Harness:
    def __init__(self) -> None:
        self.time = grpc_testing.strict_fake_time(1_000.0)
        self.channel = grpc_testing.channel([SERVICE], self.time)
        self.pool = ThreadPoolExecutor(1)

    def limiter(self, **kw: Any) -> SyncLimiter:
        return SyncLimiter(channel=self.channel, clock=self.time.time,
                           sleep=self.time.sleep_for, keepalive=False, **kw)

    def run(self, fn: Callable[[], T]) -> Future[T]:
        return self.pool.submit(fn)

    def answer(self, method: Any, response: Any = None, code: grpc.StatusCode = OK,
               details: str = "", trailing: tuple[tuple[str, str], ...] = ()) -> Any:
        _md, request, rpc = self.channel.take_unary_unary(method)
        rpc.terminate(response, trailing, code, details)
        return request


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.pool.shutdown(wait=True)


def grant(rid: str = "r1", replayed: bool = False) -> pb.AcquireResponse:
    return pb.AcquireResponse(reservation_id=rid, lease_expires_at_ms=2_000_000,
                              granted_at_ms=1_000_000, reserved_requests=1,
                              reserved_input_tokens=10, reserved_output_tokens=20,
                              replayed=replayed)


def settled(rid: str = "r1") -> pb.ReportResponse:
    return pb.ReportResponse(settlement=pb.Settlement(reservation_id=rid, state=pb.REPORTED))


def test_unavailable_then_granted_reuses_request_id(h: Harness) -> None:
    lim = h.limiter()

    def app() -> tuple[str, str, bool]:
        with lim.reserve("s", "m", input_tokens=10, max_output_tokens=20) as r:
            r.mark_called()
            r.report(8, 5)
            return r.request_id, r.reservation_id, r.grant.replayed  # type: ignore[union-attr]

    fut = h.run(app)
    first = h.answer(ACQUIRE, code=grpc.StatusCode.UNAVAILABLE, details="connection refused")
    second = h.answer(ACQUIRE, grant(replayed=True))
    report = h.answer(REPORT, settled())
    request_id, rid, replayed = fut.result(timeout=10)
    assert first.request_id == second.request_id == request_id
    assert len(request_id) == 32 and rid == "r1" and replayed
    assert (report.reservation_id, report.actual_input_tokens,
            report.actual_output_tokens, report.outcome) == ("r1", 8, 5, pb.OK)
    assert lim.counters.acquire_retries == 1


def test_deadline_exceeded_is_retried_with_the_same_id_after_backoff(h: Harness) -> None:
    lim = h.limiter(transport_backoff=0.5, transport_attempts=3)

    def app() -> str:
        with lim.reserve("s", "m", input_tokens=1, max_output_tokens=1) as r:
            r.release()
            return r.request_id

    t0 = h.time.time()
    fut = h.run(app)
    first = h.answer(ACQUIRE, code=grpc.StatusCode.DEADLINE_EXCEEDED, details="deadline")
    second = h.answer(ACQUIRE, code=grpc.StatusCode.UNAVAILABLE, details="reset")
    third = h.answer(ACQUIRE, grant("r1", replayed=True))
    release = h.answer(RELEASE, pb.ReleaseResponse())
    assert fut.result(timeout=10) == first.request_id == second.request_id == third.request_id
    assert release.reservation_id == "r1"
    assert h.time.time() - t0 == pytest.approx(0.5 + 1.0)  # exponential, on the fake time
    assert lim.counters.acquire_retries == 2


def test_resource_exhausted_carries_retry_after(h: Harness) -> None:
    lim = h.limiter()
    fut = h.run(lambda: lim.reserve("s", "m", input_tokens=1, max_output_tokens=1,
                                    max_wait=0.5).__enter__())
    req = h.answer(ACQUIRE, code=grpc.StatusCode.RESOURCE_EXHAUSTED, details="wait too long",
                   trailing=(("retry-after-ms", "1250"),))
    with pytest.raises(LimiterBusy) as info:
        fut.result(timeout=10)
    assert info.value.retry_after_ms == 1250 and req.max_wait_ms == 500
    assert lim.counters.acquire_retries == 0  # not a transport failure: no retry


@pytest.mark.parametrize("code,exc", [
    (grpc.StatusCode.FAILED_PRECONDITION, LimiterRejected),
    (grpc.StatusCode.INVALID_ARGUMENT, LimiterInvalidArgument),
    (grpc.StatusCode.NOT_FOUND, ReservationNotFound),
])
def test_final_errors_map_to_types(h: Harness, code: grpc.StatusCode, exc: type) -> None:
    lim = h.limiter()
    fut = h.run(lambda: lim.reserve("s", "m", input_tokens=1, max_output_tokens=1).__enter__())
    h.answer(ACQUIRE, code=code, details="scope: too long")
    with pytest.raises(exc, match="scope"):
        fut.result(timeout=10)


def _down(h: Harness, n: int) -> None:
    for _ in range(n):
        h.answer(ACQUIRE, code=grpc.StatusCode.UNAVAILABLE, details="down")


def test_fail_closed_by_default(h: Harness) -> None:
    lim = h.limiter(transport_attempts=2)
    fut = h.run(lambda: lim.reserve("s", "m", input_tokens=1, max_output_tokens=1).__enter__())
    _down(h, 2)
    with pytest.raises(LimiterUnavailable, match="UNAVAILABLE"):
        fut.result(timeout=10)


def test_fail_open_is_counted(h: Harness) -> None:
    lim = h.limiter(transport_attempts=1, on_unavailable=FailOpen())

    def app() -> str:
        with lim.reserve("s", "m", input_tokens=1, max_output_tokens=1) as r:
            r.mark_called()
            r.report(1, 1)  # local: nothing is sent
            return r.mode

    fut = h.run(app)
    _down(h, 1)
    assert fut.result(timeout=10) == "open"
    assert lim.counters.fail_open == 1


def test_safe_capacity_enforced_locally_until_the_daemon_is_back(h: Harness) -> None:
    lim = h.limiter(transport_attempts=1,
                    on_unavailable=SafeCapacity(requests_per_minute=2, tokens_per_minute=1000))

    def one(max_wait: float = 0.0) -> str:
        with lim.reserve("s", "m", input_tokens=100, max_output_tokens=100,
                         max_wait=max_wait) as r:
            r.mark_called()
            r.report(50, 50)
            return r.mode

    for _ in range(2):
        fut = h.run(one)
        _down(h, 1)
        assert fut.result(timeout=10) == "local"
    fut = h.run(one)
    _down(h, 1)
    with pytest.raises(LimiterBusy) as info:
        fut.result(timeout=10)
    assert info.value.retry_after_ms == 30_000  # one request refills in 30 s (2/min)
    # Willing to wait: the client waits (fake time) for the local bucket to refill, asking
    # the daemon again every second meanwhile.
    t0 = h.time.time()
    fut = h.run(lambda: one(max_wait=60))
    _down(h, 1 + 30)  # the first try, then a probe a second until the refill
    assert fut.result(timeout=10) == "local"
    assert h.time.time() - t0 == pytest.approx(30.0)
    # A caller waiting in it goes back to the daemon as soon as the daemon answers.
    fut = h.run(lambda: one(max_wait=60))
    _down(h, 1 + 2)
    h.answer(ACQUIRE, grant("back"))
    h.answer(REPORT, settled("back"))
    assert fut.result(timeout=10) == "daemon"
    assert h.time.time() - t0 == pytest.approx(30.0 + 3.0)
    # The daemon is back: the next reservation goes to it at once.
    fut = h.run(one)
    h.answer(ACQUIRE, grant("next"))
    h.answer(REPORT, settled("next"))
    assert fut.result(timeout=10) == "daemon"
    assert lim.counters.local_grants == 3


def test_too_big_for_safe_capacity_is_rejected(h: Harness) -> None:
    lim = h.limiter(transport_attempts=1,
                    on_unavailable=SafeCapacity(requests_per_minute=5, tokens_per_minute=100))
    fut = h.run(lambda: lim.reserve("s", "m", input_tokens=100, max_output_tokens=1).__enter__())
    _down(h, 1)
    with pytest.raises(LimiterRejected, match="safe capacity"):
        fut.result(timeout=10)


def test_exception_before_call_releases_after_call_reports_error(h: Harness) -> None:
    lim = h.limiter()

    def before() -> None:
        with lim.reserve("s", "m", input_tokens=10, max_output_tokens=20):
            raise RuntimeError("prompt building failed")

    fut = h.run(before)
    h.answer(ACQUIRE, grant("a"))
    assert h.answer(RELEASE, pb.ReleaseResponse()).reservation_id == "a"
    with pytest.raises(RuntimeError):
        fut.result(timeout=10)

    def after() -> None:
        with lim.reserve("s", "m", input_tokens=10, max_output_tokens=20) as r:
            r.mark_called()
            r.record_usage(10, 3)
            raise RuntimeError("socket closed")

    fut = h.run(after)
    h.answer(ACQUIRE, grant("b"))
    rep = h.answer(REPORT, settled("b"))
    with pytest.raises(RuntimeError):
        fut.result(timeout=10)
    assert (rep.reservation_id, rep.outcome, rep.actual_input_tokens,
            rep.actual_output_tokens) == ("b", pb.ERROR, 10, 3)


def test_leaving_without_report_reports_reserved_amounts(h: Harness) -> None:
    lim = h.limiter()

    def app() -> None:
        with lim.reserve("s", "m", input_tokens=10, max_output_tokens=20) as r:
            r.mark_called()

    fut = h.run(app)
    h.answer(ACQUIRE, grant("c"))
    rep = h.answer(REPORT, settled("c"))
    fut.result(timeout=10)
    assert (rep.outcome, rep.actual_input_tokens, rep.actual_output_tokens) == (pb.OK, 10, 20)
