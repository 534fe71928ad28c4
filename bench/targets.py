"""The targets the figures are held against, checked from the raw results (no I/O).

Kept apart from the measuring code so the verdicts printed under the tables follow from the
numbers in results.json alone, and so they can be unit-tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RPC_VS_FLOOR_MIN = 0.85  # durable RPC/s at least this share of the floor's
P99_VS_FLOOR_MAX = 1.5  # durable p99 at most this multiple of the floor's
SCALE_COST_MAX = 1.2  # per-call cost at the largest case / at the smallest, at most
RSS_100K_SCOPES_MAX_MB = 300.0
RESTART_MAX_S = 3.0
STREAMS_P99_VS_IDLE_MAX = 3.0  # probe p99 with 10,000 waiting streams / idle, at most
GATEWAY_TTFB_MAX = 1.1  # time to first byte through the gateway / direct, streamed, p50
SHARED_CYCLES_MIN = 0.7  # a sidecar on Redis: Acquire+Report/s at least this share of SQLite's
SHARED_P99_MAX = 2.0  # and its p99 at most this multiple of the SQLite sidecar's
GOODPUT_BUDGET_MIN_PCT = 95.0  # a sidecar per app on one Redis: input budget served, at least


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    met: bool


def scale_groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Split the scale rows into the scopes series and the open-reservations series, each in
    measuring order (smallest case first)."""
    groups: dict[str, list[dict[str, Any]]] = {"scopes": [], "open reservations": []}
    for r in rows:
        groups["scopes" if str(r["case"]).endswith("scopes") else "open reservations"].append(r)
    return {k: v for k, v in groups.items() if v}


def add_scale_ratios(rows: list[dict[str, Any]]) -> None:
    """Per-call cost of each row relative to the smallest case of its own series (cost per
    call = 1 / cycles/s, so 1.10 means 10% more time per call)."""
    for series in scale_groups(rows).values():
        base = float(series[0]["cycles_per_s"])
        for r in series:
            r["cost_vs_base"] = base / float(r["cycles_per_s"])


def check(raw: dict[str, Any]) -> list[Verdict]:
    """Every target whose figures are present in `raw` (a results.json document)."""
    out: list[Verdict] = []
    by_server = {r["server"]: r for r in raw.get("cost", [])}
    if "durable" in by_server:
        d = by_server["durable"]
        out.append(Verdict(f"durable RPC/s >= {RPC_VS_FLOOR_MIN}x floor",
                           f"{d['rpc_ratio']:.2f}x", d["rpc_ratio"] >= RPC_VS_FLOOR_MIN))
        out.append(Verdict(f"durable p99 <= {P99_VS_FLOOR_MAX}x floor",
                           f"{d['p99_ratio']:.2f}x", d["p99_ratio"] <= P99_VS_FLOOR_MAX))
    scale = raw.get("scale", [])
    for series in scale_groups(scale).values():
        if len(series) < 2:
            continue
        lo, hi = series[0], series[-1]
        ratio = float(lo["cycles_per_s"]) / float(hi["cycles_per_s"])
        out.append(Verdict(f"per-call cost, {hi['case']} / {lo['case']} <= {SCALE_COST_MAX}x",
                           f"{ratio:.2f}x", ratio <= SCALE_COST_MAX))
    scopes = scale_groups(scale).get("scopes", [])
    if len(scopes) > 1:  # the target is set for 100k scopes; --quick measures fewer
        r = scopes[-1]
        out.append(Verdict(f"peak RSS with {r['case']} <= {RSS_100K_SCOPES_MAX_MB:.0f} MB",
                           f"{r['peak_rss_mb']:.0f} MB",
                           r["peak_rss_mb"] <= RSS_100K_SCOPES_MAX_MB))
    restart = raw.get("restart")
    if restart:
        held = int(restart["open_reservations"])
        out.append(Verdict(f"restart with {held:,} open reservations < {RESTART_MAX_S:.0f} s",
                           f"{restart['restart_s']:.2f} s", restart["restart_s"] < RESTART_MAX_S))
    streams = raw.get("streams")
    if streams:
        n, ratio = int(streams["streams"]), float(streams["p99_ratio"])
        out.append(Verdict(f"probe p99 with {n:,} waiting streams <= "
                           f"{STREAMS_P99_VS_IDLE_MAX:.0f}x idle, no stream failing",
                           f"{ratio:.2f}x, {streams['failed']} failed",
                           ratio <= STREAMS_P99_VS_IDLE_MAX and not streams["failed"]))
    for r in raw.get("gateway", []):
        if r["case"] == "stream":
            ratio = float(r["ratio_ttfb_p50_ms"])
            out.append(Verdict(f"gateway stream TTFB p50 <= {GATEWAY_TTFB_MAX}x direct",
                               f"{ratio:.3f}x (+{r['added_ttfb_p50_ms']:.1f} ms)",
                               ratio <= GATEWAY_TTFB_MAX))
    shared = {r["case"]: r for r in raw.get("shared", [])}
    if "1 sidecar, Redis" in shared:
        r = shared["1 sidecar, Redis"]
        out.append(Verdict(f"sidecar on Redis cycles/s >= {SHARED_CYCLES_MIN}x SQLite sidecar",
                           f"{r['cycles_ratio']:.2f}x", r["cycles_ratio"] >= SHARED_CYCLES_MIN))
        out.append(Verdict(f"sidecar on Redis p99 <= {SHARED_P99_MAX:.0f}x SQLite sidecar",
                           f"{r['p99_ratio']:.2f}x", r["p99_ratio"] <= SHARED_P99_MAX))
    out += _shared_goodput(raw.get("goodput", []))
    return out


def _shared_goodput(rows: list[dict[str, Any]]) -> list[Verdict]:
    """A sidecar per app on one Redis ledger, against one daemon shared by the same apps:
    no more provider 429s, no failed request, most of the budget served."""
    by_mode = {r.get("mode"): r for r in rows}
    redis, one = by_mode.get("redis"), by_mode.get("limiterd")
    if redis is None:
        return []
    out = []
    if one is not None:
        out.append(Verdict("sidecars on one Redis: provider 429s <= one shared daemon's",
                           f"{redis['provider_429']} vs {one['provider_429']}",
                           redis["provider_429"] <= one["provider_429"]))
    out.append(Verdict("sidecars on one Redis: 0 failed requests", f"{redis['failed']} failed",
                       redis["failed"] == 0))
    pct = float(redis["input_budget_pct"])
    out.append(Verdict(f"sidecars on one Redis: >= {GOODPUT_BUDGET_MIN_PCT:.0f}% of the "
                       "input budget", f"{pct:.0f}%", pct >= GOODPUT_BUDGET_MIN_PCT))
    return out


def table(verdicts: list[Verdict]) -> list[str]:
    if not verdicts:
        return []
    lines = ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {v.target} | {v.measured} | {'met' if v.met else '**not met**'} |"
              for v in verdicts]
    return [*lines, ""]
