"""The ledger's seams (issue 11): provider headers are parsed at the API edge and the ledger
takes numbers; the overload mark is its own class; reservation ids come from outside."""

from __future__ import annotations

import itertools

from limiterd.api.provider_headers import provider_limits
from limiterd.config.model import Config, Limits, ModelRule, Settings
from limiterd.ledger.ledger import Granted, Ledger
from limiterd.ledger.model import AcquireRequest, BucketKey, ProviderLimits
from limiterd.ledger.overload import OverloadMarks

T0 = 1_700_000_000.0
CONFIG = Config(models=(ModelRule("m*", Limits(60, 600_000, 300_000)),))


def test_headers_become_numbers_at_the_edge() -> None:
    told = provider_limits({
        "anthropic-ratelimit-requests-limit": "50",
        "Anthropic-RateLimit-Input-Tokens-Remaining": " 29000 ",
        "anthropic-ratelimit-output-tokens-remaining": "-3",
        "anthropic-ratelimit-output-tokens-limit": "lots",
        "retry-after": "7",
    })
    assert told == ProviderLimits((50, None, None), (None, 29_000, None))
    assert provider_limits({"retry-after": "7"}) is None
    assert provider_limits({}) is None and provider_limits(None) is None


def test_the_ledger_corrects_a_bucket_from_numbers() -> None:
    led = Ledger(CONFIG, T0)
    assert isinstance(led.acquire(AcquireRequest("s", "m1", "", 1000, 0), T0, T0), Granted)
    key = BucketKey("s", "m*")
    notes = led.sync_from_provider(key, ProviderLimits((None,) * 3, (None, 400_000, None)), T0)
    # 600,000 - 1,000, less the refill allowance charged to a take from full (0.1 s: 1,000)
    assert notes == ["lowered input_tokens for m* from 598000 to 400000: the provider reports "
                     "less remaining"]
    assert led.bucket(key, T0).levels[1] == 400_000
    # Within the provider's rounding (1,000 tokens): left alone.
    assert led.sync_from_provider(key, ProviderLimits((None,) * 3, (None, 399_500, None)),
                                  T0) == []


def test_overload_marks() -> None:
    s = Settings(overload_window_s=60, overload_threshold=3, overload_cooldown_s=30)
    marks = OverloadMarks()
    for t in (0.0, 10.0):
        marks.note("b", T0 + t, s)
    marks.note("b", T0 + 71, s)  # the first two fell out of the window
    assert marks.until("b", T0 + 71) == 0.0
    marks.note("b", T0 + 72, s)
    marks.note("b", T0 + 73, s)
    assert marks.until("b", T0 + 73) == T0 + 103 and marks.active(T0 + 80) == {"b": T0 + 103}
    assert marks.until("other", T0 + 73) == 0.0
    assert marks.until("b", T0 + 103) == 0.0 and marks.active(T0 + 103) == {}


def test_reservation_ids_come_from_the_injected_generator() -> None:
    counter = itertools.count(1)
    led = Ledger(CONFIG, T0, new_id=lambda: f"{next(counter):032x}")
    ids = []
    for _ in range(3):
        g = led.acquire(AcquireRequest("s", "m1", "", 1, 0), T0, T0)
        assert isinstance(g, Granted)
        ids.append(g.reservation.id)
    assert ids == [f"{n:032x}" for n in (1, 2, 3)]
