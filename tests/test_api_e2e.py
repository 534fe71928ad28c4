"""End to end: a real grpc.aio daemon on an ephemeral port, called over a real channel."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from limiterd.server import RunningServer
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.conftest import BACKENDS, TEAM_A, eventually

Code = grpc.StatusCode
# One suite, both ledgers: every test here runs against the local one and the shared one.
pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


def acq(**kw: object) -> pb.AcquireRequest:
    base: dict[str, object] = {"scope": "s1", "model": "tiny", "input_tokens": 100,
                               "max_output_tokens": 100}
    base.update(kw)
    return pb.AcquireRequest(**base)  # type: ignore[arg-type]


async def open_leases(admin: pb_grpc.AdminStub) -> list[pb.Lease]:
    return list((await admin.ListLeases(pb.ListLeasesRequest())).leases)


async def queue_depth(admin: pb_grpc.AdminStub) -> int:
    return (await admin.GetBuckets(pb.GetBucketsRequest(model="tiny"))).buckets[0].queue_depth


# These tests run on the real clock (the shared ledger refills on Redis' clock): they wait for
# the daemon to reach a state, and bound what refill can add by the time they measured.
TINY_PER_S = 1000 / 60  # "tiny" tokens refilled per second


async def test_full_cycle_acquire_report(
    limiter: pb_grpc.LimiterStub, admin: pb_grpc.AdminStub
) -> None:
    before = time.time()
    grant = await limiter.Acquire(acq(input_tokens=300, max_output_tokens=400))
    assert len(grant.reservation_id) == 32
    assert (grant.reserved_requests, grant.reserved_input_tokens,
            grant.reserved_output_tokens) == (1, 300, 400)
    # The configured default lease.
    assert grant.lease_expires_at_ms >= before * 1000 + 60_000 - 5
    assert [lease.reservation_id for lease in await open_leases(admin)] == [grant.reservation_id]

    report = await limiter.Report(pb.ReportRequest(
        reservation_id=grant.reservation_id, actual_input_tokens=250,
        actual_output_tokens=450, outcome=pb.OK))
    s = report.settlement
    assert s.state == pb.REPORTED and not report.replayed
    assert (s.refunded_input_tokens, s.overrun_output_tokens) == (50, 50)
    assert await open_leases(admin) == []

    buckets = (await admin.GetBuckets(pb.GetBucketsRequest(model="tiny"))).buckets
    refill = (time.time() - before) * TINY_PER_S + 0.01
    dims = {d.name: d for d in buckets[0].dimensions}
    # 300 - 50 refunded = 250 in; 400 + 50 overrun = 450 out, plus the refill meanwhile.
    assert 750 <= dims["input_tokens"].level <= 750 + refill
    assert 550 <= dims["output_tokens"].level <= 550 + refill


async def test_race_never_grants_more_than_capacity(
    limiter: pb_grpc.LimiterStub, daemon: RunningServer
) -> None:
    """250 concurrent Acquires on a 10-request bucket: at most 10 + refill granted."""
    start = time.time()
    calls = [limiter.Acquire(acq(scope="race", input_tokens=1, max_output_tokens=1))
             for _ in range(250)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    elapsed = time.time() - start
    granted = [r for r in results if isinstance(r, pb.AcquireResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(granted) + len(refused) == 250
    assert all(e.code() == Code.RESOURCE_EXHAUSTED for e in refused)
    allowed = 10 + 10 * elapsed / 60.0
    assert 10 <= len(granted) <= allowed
    assert len({g.reservation_id for g in granted}) == len(granted)


async def test_waiter_is_granted_when_capacity_returns(
    limiter: pb_grpc.LimiterStub, admin: pb_grpc.AdminStub
) -> None:
    big = await limiter.Acquire(acq(input_tokens=1000, max_output_tokens=0))
    started = time.monotonic()
    waiting = asyncio.ensure_future(  # 500 tokens refill in 30 s: only the release grants it
        limiter.Acquire(acq(input_tokens=500, max_output_tokens=0, max_wait_ms=20_000))
    )
    await eventually(lambda: has_depth(admin, 1), "the second Acquire waits")
    await limiter.Release(pb.ReleaseRequest(reservation_id=big.reservation_id))
    grant = await waiting  # within its max wait (20 s), or the call fails
    assert grant.reserved_input_tokens == 500
    assert 0 < grant.waited_ms <= (time.monotonic() - started) * 1000 + 1


async def test_try_once_fails_with_retry_after(limiter: pb_grpc.LimiterStub) -> None:
    # From before the first grant: a loaded machine may pause between the two calls, and
    # what refills meanwhile shortens the retry-after too.
    started = time.monotonic()
    await limiter.Acquire(acq(input_tokens=1000, max_output_tokens=0))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await limiter.Acquire(acq(input_tokens=600, max_output_tokens=0))
    elapsed_ms = (time.monotonic() - started) * 1000
    e = err.value
    assert e.code() == Code.RESOURCE_EXHAUSTED
    trailing = dict(e.trailing_metadata() or ())
    retry_ms = int(trailing["retry-after-ms"])
    # 600 tokens at 1000/min refill: 36 s, less what refilled since the first grant.
    assert 36_000 - elapsed_ms - 100 <= retry_ms <= 36_100
    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.seconds * 1000 + info.retry_delay.nanos // 10**6 == retry_ms


async def has_depth(admin: pb_grpc.AdminStub, n: int) -> bool:
    return await queue_depth(admin) == n


async def test_grant_never_after_max_wait(
    limiter: pb_grpc.LimiterStub, admin: pb_grpc.AdminStub
) -> None:
    await limiter.Acquire(acq(input_tokens=1000, max_output_tokens=0))
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        # 100 tokens refill in 6 s; the wait allows 0.3 s.
        await limiter.Acquire(acq(input_tokens=100, max_output_tokens=0, max_wait_ms=300))
    waited = time.monotonic() - started
    assert err.value.code() == Code.RESOURCE_EXHAUSTED
    assert waited >= 0.29
    assert len(await open_leases(admin)) == 1  # only the first


async def test_grant_never_after_grpc_deadline(
    limiter: pb_grpc.LimiterStub, admin: pb_grpc.AdminStub
) -> None:
    await limiter.Acquire(acq(input_tokens=1000, max_output_tokens=0))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await limiter.Acquire(
            acq(input_tokens=100, max_output_tokens=0, max_wait_ms=30_000), timeout=0.3
        )
    assert err.value.code() in (Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED)
    await eventually(lambda: has_depth(admin, 0), "the timed-out Acquire left the queue")
    assert len(await open_leases(admin)) == 1


async def test_cancelled_call_leaves_the_queue(
    limiter: pb_grpc.LimiterStub, admin: pb_grpc.AdminStub
) -> None:
    await limiter.Acquire(acq(input_tokens=1000, max_output_tokens=0))
    call = limiter.Acquire(acq(input_tokens=500, max_output_tokens=0, max_wait_ms=30_000))
    await eventually(lambda: has_depth(admin, 1), "the Acquire waits")
    call.cancel()
    await eventually(lambda: has_depth(admin, 0), "the cancelled Acquire left the queue")
    assert len(await open_leases(admin)) == 1


async def test_never_fits_fails_at_once(limiter: pb_grpc.LimiterStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await limiter.Acquire(acq(input_tokens=1001, max_wait_ms=10_000))
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert "input_tokens" in err.value.details() and "1000" in err.value.details()


async def test_user_limits_apply_per_user(limiter: pb_grpc.LimiterStub) -> None:
    for _ in range(3):
        await limiter.Acquire(acq(user="u1", input_tokens=1, max_output_tokens=1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await limiter.Acquire(acq(user="u1", input_tokens=1, max_output_tokens=1))
    assert err.value.code() == Code.RESOURCE_EXHAUSTED
    # Another user still gets the scope x model capacity that is left.
    await limiter.Acquire(acq(user="u2", input_tokens=1, max_output_tokens=1))


async def test_acquire_is_idempotent_by_request_id(
    limiter: pb_grpc.LimiterStub, admin: pb_grpc.AdminStub
) -> None:
    first = await limiter.Acquire(acq(request_id="req-1"))
    again = await limiter.Acquire(acq(request_id="req-1"))
    assert again.reservation_id == first.reservation_id and again.replayed
    assert len(await open_leases(admin)) == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await limiter.Acquire(acq(request_id="req-1", input_tokens=5))
    assert err.value.code() == Code.INVALID_ARGUMENT and "request_id" in err.value.details()


async def test_report_and_release_are_idempotent(limiter: pb_grpc.LimiterStub) -> None:
    g = await limiter.Acquire(acq())
    rep = pb.ReportRequest(reservation_id=g.reservation_id, actual_input_tokens=10,
                           actual_output_tokens=10, outcome=pb.OK)
    first = await limiter.Report(rep)
    second = await limiter.Report(rep)
    assert second.replayed and second.settlement == first.settlement
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await limiter.Release(pb.ReleaseRequest(reservation_id=g.reservation_id))
    assert err.value.code() == Code.FAILED_PRECONDITION and "reported" in err.value.details()

    g2 = await limiter.Acquire(acq())
    r1 = await limiter.Release(pb.ReleaseRequest(reservation_id=g2.reservation_id))
    r2 = await limiter.Release(pb.ReleaseRequest(reservation_id=g2.reservation_id))
    assert r1.settlement.state == pb.RELEASED and r2.replayed
    assert r2.settlement == r1.settlement


async def test_unknown_ids_are_not_found(limiter: pb_grpc.LimiterStub) -> None:
    unknown = "0" * 32
    for call in (
        limiter.Report(pb.ReportRequest(reservation_id=unknown, outcome=pb.OK)),
        limiter.Release(pb.ReleaseRequest(reservation_id=unknown)),
        limiter.KeepAlive(pb.KeepAliveRequest(reservation_id=unknown)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == Code.NOT_FOUND
        assert "reservation_id" in err.value.details()


async def test_keep_alive_extends_the_lease(limiter: pb_grpc.LimiterStub) -> None:
    g = await limiter.Acquire(acq(lease_ms=1000))
    k = await limiter.KeepAlive(pb.KeepAliveRequest(reservation_id=g.reservation_id,
                                                    lease_ms=120_000))
    assert k.lease_expires_at_ms >= g.lease_expires_at_ms + 118_000


async def test_rate_limited_report_pauses_the_scope_and_model(
    limiter: pb_grpc.LimiterStub, admin: pb_grpc.AdminStub
) -> None:
    g = await limiter.Acquire(acq(model="claude-x"))
    await limiter.Report(pb.ReportRequest(reservation_id=g.reservation_id,
                                          outcome=pb.RATE_LIMITED, retry_after_ms=20_000))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await limiter.Acquire(acq(model="claude-x"))
    assert err.value.code() == Code.RESOURCE_EXHAUSTED
    assert 19_000 <= int(dict(err.value.trailing_metadata())["retry-after-ms"]) <= 20_000
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the whole "claude-*" budget is
        await limiter.Acquire(acq(model="claude-y"))
    assert err.value.code() == Code.RESOURCE_EXHAUSTED
    await limiter.Acquire(acq(model="tiny"))  # another budget is not paused
    await limiter.Acquire(acq(model="claude-x", scope="s2"))  # nor another scope
    buckets = (await admin.GetBuckets(pb.GetBucketsRequest(model="claude-x", scope="s1"))).buckets
    assert buckets[0].paused_until_ms > 0


BAD_ACQUIRES = [
    ({"scope": ""}, "scope"),
    ({"scope": "x" * 257}, "scope"),
    ({"model": ""}, "model"),
    ({"model": "m" * 300}, "model"),
    ({"user": "u" * 257}, "user"),
    ({"user": "bad\nuser"}, "user"),
    ({"input_tokens": -1}, "input_tokens"),
    ({"max_output_tokens": -5}, "max_output_tokens"),
    ({"input_tokens": 10**13}, "input_tokens"),
    ({"max_wait_ms": -1}, "max_wait_ms"),
    ({"max_wait_ms": 60_001}, "max_wait_ms"),
    ({"lease_ms": -1}, "lease_ms"),
    ({"lease_ms": 600_001}, "lease_ms"),
    ({"request_id": "r" * 129}, "request_id"),
    ({"model": "no-such-model"}, "model"),
]


@pytest.mark.parametrize(("fields", "name"), BAD_ACQUIRES)
async def test_bad_acquire_fields_are_named(
    limiter: pb_grpc.LimiterStub, admin: pb_grpc.AdminStub, fields: dict[str, object], name: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await limiter.Acquire(acq(**fields))
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{name}:"), err.value.details()
    assert await open_leases(admin) == []


@pytest.mark.parametrize(("request_", "name"), [
    (pb.ReportRequest(reservation_id="nope", outcome=pb.OK), "reservation_id"),
    (pb.ReportRequest(reservation_id="A" * 32, outcome=pb.OK), "reservation_id"),
    (pb.ReportRequest(reservation_id="a" * 32), "outcome"),
    (pb.ReportRequest(reservation_id="a" * 32, outcome=pb.OK, actual_input_tokens=-1),
     "actual_input_tokens"),
    (pb.ReportRequest(reservation_id="a" * 32, outcome=pb.OK, actual_output_tokens=-1),
     "actual_output_tokens"),
    (pb.ReportRequest(reservation_id="a" * 32, outcome=pb.OK, retry_after_ms=-3),
     "retry_after_ms"),
    (pb.ReportRequest(reservation_id="a" * 32, outcome=pb.OK,
                      provider=pb.ProviderInfo(http_status=1000)), "provider.http_status"),
])
async def test_bad_report_fields_are_named(
    limiter: pb_grpc.LimiterStub, request_: pb.ReportRequest, name: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await limiter.Report(request_)
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{name}:"), err.value.details()


async def test_bad_report_changes_nothing(
    limiter: pb_grpc.LimiterStub, admin: pb_grpc.AdminStub
) -> None:
    g = await limiter.Acquire(acq())
    with pytest.raises(grpc.aio.AioRpcError):
        await limiter.Report(pb.ReportRequest(reservation_id=g.reservation_id, outcome=99))
    assert [lease.reservation_id for lease in await open_leases(admin)] == [g.reservation_id]


async def test_list_leases_pages_in_expiry_order(
    limiter: pb_grpc.LimiterStub, admin: pb_grpc.AdminStub
) -> None:
    ids = []
    for lease_ms in (50_000, 10_000, 30_000, 20_000, 40_000):
        g = await limiter.Acquire(acq(model="claude-x", input_tokens=1, lease_ms=lease_ms))
        ids.append((lease_ms, g.reservation_id))
    seen, token = [], ""
    while True:
        page = await admin.ListLeases(pb.ListLeasesRequest(page_size=2, page_token=token))
        seen += [lease.reservation_id for lease in page.leases]
        token = page.next_page_token
        if not token:
            break
    assert seen == [rid for _, rid in sorted(ids)]
    filtered = await admin.ListLeases(pb.ListLeasesRequest(model="tiny"))
    assert list(filtered.leases) == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.ListLeases(pb.ListLeasesRequest(page_token="garbage!"))
    assert err.value.code() == Code.INVALID_ARGUMENT


async def test_scope_alias_filters(limiter: pb_grpc.LimiterStub, admin: pb_grpc.AdminStub) -> None:
    await limiter.Acquire(acq(scope=TEAM_A))
    await limiter.Acquire(acq(scope="other"))
    leases = (await admin.ListLeases(pb.ListLeasesRequest(scope="team-a"))).leases
    assert [(lease.scope, lease.scope_alias) for lease in leases] == [(TEAM_A, "team-a")]


async def test_health_and_reflection(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "limiter.v1.Limiter"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask() -> reflection_pb2.ServerReflectionResponse:
        call = refl.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await call.done_writing()
        return await call.read()

    names = {s.name for s in (await ask()).list_services_response.service}
    assert {"limiter.v1.Limiter", "limiter.v1.Admin", "grpc.health.v1.Health"} <= names
