"""The gateway's cost: the same requests straight to an upstream and through `limiterd
gateway` (with an in-memory daemon), interleaved within one run.

Figures: time to the first byte and to the end, p50 and p99, for streamed and JSON answers;
added latency in ms and every figure as a ratio to direct. The upstream answers after a fixed
`TTFB_MS` (a model's time to first token) and streams `EVENTS` deltas `GAP_MS` apart, so the
ratios say what the gateway adds to a fast real call.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.cost import ENV, ROOT, free_port, server

TTFB_MS, EVENTS, GAP_MS = 100, 20, 5


@contextmanager
def process(cmd: list[str], ready_url: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT)
    try:
        for _ in range(1500):
            try:
                with urllib.request.urlopen(ready_url, timeout=0.2):
                    break
            except OSError as e:
                if getattr(e, "code", None):  # an HTTP error status: it is serving
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[2]} exited {proc.returncode}") from e
                time.sleep(0.02)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def load(direct: str, gateway: str, conc: int, seconds: float, stream: bool
         ) -> dict[str, dict[str, float]]:
    out = subprocess.run([sys.executable, "-m", "bench.gateway_load", direct, gateway,
                          str(conc), str(seconds), "1" if stream else "0"],
                         env=ENV, cwd=ROOT, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def row(case: str, runs: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    def med(side: str, key: str) -> float:
        return statistics.median(r[side][key] for r in runs)

    r: dict[str, Any] = {"case": case, "requests": int(med("gateway", "n"))}
    for key in ("ttfb_p50_ms", "ttfb_p99_ms", "p50_ms", "p99_ms"):
        d, g = med("direct", key), med("gateway", key)
        r[f"direct_{key}"], r[f"gateway_{key}"] = d, g
        r[f"added_{key}"] = g - d
        r[f"ratio_{key}"] = g / d if d else float("nan")
    return r


def run_all(runs: int, seconds: float, conc: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, server("memory", Path(tmp)) as daemon:
        up_port, gw_port = free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        gateway = f"http://127.0.0.1:{gw_port}"
        with process([sys.executable, "-m", "bench.gateway_upstream", str(up_port),
                      str(TTFB_MS), str(EVENTS), str(GAP_MS)], upstream + "/"), \
             process([sys.executable, "-m", "limiterd", "gateway", "--listen",
                      f"127.0.0.1:{gw_port}", "--limiter", daemon.target, "--upstream",
                      upstream, "--log-level", "warning"], gateway + "/limiterd/health"):
            for case, stream in (("stream", True), ("json", False)):
                rows.append(row(case, [load(upstream, gateway, conc, seconds, stream)
                                       for _ in range(runs)]))
    return rows


COLUMNS = [
    ("case", "answer", ""), ("requests", "requests each way", ""),
    ("direct_ttfb_p50_ms", "TTFB p50 direct ms", ".1f"),
    ("gateway_ttfb_p50_ms", "TTFB p50 gateway ms", ".1f"),
    ("ratio_ttfb_p50_ms", "TTFB p50 ratio", ".3f"),
    ("ratio_ttfb_p99_ms", "TTFB p99 ratio", ".3f"),
    ("added_p50_ms", "added p50 ms", ".1f"), ("added_p99_ms", "added p99 ms", ".1f"),
    ("ratio_p50_ms", "total p50 ratio", ".3f"), ("ratio_p99_ms", "total p99 ratio", ".3f"),
]


def report(rows: list[dict[str, Any]], conc: int, seconds: float) -> list[str]:
    from bench.__main__ import fmt

    return ["## The gateway against calling the upstream directly", "",
            f"An upstream that answers after {TTFB_MS} ms and streams {EVENTS} events "
            f"{GAP_MS} ms apart; {conc} callers each alternate one direct request and one "
            f"through `limiterd gateway` (in-memory daemon) for {seconds:.0f} s. TTFB = time "
            "to the first byte of the body. Ratios are gateway / direct within the run.", "",
            fmt(rows, COLUMNS), ""]
