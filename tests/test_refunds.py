"""Wait estimates count the refunds expected from calls in flight (issue 13, item 3): with
calls that use 30% of what they reserve and take 4 s, a caller behind one full reservation
hears ~18 s, not the 60 s a refill-only estimate says."""

from __future__ import annotations

import pytest

from limiterd.config.model import Config, Limits, ModelRule, Settings
from limiterd.ledger.ledger import Granted, Ledger, Rejected
from limiterd.ledger.model import AcquireRequest, Outcome

T0 = 1_700_000_000.0


def ledger(expect_refunds: bool) -> Ledger:
    # Refill allowance off: these waits are exact refill times (the allowance, issue 15,
    # adds its 0.1 s to a take from a full bucket and is tested on its own).
    cfg = Config(Settings(expect_refunds=expect_refunds, refill_allowance_s=0.0),
                 models=(ModelRule("m", Limits(output_tokens_per_minute=300)),))  # 5 a second
    return Ledger(cfg, T0)


def out(tokens: int) -> AcquireRequest:
    return AcquireRequest("s", "m", "", 0, tokens)


def learned(led: Ledger) -> float:
    """Five calls reserving 100 output tokens, using 30, each taking 4 s; then a full bucket
    is taken by one call reserving 300. Returns when that call was granted."""
    now = T0
    for _ in range(5):
        g = led.acquire(out(100), now, now)
        assert isinstance(g, Granted)
        now += 4
        led.report(g.reservation.id, 0, 30, Outcome.OK, 0, now)
    now += 120  # full again
    g = led.acquire(out(300), now, now)
    assert isinstance(g, Granted)
    return now


@pytest.mark.parametrize(("expect_refunds", "wait_s", "second_s"),
                         [(True, 18.0, 36.0), (False, 60.0, 120.0)])
def test_the_estimate_counts_expected_refunds(expect_refunds: bool, wait_s: float,
                                              second_s: float) -> None:
    led = ledger(expect_refunds)
    now = learned(led)
    # In flight: 300 reserved, 70% (210) expected back 4 s after the grant. By then the
    # refill gave 20; the other 70 take 14 s more: 18 s in all.
    refused = led.acquire(out(300), now, now)
    assert isinstance(refused, Rejected)
    assert refused.retry_after_s == pytest.approx(wait_s)
    w = led.acquire(out(300), now, now + 600)
    assert not isinstance(w, Granted | Rejected)
    assert led.wait_status(w, now)[1] == pytest.approx(wait_s)
    # Behind it, the first waiter counts at what it is expected to use (30% of 300): 390
    # in all; 230 are back after 4 s, the other 160 take 32 s more.
    w2 = led.acquire(out(300), now, now + 600)
    assert not isinstance(w2, Granted | Rejected)
    assert led.wait_status(w2, now)[1] == pytest.approx(second_s)


def test_nothing_is_expected_before_enough_reports() -> None:
    led = ledger(True)
    g = led.acquire(out(300), T0, T0)
    assert isinstance(g, Granted)
    refused = led.acquire(out(300), T0, T0)
    assert isinstance(refused, Rejected) and refused.retry_after_s == pytest.approx(60)
