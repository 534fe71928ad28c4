"""Waiting streams at scale: probe Acquire latency while N AcquireStream callers wait.

The daemon (memory journal, its own process) gets a probe load first with nothing waiting,
then again while a holder process keeps N streams waiting on a few scopes whose budget
grants one caller a second each (so queues move, as in production, and every stream gets
its keepalives). The ratio of the two p99s is the figure.

    python -m bench.streams hold TARGET N SCOPES
runs the holder: it opens N streams, prints one JSON line when every one has heard its
first Queued event, re-opens a stream for each one granted (reporting the grant), and
stops on SIGTERM printing what it saw (events, grants, failures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc

from bench.cost import ENV, ROOT, free_port, load, wait_serving
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc

SCOPES = 6
CONFIG = """
[daemon]
max_wait_ms = 3600000
max_waiters_per_queue = {per_queue}
max_waiters = {total}
max_streams = {total}

[models."bench-model"]
requests_per_minute = 1000000000
input_tokens_per_minute = 1000000000000
output_tokens_per_minute = 1000000000000

[models."slow-model"]              # one grant a second per scope: the queues keep moving
requests_per_minute = 60
"""


async def hold(target: str, n: int, scopes: int) -> None:
    stats: dict[str, Any] = {"events": 0, "granted": 0, "failed": 0}
    codes: dict[str, int] = {}
    stats["codes"] = codes
    ready = asyncio.Event()
    first_heard = 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    channels = [grpc.aio.insecure_channel(target) for _ in range(8)]
    stubs = [pb_grpc.LimiterStub(ch) for ch in channels]
    try:
        async def one(i: int) -> None:
            nonlocal first_heard
            stub = stubs[i % len(stubs)]
            first = True
            while not stop.is_set():
                call = stub.AcquireStream(pb.AcquireRequest(
                    scope=f"w{i % scopes}", model="slow-model", max_wait_ms=3_600_000))
                try:
                    async for event in call:
                        stats["events"] += 1
                        if first:
                            first = False
                            first_heard += 1
                            if first_heard == n:
                                ready.set()
                        if event.WhichOneof("event") == "granted":
                            stats["granted"] += 1  # the request is used: 1 a second
                            await stub.Report(pb.ReportRequest(
                                reservation_id=event.granted.reservation_id, outcome=pb.OK))
                except grpc.aio.AioRpcError as exc:
                    if stop.is_set():
                        return
                    stats["failed"] += 1
                    why = f"{exc.code().name}: {exc.details()}"[:120]
                    codes[why] = codes.get(why, 0) + 1
                    await asyncio.sleep(0.1)

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await ready.wait()
        print(json.dumps({"ready": n}), flush=True)
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for ch in channels:
            await ch.close()
    print(json.dumps(stats), flush=True)


def measure(n: int, seconds: float, runs: int) -> dict[str, Any]:
    """p99 of Acquire+Report probes idle, then with `n` streams waiting; medians of runs."""
    per_queue = n // SCOPES + 100
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "streams.toml"
        config.write_text(CONFIG.format(per_queue=per_queue, total=n + 1000))
        target = f"127.0.0.1:{free_port()}"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "limiterd", "serve", "--listen", target, "--config",
             str(config), "--db", ":memory:", "--log-level", "warning", "--watch-config",
             "0"], env=ENV, cwd=ROOT)
        try:
            wait_serving(target)
            idle = [load(target, 4, seconds, 1)["p99_ms"] for _ in range(runs)]
            holder = subprocess.Popen(
                [sys.executable, "-m", "bench.streams", "hold", target, str(n), str(SCOPES)],
                env=ENV, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            assert holder.stdout is not None
            try:
                line = holder.stdout.readline()
                if not line.startswith('{"ready"'):
                    raise RuntimeError(f"the stream holder failed: {line!r}")
                busy = [load(target, 4, seconds, 1)["p99_ms"] for _ in range(runs)]
            finally:
                holder.send_signal(signal.SIGTERM)
                out, _ = holder.communicate(timeout=120)
            seen = json.loads(out.strip().splitlines()[-1])
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
    idle_p99 = sorted(idle)[len(idle) // 2]
    busy_p99 = sorted(busy)[len(busy) // 2]
    result = {"streams": n, "idle_p99_ms": idle_p99, "streams_p99_ms": busy_p99,
              "p99_ratio": busy_p99 / idle_p99, **seen}
    print(f"  {n} waiting streams: probe p99 {busy_p99:.2f} ms vs {idle_p99:.2f} ms idle "
          f"({result['p99_ratio']:.2f}x); {seen['failed']} stream failures", flush=True)
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["hold"])
    p.add_argument("target")
    p.add_argument("n", type=int)
    p.add_argument("scopes", type=int)
    a = p.parse_args()
    asyncio.run(hold(a.target, a.n, a.scopes))
