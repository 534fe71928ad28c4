"""Several real sidecar processes on one real redis-server: the audit, and kill -9.

The audit is done from outside: every answer the racers got is kept, and the grants' own
times (granted_at_ms, Redis' clock) must never add up to more than the bucket's capacity plus
its refill since the first grant.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.redis_server import (
    RedisServer,
    redis_cli,
    redis_replica,
    redis_sentinel,
    redis_server,
    wait_for,
)
from tests.test_process import ANY_PORT, limiterd

CONFIG = """
[daemon]
default_lease_ms = 600000
max_waiters_per_queue = 1000
reattach_grace_ms = 60000  # a broken stream's place outlives its sidecar's entry expiry

[models."audit"]
requests_per_minute = 60
input_tokens_per_minute = 600000
output_tokens_per_minute = 600000

[models."fast"]
requests_per_minute = 100000
input_tokens_per_minute = 60000
output_tokens_per_minute = 60000

[models."one"]
requests_per_minute = 100000
input_tokens_per_minute = 1000000
output_tokens_per_minute = 1000000
max_concurrent = 1

[ledger]
url = "redis://127.0.0.1:1/0"  # each test passes --ledger, which wins
queue_entry_ttl_ms = 1000
sweep_interval_ms = 200
"""


Sidecar = tuple[str, subprocess.Popen[str]]


@contextmanager
def sidecars(tmp_path: Path, redis: RedisServer, n: int, logs: list[str] | None = None,
             ledger: str | None = None) -> Iterator[list[Sidecar]]:
    """`n` daemons on `redis` (found through `ledger` when given, e.g. a Sentinel address);
    their stderr goes to `logs` once they have stopped."""
    config = tmp_path / "limiterd.toml"
    config.write_text(CONFIG)
    procs = []
    try:
        for _ in range(n):
            proc = limiterd("serve", "--listen", ANY_PORT, "--config", str(config),
                            "--ledger", ledger or redis.url)
            procs.append(("", proc))
        procs[:] = [(proc.serving_on(), proc) for _, proc in procs]
        yield procs
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in procs:
            _, err = proc.communicate(timeout=20)
            if logs is not None:
                logs.append(err)


def acq(model: str, **kw: object) -> pb.AcquireRequest:
    fields: dict[str, object] = {"scope": "s", "model": model, "input_tokens": 1,
                                 "max_output_tokens": 1}
    return pb.AcquireRequest(**(fields | kw))  # type: ignore[arg-type]


HANG_S = 120


async def test_three_sidecars_on_one_redis_never_grant_more_than_the_budget(
    tmp_path: Path,
) -> None:
    logs: list[str] = []
    with redis_server(tmp_path / "redis") as redis, sidecars(tmp_path, redis, 3, logs) as procs:
        channels = [grpc.aio.insecure_channel(t) for t, _ in procs]
        stubs = [pb_grpc.LimiterStub(ch) for ch in channels]
        try:
            # Each call ends by its 1.5 s max wait; the deadline only turns a hang into a
            # failure (300 calls on a loaded machine can take longer than a 10 s one).
            calls = [stubs[i % 3].Acquire(acq("audit", max_wait_ms=1500), timeout=HANG_S)
                     for i in range(300)]
            results = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            for ch in channels:
                await ch.close()
        grants = [r for r in results if isinstance(r, pb.AcquireResponse)]
        refused = [r for r in results if not isinstance(r, pb.AcquireResponse)]
        assert all(isinstance(e, grpc.aio.AioRpcError)
                   and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
        assert len(grants) >= 60  # the full bucket at least, and then what refilled
        times = sorted(g.granted_at_ms / 1000 for g in grants)
        for k, t in enumerate(times, start=1):
            # 60 requests a minute: 60 at once, then one a second. A hair of float slack.
            allowed = 60 + (t - times[0]) * 1.0 + 1e-6
            assert k <= allowed, f"grant {k} at +{t - times[0]:.3f}s: more than {allowed:.3f}"
        assert len({g.reservation_id for g in grants}) == len(grants)
    assert len(logs) == 3
    for log in logs:  # the start-up line says which ledger (and no password)
        assert f"ledger shared on Redis at {redis.url} (fail_closed" in log


async def test_sidecars_find_the_master_through_sentinel(tmp_path: Path) -> None:
    """The address names only the sentinel and the master's name: the master's port is learnt
    from the sentinel, and both sidecars' grants spend the one budget in that master."""
    logs: list[str] = []
    with redis_server(tmp_path / "redis") as redis, \
            redis_sentinel(tmp_path / "sentinel", redis, "ledger-main") as sentinel:
        address = f"redis+sentinel://127.0.0.1:{sentinel.port}/ledger-main/0"
        with sidecars(tmp_path, redis, 2, logs, ledger=address) as procs:
            (ta, _), (tb, _) = procs
            async with grpc.aio.insecure_channel(ta) as cha, \
                    grpc.aio.insecure_channel(tb) as chb:
                sa, sb = pb_grpc.LimiterStub(cha), pb_grpc.LimiterStub(chb)
                got = await sa.Acquire(acq("fast", input_tokens=60_000), timeout=10)
                assert got.reservation_id
                with pytest.raises(grpc.aio.AioRpcError) as err:  # the budget A spent
                    await sb.Acquire(acq("fast", input_tokens=60_000), timeout=10)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert redis_keys(redis), "nothing was written to the master the sentinel names"
    assert len(logs) == 2
    for log in logs:
        assert (f"ledger shared on Redis, master 'ledger-main' db 0 via Sentinel "
                f"127.0.0.1:{sentinel.port} (fail_closed") in log


