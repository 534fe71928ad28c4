"""`make bench` / `python -m bench [--quick] [--only floor,scale,restart,goodput,streams]`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

from bench import cost, targets

OUT = Path(__file__).resolve().parent / "out"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def fmt(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(format(r[c[0]], c[2]) if c[2] else str(r[c[0]]) for c in cols)
            + " |" for r in rows]
    return "\n".join([head, sep, *body])


PARTS = ("floor", "scale", "restart", "goodput", "streams", "gateway", "shared", "estimate")
ALIASES = {"cost": "floor"}  # the part's earlier name


def parse_parts(only: str) -> set[str]:
    """`--only` as a set of part names; raises ValueError naming any unknown one."""
    parts = {ALIASES.get(x.strip(), x.strip()) for x in only.split(",") if x.strip()}
    unknown = sorted(parts - set(PARTS))
    if unknown or not parts:
        raise ValueError(f"--only: unknown part(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {','.join(PARTS)}")
    return parts


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run, 1 run each")
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma-separated parts to run, from {','.join(PARTS)}")
    p.add_argument("--goodput-setups", default="",
                   help="goodput: comma-separated setups (default all), e.g. limiterd")
    p.add_argument("--goodput-runs", type=int, default=1,
                   help="goodput: runs of each setup in a row (each row is one run)")
    a = p.parse_args()
    try:
        parts = parse_parts(a.only)
    except ValueError as exc:
        p.error(str(exc))
    runs, seconds, conc = (1, 2.0, 32) if a.quick else (3, 8.0, 32)
    big = 10_000 if a.quick else 100_000
    OUT.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = [f"# limiterd benchmarks, {stamp}", "", f"Machine: {machine()}.",
              f"Each figure is the median of {runs} run(s); load generators run in their own "
              f"processes, {conc} calls in flight, {seconds:.0f} s per run.", ""]
    raw: dict[str, Any] = {"machine": machine(), "date": stamp, "quick": a.quick}
    if "floor" in parts:
        print("cost per call against the floor", flush=True)
        rows = cost.cost_vs_floor(runs, seconds, conc)
        raw["cost"] = rows
        report += ["## Cost per call against the bare gRPC floor", "", fmt(rows, [
            ("server", "server", ""), ("rpc_per_s", "RPC/s", ".0f"),
            ("cycles_per_s", "Acquire+Report/s", ".0f"), ("p50_ms", "p50 ms", ".2f"),
            ("p99_ms", "p99 ms", ".2f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
            ("rpc_ratio", "RPC/s (and cycles/s) vs floor", ".2f"),
            ("p50_ratio", "p50 vs floor", ".2f"), ("p99_ratio", "p99 vs floor", ".2f"),
            ("rss_ratio", "RSS vs floor", ".2f"),
        ]), ""]
    if "scale" in parts:
        print("cost as work grows (durable)", flush=True)
        rows = cost.cost_as_work_grows(runs, seconds, conc, big)
        raw["scale"] = rows
        targets.add_scale_ratios(rows)
        report += ["## Cost as work grows (durable)", "",
                   "Per-call cost = 1 / (Acquire+Report/s), relative to the smallest case of "
                   "its series (1 scope; 0 open reservations): 1.10 = 10% more time per call.",
                   "", fmt(rows, [
            ("case", "case", ""), ("cycles_per_s", "Acquire+Report/s", ".0f"),
            ("p99_ms", "p99 ms", ".2f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
            ("cost_vs_base", "per-call cost vs smallest case", ".2f"),
        ]), ""]
    if "restart" in parts:
        print("restart time", flush=True)
        r = cost.restart_time(big, runs)
        raw["restart"] = r
        report += ["## Restart", "",
                   f"Durable daemon holding {big:,} open reservations: SIGTERM, start again on "
                   f"the same file, SERVING after **{r['restart_s']:.2f} s** (process start "
                   f"included).", ""]
    if "goodput" in parts:
        from bench import goodput

        print("goodput against a simulated provider", flush=True)
        setups = tuple(x for x in a.goodput_setups.split(",") if x) or goodput.SETUPS
        if unknown := set(setups) - set(goodput.SETUPS):
            p.error(f"--goodput-setups: unknown {','.join(sorted(unknown))}; "
                    f"choose from {','.join(goodput.SETUPS)}")
        rows = goodput.run_all(quick=a.quick, out=OUT, setups=setups, runs=a.goodput_runs)
        raw["goodput"] = rows
        report += goodput.report(rows)
    if "streams" in parts:
        from bench import streams

        n = 2_000 if a.quick else 10_000
        print(f"probe latency with {n:,} waiting streams", flush=True)
        r = streams.measure(n, seconds, runs)
        raw["streams"] = r
        report += ["## Waiting streams", "",
                   f"Acquire+Report probes (4 in flight, {seconds:.0f} s) on an idle memory "
                   f"daemon, then while {n:,} AcquireStream callers wait on {streams.SCOPES} "
                   "scopes whose queues move (one grant a second each) and get their "
                   f"keepalives: p99 **{r['streams_p99_ms']:.2f} ms** against "
                   f"{r['idle_p99_ms']:.2f} ms idle ({r['p99_ratio']:.2f}x); the streams heard "
                   f"{r['events']:,} events, {r['granted']:,} grants, {r['failed']} failures.",
                   ""]
    if "gateway" in parts:
        from bench import gateway

        print("the gateway against direct calls", flush=True)
        rows = gateway.run_all(runs, seconds, 8)
        raw["gateway"] = rows
        report += gateway.report(rows, 8, seconds)
    if "shared" in parts:
        from bench import shared

        print("shared ledger: SQLite sidecar, Redis sidecar, 3 sidecars on one Redis", flush=True)
        rows = shared.measure(runs, seconds, conc)
        raw["shared"] = rows
        report += ["## Shared ledger on Redis", "",
                   "One load generator per sidecar, each with the concurrency above, on one "
                   "scope (one hot budget); Redis with AOF fsynced every second. Ratios are to "
                   "the SQLite sidecar of the same run; for 3 sidecars, cycles/s are summed and "
                   "p50/p99 are the worst of the three.", "", fmt(rows, [
            ("case", "case", ""), ("cycles_per_s", "Acquire+Report/s", ".0f"),
            ("p50_ms", "p50 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"),
            ("cycles_ratio", "cycles/s vs SQLite", ".2f"), ("p99_ratio", "p99 vs SQLite", ".2f"),
        ]), ""]
    if "estimate" in parts:
        from bench import estimate

        print("wait estimates against actual waits", flush=True)
        est = estimate.measure()
        raw["estimate"] = est
        report += ["## Wait estimates", "",
                   "Predicted (the first Queued estimate) against actual waits, 10 agents on "
                   "Opus's Tier 1 output budget, max_tokens 1024, 150-700 used, 2-8 s calls, "
                   "10 simulated minutes on a fake clock (`bench/estimate.py`):", "",
                   fmt([{"estimate": k, **v} for k, v in est.items()], [
                       ("estimate", "estimate", ""), ("waits", "waits", "d"),
                       ("mean_actual_s", "mean wait s", ".1f"),
                       ("mean_abs_error_s", "mean abs error s", ".1f"),
                       ("median_error_s", "median error s", "+.1f"),
                       ("overestimated_share", "over by > 1 s", ".0%")]), ""]
    verdicts = targets.check(raw)
    raw["targets"] = [vars(v) for v in verdicts]
    report += targets.table(verdicts)
    text = "\n".join(report)
    (OUT / "results.md").write_text(text + "\n")
    (OUT / "results.json").write_text(json.dumps(raw, indent=2, default=str))
    print()
    print(text)


if __name__ == "__main__":
    main()
