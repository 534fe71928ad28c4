"""The load generator, run as its own process: Acquire+Report cycles at a fixed concurrency.

    python -m bench.load TARGET CONCURRENCY SECONDS SCOPES [--prefill N [--touch]]
prints one JSON line: cycles, rpcs, seconds, p50_ms, p99_ms (per RPC). With --prefill it
only prepares the daemon: N open reservations held (long leases, never reported) on `held-*`
scopes, or with --touch one Acquire+Report on each of the N scopes the load itself uses, so
their buckets exist before measuring.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc

from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc

MODEL = "bench-model"


async def prefill(stub: pb_grpc.LimiterStub, n: int, scopes: int, touch: bool) -> None:
    """Hold n open reservations (long leases, never reported) spread over `scopes` held-*
    scopes; or, with touch, create the buckets of scopes s0..s{n-1} (Acquire+Report each)."""
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with sem:
            if touch:
                r = await stub.Acquire(pb.AcquireRequest(scope=f"s{i}", model=MODEL,
                                                         input_tokens=1))
                await stub.Report(pb.ReportRequest(reservation_id=r.reservation_id,
                                                   outcome=pb.OK, actual_input_tokens=1))
                return
            await stub.Acquire(pb.AcquireRequest(scope=f"held-{i % scopes}", model=MODEL,
                                                 input_tokens=1, lease_ms=3_600_000))

    await asyncio.gather(*(one(i) for i in range(n)))


async def worker(stub: pb_grpc.LimiterStub, stop: float, scopes: int, offset: int,
                 lat: list[float]) -> int:
    n, i = 0, offset
    while time.perf_counter() < stop:
        i += 1
        t0 = time.perf_counter()
        r = await stub.Acquire(pb.AcquireRequest(scope=f"s{i % scopes}", model=MODEL,
                                                 input_tokens=100, max_output_tokens=100))
        t1 = time.perf_counter()
        await stub.Report(pb.ReportRequest(reservation_id=r.reservation_id, outcome=pb.OK,
                                           actual_input_tokens=90, actual_output_tokens=40))
        t2 = time.perf_counter()
        lat += (t1 - t0, t2 - t1)
        n += 1
    return n


async def main(a: argparse.Namespace) -> None:
    async with grpc.aio.insecure_channel(a.target) as ch:
        stub = pb_grpc.LimiterStub(ch)
        if a.prefill:
            await prefill(stub, a.prefill, max(1, min(a.prefill, a.scopes)), a.touch)
            print(json.dumps({"prefilled": a.prefill}), flush=True)
            return
        await worker(stub, time.perf_counter() + 0.5, a.scopes, 0, [])  # warm up
        lat: list[float] = []
        start = time.perf_counter()
        stop = start + a.seconds
        counts = await asyncio.gather(*(
            worker(stub, stop, a.scopes, k * 7919, lat) for k in range(a.concurrency)))
        elapsed = time.perf_counter() - start
    lat.sort()
    cycles = sum(counts)
    print(json.dumps({
        "cycles": cycles, "seconds": elapsed, "cycles_per_s": cycles / elapsed,
        "rpc_per_s": 2 * cycles / elapsed,
        "p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[int(len(lat) * 0.99)],
    }), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("concurrency", type=int)
    p.add_argument("seconds", type=float)
    p.add_argument("scopes", type=int)
    p.add_argument("--prefill", type=int, default=0)
    p.add_argument("--touch", action="store_true")
    asyncio.run(main(p.parse_args()))