UNAVAILABLE_SAYS = "the shared ledger on Redis is unreachable"


async def test_sidecars_follow_a_sentinel_failover_and_grant_no_burst(tmp_path: Path) -> None:
    """A real master, a real replica and a sentinel: SIGKILL the master under light load.
    Until the sentinel has promoted the replica every call fails closed (UNAVAILABLE, saying
    why); then both sidecars grant from the new master, and over the whole run no bucket
    granted more than its capacity plus its refill, plus one for each acknowledged grant the
    replica had not received (the lost-data case; none are expected on loopback)."""
    # The master syncs its replica at once (Redis waits 5 s for more replicas by default).
    with redis_server(tmp_path / "master", extra=("--repl-diskless-sync-delay", "0")) as master, \
            redis_replica(tmp_path / "replica", master) as replica, \
            redis_sentinel(tmp_path / "sentinel", master, "ledger-main", down_after_ms=500,
                           failover_timeout_ms=2000, replicas=1) as sentinel:
        address = f"redis+sentinel://127.0.0.1:{sentinel.port}/ledger-main/0"
        with sidecars(tmp_path, master, 2, ledger=address) as procs:
            channels = [grpc.aio.insecure_channel(t) for t, _ in procs]
            stubs = [pb_grpc.LimiterStub(ch) for ch in channels]
            grants: list[pb.AcquireResponse] = []
            unavailable = [0, 0]
            promoted = asyncio.Event()
            back = [asyncio.Event(), asyncio.Event()]

            async def caller(i: int) -> None:
                """Light load: one call at a time, try-once, on the 60-a-minute budget."""
                while not back[i].is_set():
                    try:
                        grants.append(await stubs[i].Acquire(acq("audit"), timeout=HANG_S))
                        if promoted.is_set():
                            back[i].set()  # granted by the new master
                    except grpc.aio.AioRpcError as e:
                        if e.code() == grpc.StatusCode.UNAVAILABLE:
                            assert UNAVAILABLE_SAYS in (e.details() or ""), e.details()
                            unavailable[i] += 1
                        else:  # the budget is spent: that is an answer too
                            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                            if promoted.is_set():
                                back[i].set()
                    await asyncio.sleep(0.02)  # light load, not a race: any pace passes

            try:
                callers = [asyncio.ensure_future(caller(i)) for i in range(2)]
                await until(lambda: len(grants) >= 60)  # the bucket is spent
                master.kill()
                await asyncio.to_thread(wait_for, "the sentinel promotes the replica",
                                        lambda: redis_cli(
                                            sentinel.port, "sentinel",
                                            "get-master-addr-by-name", "ledger-main",
                                        ).split() == ["127.0.0.1", str(replica.port)], 60)
                promoted.set()
                await asyncio.wait_for(asyncio.gather(*callers), HANG_S)
                # Both sidecars grant again from the new master.
                for stub in stubs:
                    got = await stub.Acquire(acq("fast"), timeout=HANG_S)
                    assert got.reservation_id
            finally:
                for ch in channels:
                    await ch.close()
        assert all(n > 0 for n in unavailable), "a sidecar answered without a master"
        assert "role:master" in redis_cli(replica.port, "info", "replication")
        ids = {g.reservation_id for g in grants}
        assert len(ids) == len(grants)  # nothing granted twice
        lost = sum(1 for rid in ids if redis_cli(replica.port, "exists",
                                                  f"limiterd:rid:{rid}").strip() != "1")
        times = sorted(g.granted_at_ms / 1000 for g in grants)
        for k, t in enumerate(times, start=1):
            # 60 a minute: 60 at once, then one a second; a hair of float slack.
            allowed = 60 + (t - times[0]) * 1.0 + lost + 1e-6
            assert k <= allowed, f"grant {k} at +{t - times[0]:.3f}s: more than {allowed:.3f}"


