"""The bench's verdicts follow from its numbers (pure functions; no bench is run here)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import targets
from bench.__main__ import parse_parts


def scale_rows(scopes: list[float], held: list[float], rss: float = 100.0) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n, c in zip((1, 1000, 100000), scopes, strict=True):
        rows.append({"case": f"{n} scopes", "cycles_per_s": c, "peak_rss_mb": rss})
    for n, c in zip((0, 10000, 100000), held, strict=True):
        rows.append({"case": f"{n} open reservations", "cycles_per_s": c, "peak_rss_mb": 50.0})
    return rows


def test_scale_ratios_are_per_series_cost() -> None:
    rows = scale_rows([1000, 900, 800], [2000, 1000, 1600])
    targets.add_scale_ratios(rows)
    assert [round(r["cost_vs_base"], 3) for r in rows] == [1.0, 1.111, 1.25, 1.0, 2.0, 1.25]


def test_verdicts_follow_the_numbers() -> None:
    raw = {
        "cost": [
            {"server": "floor", "rpc_ratio": 1.0, "p99_ratio": 1.0},
            {"server": "durable", "rpc_ratio": 0.9, "p99_ratio": 1.6},
        ],
        "scale": scale_rows([1000, 950, 900], [1000, 900, 800], rss=301.0),
        "restart": {"open_reservations": 100000.0, "restart_s": 2.5},
    }
    got = {v.target: (v.measured, v.met) for v in targets.check(raw)}
    assert got == {
        "durable RPC/s >= 0.85x floor": ("0.90x", True),
        "durable p99 <= 1.5x floor": ("1.60x", False),
        "per-call cost, 100000 scopes / 1 scopes <= 1.2x": ("1.11x", True),
        "per-call cost, 100000 open reservations / 0 open reservations <= 1.2x": ("1.25x", False),
        "peak RSS with 100000 scopes <= 300 MB": ("301 MB", False),
        "restart with 100,000 open reservations < 3 s": ("2.50 s", True),
    }
    assert "| durable p99 <= 1.5x floor | 1.60x | **not met** |" in targets.table(
        targets.check(raw))


def test_only_accepts_part_names_and_the_old_alias() -> None:
    assert parse_parts("floor, scale") == {"floor", "scale"}
    assert parse_parts("cost,restart") == {"floor", "restart"}
    with pytest.raises(ValueError, match="--only: unknown part.*nope"):
        parse_parts("floor,nope")
    with pytest.raises(ValueError, match="none given"):
        parse_parts(",")


@pytest.mark.parametrize(("ratio", "failed", "met"),
                         [(2.9, 0, True), (3.1, 0, False), (1.0, 4, False)])
def test_waiting_streams_verdict(ratio: float, failed: int, met: bool) -> None:
    raw = {"streams": {"streams": 10000, "p99_ratio": ratio, "failed": failed}}
    [verdict] = targets.check(raw)
    assert verdict.target == "probe p99 with 10,000 waiting streams <= 3x idle, no stream failing"
    assert verdict.measured == f"{ratio:.2f}x, {failed} failed" and verdict.met is met


def test_gateway_verdict_is_the_streamed_ttfb_ratio() -> None:
    raw = {"gateway": [
        {"case": "stream", "ratio_ttfb_p50_ms": 1.04, "added_ttfb_p50_ms": 4.2},
        {"case": "json", "ratio_ttfb_p50_ms": 2.0, "added_ttfb_p50_ms": 9.0},
    ]}
    assert [(v.target, v.measured, v.met) for v in targets.check(raw)] == [
        ("gateway stream TTFB p50 <= 1.1x direct", "1.040x (+4.2 ms)", True)]
    raw["gateway"][0]["ratio_ttfb_p50_ms"] = 1.2
    assert [v.met for v in targets.check(raw)] == [False]
    assert parse_parts("gateway") == {"gateway"}


def test_shared_ledger_verdicts() -> None:
    raw = {"shared": [
        {"case": "1 sidecar, SQLite", "cycles_ratio": 1.0, "p99_ratio": 1.0},
        {"case": "1 sidecar, Redis", "cycles_ratio": 0.65, "p99_ratio": 1.9},
        {"case": "3 sidecars, one Redis", "cycles_ratio": 1.4, "p99_ratio": 2.5},
    ]}
    got = {v.target: (v.measured, v.met) for v in targets.check(raw)}
    assert got == {
        "sidecar on Redis cycles/s >= 0.7x SQLite sidecar": ("0.65x", False),
        "sidecar on Redis p99 <= 2x SQLite sidecar": ("1.90x", True),
    }
    assert parse_parts("shared") == {"shared"}


def test_goodput_steady_utilization_leaves_out_the_start_and_the_tail() -> None:
    """The start-up burst (buckets start full) and the tail do not count in the steady
    figure; the whole-run figure counts everything against capacity + refill."""
    from bench import goodput
    from bench.goodput_config import KEY_LIMITS

    itpm, otpm = KEY_LIMITS["itpm"], KEY_LIMITS["otpm"]
    burst = [{"t": 1.0, "status": 200, "input": itpm, "output": otpm}]
    # From 15 s to 55 s: exactly the per-minute rate, one event a second.
    steady = [{"t": 15.0 + i, "status": 200, "input": itpm / 60, "output": otpm / 120}
              for i in range(40)]
    tail = [{"t": 57.0, "status": 200, "input": itpm, "output": 0},
            {"t": 20.0, "status": 429, "input": 0, "output": 0}]
    r = goodput.summarize("limiterd", 60.0, burst + steady + tail, [])
    assert r["steady_input_pct"] == pytest.approx(100.0)
    assert r["steady_output_pct"] == pytest.approx(50.0)
    assert r["input_budget_pct"] == pytest.approx(100 * (2 * itpm + 40 * itpm / 60) / (2 * itpm))
    assert r["provider_429"] == 1


def goodput_row(mode: str, r429: int, failed: int, pct: float) -> dict[str, Any]:
    return {"mode": mode, "provider_429": r429, "failed": failed, "input_budget_pct": pct}


def test_shared_goodput_verdicts_compare_with_one_shared_daemon() -> None:
    raw = {"goodput": [goodput_row("limiterd", 1, 0, 90.0), goodput_row("sidecars", 30, 0, 99.0),
                       goodput_row("redis", 2, 0, 96.0)]}
    got = {v.target: (v.measured, v.met) for v in targets.check(raw)}
    assert got == {
        "sidecars on one Redis: provider 429s <= one shared daemon's": ("2 vs 1", False),
        "sidecars on one Redis: 0 failed requests": ("0 failed", True),
        "sidecars on one Redis: >= 95% of the input budget": ("96%", True),
    }
    raw = {"goodput": [goodput_row("limiterd", 3, 0, 90.0), goodput_row("redis", 3, 1, 94.0)]}
    assert [v.met for v in targets.check(raw)] == [True, False, False]
    # Without the Redis setup in the run there is nothing to hold against the target.
    assert targets.check({"goodput": [goodput_row("limiterd", 1, 0, 90.0)]}) == []

