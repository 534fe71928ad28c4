"""The shared ledger's cost: Acquire+Report cycles/s and p50/p99 for one sidecar on SQLite,
one sidecar on Redis, and three sidecars on one Redis (three load generators at once).

Redis runs as its own process with an append-only file fsynced every second (what the README
recommends); the SQLite sidecar journals with its default NORMAL synchronous mode. Ratios are
taken within one run.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.cost import CONFIG, ENV, ROOT, free_port, load, median_of, server, wait_serving


@contextmanager
def redis(workdir: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("the shared bench needs redis-server (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
         "--logfile", str(workdir / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import socket
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def shared_sidecar(workdir: Path, url: str) -> Iterator[str]:
    target = f"127.0.0.1:{free_port()}"
    config = workdir / "bench.toml"
    config.write_text(CONFIG)
    proc = subprocess.Popen(
        [sys.executable, "-m", "limiterd", "serve", "--listen", target, "--config", str(config),
         "--ledger", url, "--log-level", "warning", "--watch-config", "0"], env=ENV, cwd=ROOT)
    try:
        wait_serving(target)
        yield target
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _together(targets: list[str], concurrency: int, seconds: float) -> dict[str, float]:
    """One load generator per sidecar, all at once: summed throughput, worst percentiles."""
    with ThreadPoolExecutor(len(targets)) as pool:
        results = list(pool.map(lambda t: load(t, concurrency, seconds, 1), targets))
    return {
        "cycles_per_s": sum(r["cycles_per_s"] for r in results),
        "p50_ms": max(r["p50_ms"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
    }


def measure(runs: int, seconds: float, concurrency: int) -> list[dict[str, Any]]:
    per: dict[str, list[dict[str, float]]] = {"1 sidecar, SQLite": [], "1 sidecar, Redis": [],
                                              "3 sidecars, one Redis": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for run in range(runs):
            d = work / f"run{run}"
            d.mkdir()
            with server("durable", d) as s:
                per["1 sidecar, SQLite"].append(load(s.target, concurrency, seconds, 1))
            with redis(d) as url, shared_sidecar(d, url) as t:
                per["1 sidecar, Redis"].append(_together([t], concurrency, seconds))
            with redis(d) as url, ExitStack() as stack:
                targets = [stack.enter_context(shared_sidecar(d, url)) for _ in range(3)]
                per["3 sidecars, one Redis"].append(_together(targets, concurrency, seconds))
    rows = []
    base = median_of(per["1 sidecar, SQLite"])
    for case, results in per.items():
        m = median_of([{k: r[k] for k in ("cycles_per_s", "p50_ms", "p99_ms")}
                       for r in results])
        rows.append({"case": case, **m,
                     "cycles_ratio": m["cycles_per_s"] / base["cycles_per_s"],
                     "p99_ratio": m["p99_ms"] / base["p99_ms"]})
    return rows


if __name__ == "__main__":  # a quick look: python -m bench.shared
    for row in measure(1, 3.0, 32):
        print(row)
