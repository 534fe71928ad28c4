"""`make bench` / `python -m bench [--quick] [--only cost,scale,restart,goodput]`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

from bench import cost

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


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run, 1 run each")
    p.add_argument("--only", default="cost,scale,restart,goodput")
    a = p.parse_args()
    parts = set(a.only.split(","))
    runs, seconds, conc = (1, 2.0, 32) if a.quick else (3, 8.0, 32)
    big = 10_000 if a.quick else 100_000
    OUT.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    report = [f"# limiterd benchmarks, {stamp}", "", f"Machine: {machine()}.",
              f"Each figure is the median of {runs} run(s); load generators run in their own "
              f"processes, {conc} calls in flight, {seconds:.0f} s per run.", ""]
    raw: dict[str, Any] = {"machine": machine(), "date": stamp, "quick": a.quick}
    if "cost" in parts:
        print("cost per call against the floor", flush=True)
        rows = cost.cost_vs_floor(runs, seconds, conc)
        raw["cost"] = rows
        report += ["## Cost per call against the bare gRPC floor", "", fmt(rows, [
            ("server", "server", ""), ("rpc_per_s", "RPC/s", ".0f"),
            ("cycles_per_s", "Acquire+Report/s", ".0f"), ("p50_ms", "p50 ms", ".2f"),
            ("p99_ms", "p99 ms", ".2f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
            ("rpc_ratio", "RPC/s vs floor", ".2f"), ("p99_ratio", "p99 vs floor", ".2f"),
        ]), ""]
    if "scale" in parts:
        print("cost as work grows (durable)", flush=True)
        rows = cost.cost_as_work_grows(runs, seconds, conc, big)
        raw["scale"] = rows
        base = rows[0]["cycles_per_s"]
        for r in rows:
            r["vs_first"] = r["cycles_per_s"] / base
        report += ["## Cost as work grows (durable)", "", fmt(rows, [
            ("case", "case", ""), ("cycles_per_s", "Acquire+Report/s", ".0f"),
            ("p99_ms", "p99 ms", ".2f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
            ("vs_first", "vs 1 scope", ".2f"),
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
        rows = goodput.run_all(quick=a.quick, out=OUT)
        raw["goodput"] = rows
        report += goodput.report(rows)
    text = "\n".join(report)
    (OUT / "results.md").write_text(text + "\n")
    (OUT / "results.json").write_text(json.dumps(raw, indent=2, default=str))
    print()
    print(text)


if __name__ == "__main__":
    main()
