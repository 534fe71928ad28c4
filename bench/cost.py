"""Cost per call against the floor, cost as work grows, and restart time.

Every server runs in its own process, every load generator in another; figures are medians
of `runs` runs, and ratios are taken within one run of `make bench`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'client' / 'src'}")
CONFIG = """
[daemon]
max_lease_ms = 3600000
max_settlements = 200000
idle_sweep_interval_s = 86400  # keep the scale bench's pre-created buckets live while measuring

[models."bench-model"]
requests_per_minute = 1000000000
input_tokens_per_minute = 1000000000000
output_tokens_per_minute = 1000000000000
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(target: str, timeout: float = 60.0) -> float:
    """Seconds until the health check answers SERVING."""
    start = time.perf_counter()
    with grpc.insecure_channel(target) as ch:
        stub: Any = health_pb2_grpc.HealthStub(ch)  # the generated stub has no type hints
        while time.perf_counter() - start < timeout:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == 1:
                    return time.perf_counter() - start
            except grpc.RpcError:
                time.sleep(0.02)
    raise RuntimeError(f"{target} did not become healthy")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    target: str


@contextmanager
def server(kind: str, workdir: Path, db: Path | None = None) -> Iterator[Server]:
    """kind: floor | memory | durable."""
    target = f"127.0.0.1:{free_port()}"
    if kind == "floor":
        cmd = [sys.executable, "-m", "bench.floor", target]
    else:
        config = workdir / "bench.toml"
        config.write_text(CONFIG)
        dbarg = ":memory:" if kind == "memory" else str(db or workdir / "bench.sqlite3")
        cmd = [sys.executable, "-m", "limiterd", "serve", "--listen", target, "--config",
               str(config), "--db", dbarg, "--log-level", "warning", "--watch-config", "0"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT)
    try:
        wait_serving(target) if kind != "floor" else _wait_port(target)
        yield Server(proc, target)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_port(target: str) -> None:
    host, port = target.rsplit(":", 1)
    for _ in range(500):
        try:
            socket.create_connection((host, int(port)), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{target} never listened")


def load(target: str, concurrency: int, seconds: float, scopes: int,
         prefill: int = 0, touch: bool = False) -> dict[str, float]:
    cmd = [sys.executable, "-m", "bench.load", target, str(concurrency), str(seconds),
           str(scopes)]
    if prefill:
        cmd += ["--prefill", str(prefill)] + (["--touch"] if touch else [])
    out = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def cost_vs_floor(runs: int, seconds: float, concurrency: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("floor", "memory", "durable"):
            results: list[dict[str, float]] = []
            rss = 0.0
            for _ in range(runs):
                with server(kind, Path(tmp), Path(tmp) / f"{kind}-{len(results)}.sqlite3") as s:
                    results.append(load(s.target, concurrency, seconds, 1))
                    rss = max(rss, peak_rss_mb(s.proc.pid))
            m = median_of(results)
            rows.append({"server": kind, **m, "peak_rss_mb": rss})
            print(f"  {kind}: {m['rpc_per_s']:.0f} RPC/s, p99 {m['p99_ms']:.2f} ms", flush=True)
    floor = rows[0]
    for r in rows:  # cycles/s is RPC/s halved, so its ratio is rpc_ratio
        for key, ratio in (("rpc_per_s", "rpc_ratio"), ("p50_ms", "p50_ratio"),
                           ("p99_ms", "p99_ratio"), ("peak_rss_mb", "rss_ratio")):
            r[ratio] = float(r[key]) / float(floor[key])
    return rows


def cost_as_work_grows(runs: int, seconds: float, concurrency: int,
                       big: int) -> list[dict[str, Any]]:
    """Durable limiterd with the load spread over 1, 1k and `big` scopes (every bucket created
    before measuring), then with 0, 10k and `big` open reservations held. Each case prepares
    one daemon once (a 100k prefill takes a minute or more) and measures `runs` runs on it."""
    cases = [(f"{n} scopes", n, n, True) for n in (1, 1000, big)]
    cases += [(f"{n} open reservations", 1, n, False) for n in (0, min(10_000, big // 10), big)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (case, scopes, prefill, touch) in enumerate(cases):
            with server("durable", Path(tmp), Path(tmp) / f"scale-{i}.sqlite3") as s:
                started = time.perf_counter()
                if prefill > 1:
                    load(s.target, concurrency, 0, 1000, prefill=prefill, touch=touch)
                    print(f"  {case}: prepared in {time.perf_counter() - started:.0f} s",
                          flush=True)
                results = [load(s.target, concurrency, seconds, scopes) for _ in range(runs)]
                rss = peak_rss_mb(s.proc.pid)
            m = median_of(results)
            rows.append({"case": case, **m, "peak_rss_mb": rss})
            print(f"  {case}: {m['cycles_per_s']:.0f} cycles/s, p99 {m['p99_ms']:.2f} ms, "
                  f"RSS {rss:.0f} MB", flush=True)
    return rows


def restart_time(held: int, runs: int) -> dict[str, float]:
    """Durable: hold `held` open reservations, SIGTERM, start again on the same file and time
    until the health check answers SERVING (process start included)."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "restart.sqlite3"
        with server("durable", Path(tmp), db) as s:
            load(s.target, 32, 0, 1000, prefill=held)
        for _ in range(runs):
            started = time.perf_counter()
            with server("durable", Path(tmp), db):
                times.append(time.perf_counter() - started)
    result = {"open_reservations": float(held), "restart_s": statistics.median(times)}
    print(f"  restart with {held} open reservations: {result['restart_s']:.2f} s", flush=True)
    return result
