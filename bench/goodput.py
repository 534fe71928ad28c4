"""Goodput: a simulated provider, 3 app processes x several agents, three setups, one run.

Each setup gets a fresh provider (full buckets) and the same seeds, so the setups see the
same requests in the same order, and differ only in how they are limited.
"""

from __future__ import annotations

import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.cost import ENV, ROOT, free_port, wait_serving
from bench.goodput_config import KEY_LIMITS, MODEL, limiter_toml
from bench.shared import redis

SETUPS = ("sdk", "local", "limiterd", "gateway", "sidecars", "redis")
LABELS = {"sdk": "SDK retries only", "local": "per-process limiter",
          "limiterd": "limiterd (shared)", "gateway": "limiterd gateway (no code change)",
          "sidecars": "a sidecar per app, separate ledgers",
          "redis": "a sidecar per app, one Redis ledger"}
# Setups where each app has its own sidecar (the app code is the `limiterd` one).
SIDECAR_SETUPS = ("sidecars", "redis")
APPS, AGENTS = 3, 6
WINDOW_S = 5.0
# The steady part of a run: after the start-up burst (every bucket starts full) and before
# the tail (calls still in flight at the end are not counted).
STEADY_FROM_S, STEADY_TAIL_S = 15.0, 5.0


def _start(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=ENV, cwd=ROOT)


def run_setup(mode: str, seconds: float, tmp: Path, overloads: list[list[float]]) -> dict[str, Any]:
    port = free_port()
    log = tmp / f"provider-{mode}.jsonl"
    cfg = tmp / "provider.json"
    cfg.write_text(json.dumps({"models": {MODEL: {**KEY_LIMITS, "overloads": overloads}}}))
    provider = _start([sys.executable, "-m", "bench.provider", str(port), str(log), str(cfg)])
    gateway = None
    daemons: list[subprocess.Popen[bytes]] = []
    targets = [""] * APPS
    url = f"http://127.0.0.1:{port}"
    stack = ExitStack()
    try:
        time.sleep(0.5)
        conf = tmp / "limiterd.toml"
        conf.write_text(limiter_toml(KEY_LIMITS))
        if mode in ("limiterd", "gateway"):
            targets = [_daemon(daemons, conf, ["--db", str(tmp / f"goodput-{mode}.sqlite3")])]
        elif mode == "sidecars":  # each sidecar alone believes it holds the key's full limits
            targets = [_daemon(daemons, conf, ["--db", str(tmp / f"goodput-{mode}-{i}.sqlite3")])
                       for i in range(APPS)]
        elif mode == "redis":
            rdir = tmp / "redis"
            rdir.mkdir(exist_ok=True)
            ledger = stack.enter_context(redis(rdir))
            targets = [_daemon(daemons, conf, ["--ledger", ledger]) for _ in range(APPS)]
        target = targets[0]
        if mode == "gateway":
            # The apps are the plain SDK pointed at the gateway (ANTHROPIC_BASE_URL): the
            # same code as the "sdk" setup, its default retries included.
            gw_port = free_port()
            gw_conf = tmp / "gateway.toml"
            gw_conf.write_text(f'[gateway]\nmax_wait_s = {seconds:g}\n'
                               'estimate = "count_tokens"\n')
            gateway = _start([sys.executable, "-m", "limiterd", "gateway", "--listen",
                              f"127.0.0.1:{gw_port}", "--limiter", target, "--upstream", url,
                              "--config", str(gw_conf), "--log-level", "warning"])
            url = f"http://127.0.0.1:{gw_port}"
            _wait_http(url + "/limiterd/health")
        app_mode = "limiterd" if mode in SIDECAR_SETUPS else mode
        apps = [_start([sys.executable, "-m", "bench.app", app_mode, str(AGENTS), str(seconds),
                        url, str(tmp / f"app-{mode}-{i}.jsonl"), targets[i % len(targets)],
                        str(i + 1)]) for i in range(APPS)]
        for a in apps:
            a.wait(seconds + 180)
    finally:
        for p in (gateway, *daemons, provider):
            if p is not None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
        stack.close()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    # The run starts when the first request reaches the provider, not when the provider
    # started: on a loaded machine the apps take many seconds to start, and counting from the
    # provider's start left most of the run outside the window (0% of the budget served).
    t0 = min((e["t"] for e in events), default=0.0)
    events = [{**e, "t": e["t"] - t0} for e in events]
    calls = [json.loads(line) for i in range(APPS)
             for line in (tmp / f"app-{mode}-{i}.jsonl").read_text().splitlines()]
    return summarize(mode, seconds, events, calls)