async def until(check: Callable[[], bool], timeout_s: float = HANG_S) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not check():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


def redis_keys(redis: RedisServer) -> list[str]:
    out = subprocess.run([shutil.which("redis-cli") or "redis-cli", "-p", str(redis.port),
                          "--scan"], capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.split()


async def test_a_killed_sidecar_stops_blocking_and_its_leases_lapse(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as redis, sidecars(tmp_path, redis, 2) as procs:
        (ta, a), (tb, _) = procs
        async with grpc.aio.insecure_channel(ta) as cha, grpc.aio.insecure_channel(tb) as chb:
            sa, sb = pb_grpc.LimiterStub(cha), pb_grpc.LimiterStub(chb)
            held = await sa.Acquire(acq("one", lease_ms=1000))  # the only slot, short lease
            await sa.Acquire(acq("fast", input_tokens=60_000))  # the whole budget
            # A's callers wait for half a minute of refill: they claim the bucket...
            waiter = asyncio.ensure_future(
                sa.Acquire(acq("fast", input_tokens=30_000, max_wait_ms=60_000)))
            await until_queued(redis, "fast")
            # ...one of them on a stream that breaks: A keeps its place for the 60 s grace...
            stream = sa.AcquireStream(acq("fast", input_tokens=100, max_wait_ms=60_000,
                                          request_id="detached"))
            assert (await anext(aiter(stream))).queued.position == 2
            stream.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as err:  # ...so B's small one waits
                await sb.Acquire(acq("fast", input_tokens=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            os.kill(a.pid, signal.SIGKILL)
            a.wait()
            waiter.cancel()
            # A's entries (the detached one too) are no longer renewed: they stop blocking
            # within their 1 s expiry, not after the grace.
            small = await sb.Acquire(acq("fast", input_tokens=10, max_wait_ms=10_000))
            assert small.waited_ms < 10_000
            # A's lease lapses in Redis; B's sweep settles it and the slot comes back.
            slot = await sb.Acquire(acq("one", max_wait_ms=10_000))
            assert slot.reservation_id != held.reservation_id
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await sb.Release(pb.ReleaseRequest(reservation_id=held.reservation_id))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "expired" in (err.value.details() or "")


async def until_queued(redis: RedisServer, model: str) -> None:
    from redis.asyncio import Redis

    from limiterd.shared.keys import Keys
    client = Redis.from_url(redis.url)
    try:
        for _ in range(500):
            if await client.zcard(Keys().base("s", model) + "q"):
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the waiter never queued")
    finally:
        await client.aclose()