def _daemon(started: list[subprocess.Popen[bytes]], conf: Path, ledger_args: list[str]) -> str:
    """Start one `limiterd serve` with the key's full limits; returns its address once SERVING."""
    target = f"127.0.0.1:{free_port()}"
    started.append(_start([sys.executable, "-m", "limiterd", "serve", "--listen", target,
                           "--config", str(conf), *ledger_args,
                           "--log-level", "warning", "--watch-config", "0"]))
    wait_serving(target)
    return target


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def summarize(mode: str, seconds: float, events: list[dict[str, Any]],
              calls: list[dict[str, Any]]) -> dict[str, Any]:
    minutes = seconds / 60.0
    ok = [e for e in events if e["status"] == 200]
    done = [c for c in calls if c["ok"]]
    latencies = sorted(c["end"] - c["start"] for c in done)
    # Starting full, a bucket can serve its capacity plus the refill over the run.
    in_budget = KEY_LIMITS["itpm"] * (1 + minutes)
    out_budget = KEY_LIMITS["otpm"] * (1 + minutes)
    in_served = sum(e["input"] for e in ok if e["t"] <= seconds)
    out_served = sum(e["output"] for e in ok if e["t"] <= seconds)
    windows = math.ceil(seconds / WINDOW_S)
    series_in = [0.0] * windows
    series_429 = [0] * windows
    for e in events:
        w = int(e["t"] // WINDOW_S)
        if w < windows:
            if e["status"] == 200:
                series_in[w] += e["input"]
            elif e["status"] == 429:
                series_429[w] += 1
    per_window = KEY_LIMITS["itpm"] * WINDOW_S / 60.0
    lo, hi = STEADY_FROM_S, seconds - STEADY_TAIL_S
    steady = [e for e in ok if lo <= e["t"] < hi]
    steady_min = max(hi - lo, 1e-9) / 60.0
    return {
        "mode": mode,
        "setup": LABELS[mode],
        "provider_429": sum(1 for e in events if e["status"] == 429),
        "provider_529": sum(1 for e in events if e["status"] == 529),
        "completed": len(done),
        "failed": len(calls) - len(done),
        "completed_per_min": len(done) / minutes,
        "input_tokens_per_min": in_served / minutes,
        "input_budget_pct": 100 * in_served / in_budget,
        "output_budget_pct": 100 * out_served / out_budget,
        # Served per minute in the steady part, as a share of the per-minute limit.
        "steady_input_pct": 100 * sum(e["input"] for e in steady) / steady_min
        / KEY_LIMITS["itpm"],
        "steady_output_pct": 100 * sum(e["output"] for e in steady) / steady_min
        / KEY_LIMITS["otpm"],
        "p95_latency_s": latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan"),
        "median_latency_s": statistics.median(latencies) if latencies else float("nan"),
        "series_util": [v / per_window for v in series_in],
        "series_429": series_429,
    }


def run_all(quick: bool, out: Path, setups: tuple[str, ...] = SETUPS,
            runs: int = 1) -> list[dict[str, Any]]:
    """Each setup `runs` times in a row (one row per run; the plot shows each setup's first)."""
    seconds = 20.0 if quick else 60.0
    overloads = [[seconds * 0.4, seconds * 0.5, 0.6]]  # a 529 burst in the middle
    rows = []
    for mode in setups:
        for n in range(1, runs + 1):
            print(f"  {LABELS[mode]} (run {n}/{runs}): {APPS} apps x {AGENTS} agents for "
                  f"{seconds:.0f} s", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                r = run_setup(mode, seconds, Path(tmp), overloads)
            r["run"] = n
            print(f"    429s {r['provider_429']}, 529s {r['provider_529']}, "
                  f"{r['failed']} failed, "
                  f"{r['completed_per_min']:.1f} completed/min, input budget "
                  f"{r['input_budget_pct']:.0f}% whole run, {r['steady_input_pct']:.0f}% "
                  f"steady ({STEADY_FROM_S:.0f} s to end - {STEADY_TAIL_S:.0f} s)", flush=True)
            rows.append(r)
    plot([r for r in rows if r["run"] == 1], seconds, out / "goodput.png")
    return rows


def plot(rows: list[dict[str, Any]], seconds: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib is not installed: no plot; pip install -e '.[bench]')")
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for r in rows:
        xs = [WINDOW_S * (i + 0.5) for i in range(len(r["series_util"]))]
        ax1.plot(xs, [100 * u for u in r["series_util"]], marker="o", label=r["setup"])
        width = WINDOW_S / (len(rows) + 1)
        ax2.bar([x + (rows.index(r) - (len(rows) - 1) / 2) * width for x in xs],
                r["series_429"], width=width, label=r["setup"])
    ax1.axhline(100, color="grey", linestyle="--", linewidth=1)
    ax1.set_ylabel("input tokens served\n% of the per-minute rate")
    ax1.legend()
    ax2.set_ylabel(f"provider 429s per {WINDOW_S:.0f} s")
    ax2.set_xlabel("seconds")
    ax2.axvspan(seconds * 0.4, seconds * 0.5, color="orange", alpha=0.15, label="529 burst")
    ax2.legend()
    fig.suptitle(f"Goodput: {APPS} apps x {AGENTS} agents sharing one key "
                 f"({KEY_LIMITS['rpm']} RPM, {KEY_LIMITS['itpm']:,} ITPM, "
                 f"{KEY_LIMITS['otpm']:,} OTPM)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"  plot: {path}")


def report(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Goodput against a simulated provider", "",
             f"{APPS} app processes x {AGENTS} agents, one key ({KEY_LIMITS['rpm']} RPM, "
             f"{KEY_LIMITS['itpm']:,} input and {KEY_LIMITS['otpm']:,} output tokens per "
             "minute), a 529 burst in the middle of the run. Budget = what the key allows over "
             "the run, starting full.", "",
             f"Steady: served per minute from {STEADY_FROM_S:.0f} s to the end - "
             f"{STEADY_TAIL_S:.0f} s, as a share of the per-minute limit.", "",
             "| setup | run | provider 429s | 529s | completed/min | failed | input tokens/min "
             "| % input budget (whole run) | % input (steady) | % output budget (whole run) "
             "| % output (steady) | p95 latency s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r.get('run', 1)} | {r['provider_429']} | {r['provider_529']} | "
            f"{r['completed_per_min']:.1f} | {r['failed']} | {r['input_tokens_per_min']:,.0f} | "
            f"{r['input_budget_pct']:.0f}% | {r['steady_input_pct']:.0f}% | "
            f"{r['output_budget_pct']:.0f}% | {r['steady_output_pct']:.0f}% | "
            f"{r['p95_latency_s']:.1f} |")
    return [*lines, "", "![goodput](goodput.png)", ""]
