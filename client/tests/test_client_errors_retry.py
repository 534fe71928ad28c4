"""Classification, Retry-After parsing and retry timing, with injected clock/sleep/random."""

from __future__ import annotations

import email.utils
import hashlib
import hmac

import pytest

from limiterd_client import (
    ProviderError,
    RetryPolicy,
    classify_http,
    connection_error,
    parse_retry_after_ms,
    scope_for_api_key,
)

NOW = 1_800_000_000.0


def err(status: int, **kw: object) -> ProviderError:
    return classify_http(provider="anthropic", status=status, now=NOW, **kw)  # type: ignore[arg-type]


class FakeTime:
    """A monotonic clock that moves only when the policy sleeps."""

    def __init__(self) -> None:
        self.t = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s

    def sleep_sync(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def test_scope_is_hmac_sha256_hex_and_never_the_key() -> None:
    s = scope_for_api_key("sk-ant-secret", salt="pepper")
    assert s == hmac.new(b"pepper", b"sk-ant-secret", hashlib.sha256).hexdigest()
    assert "secret" not in s and len(s) == 64
    assert scope_for_api_key("sk-ant-secret", salt="other") != s
    with pytest.raises(ValueError, match="key"):
        scope_for_api_key("")


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 529])
def test_retryable_statuses(status: int) -> None:
    assert err(status).retryable


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_other_4xx_are_final(status: int) -> None:
    assert not err(status).retryable


@pytest.mark.parametrize("message,code", [
    ("You have reached your specified API usage limits", None),
    ("Your credit balance is too low", None),
    ("spend limit reached for this workspace", None),
    ("rate limited", "billing_limit"),
])
def test_spend_limit_429_is_final(message: str, code: str | None) -> None:
    e = err(429, code="rate_limit_error", message=message, error_code=code)
    assert e.rate_limited and not e.retryable


def test_plain_429_is_retryable() -> None:
    assert err(429, code="rate_limit_error", message="Number of requests exceeded").retryable


def test_x_should_retry_overrides_everything() -> None:
    assert not err(529, headers={"X-Should-Retry": "false"}).retryable
    assert err(400, headers={"x-should-retry": "true"}).retryable
    assert err(429, message="credit balance too low",
               headers={"x-should-retry": "true"}).retryable
    assert err(500, headers={"x-should-retry": "maybe"}).retryable  # unknown value: ignored


def test_connection_errors_are_retryable() -> None:
    assert connection_error("anthropic", "reset").retryable
    t = connection_error("anthropic", "timed out", timeout=True)
    assert t.retryable and t.timeout and t.status is None


def test_overload_inside_200_stream_is_a_529() -> None:
    e = err(200, code="overloaded_error", message="Overloaded")
    assert e.status == 529 and e.overloaded and e.retryable


def test_retry_after_parsing() -> None:
    assert parse_retry_after_ms({"retry-after-ms": "1500"}, NOW) == 1500
    assert parse_retry_after_ms({"Retry-After": "2"}, NOW) == 2000
    assert parse_retry_after_ms({"retry-after": "0.25"}, NOW) == 250
    # retry-after-ms wins over retry-after
    assert parse_retry_after_ms({"retry-after-ms": "10", "retry-after": "9"}, NOW) == 10
    date = email.utils.formatdate(NOW + 30, usegmt=True)
    assert parse_retry_after_ms({"retry-after": date}, NOW) == 30_000
    past = email.utils.formatdate(NOW - 30, usegmt=True)
    assert parse_retry_after_ms({"retry-after": past}, NOW) == 0
    assert parse_retry_after_ms({"retry-after": "soon"}, NOW) is None
    assert parse_retry_after_ms({}, NOW) is None
    assert err(429, headers={"retry-after": "7"}).retry_after_ms == 7000


def test_presets() -> None:
    i, a = RetryPolicy.interactive(), RetryPolicy.analysis()
    assert (i.max_attempts - 1, i.max_elapsed) == (2, 15.0)
    assert (a.max_attempts - 1, a.max_elapsed) == (8, 600.0)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


@pytest.mark.parametrize("r", [0.0, 0.5, 0.999999])
def test_full_jitter_bounds(r: float) -> None:
    p = RetryPolicy(base_delay=1.0, max_delay=5.0, max_attempts=10, max_elapsed=1000,
                    random=lambda: r)
    for failures, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (8, 5.0)]:
        d = p.backoff(failures)
        assert 0.0 <= d < cap or (r == 0.0 and d == 0.0)
        assert d == pytest.approx(r * cap)


async def test_run_retries_until_success_with_jittered_sleeps() -> None:
    ft = FakeTime()
    p = RetryPolicy(max_attempts=4, base_delay=1.0, max_delay=8.0, max_elapsed=100,
                    clock=ft.clock, sleep=ft.sleep, random=lambda: 0.5)
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise err(503)
        return "ok"

    assert await p.run(attempt) == "ok"
    assert ft.sleeps == [0.5, 1.0]


async def test_retry_after_is_honoured_exactly() -> None:
    ft = FakeTime()
    p = RetryPolicy(max_attempts=3, max_elapsed=100, clock=ft.clock, sleep=ft.sleep,
                    random=lambda: 0.99)
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise err(429, headers={"retry-after": "12"})
        return "ok"

    assert await p.run(attempt) == "ok"
    assert ft.sleeps == [12.0]


async def test_deadline_is_hard_never_sleeps_past_it() -> None:
    ft = FakeTime()
    p = RetryPolicy(max_attempts=100, base_delay=4.0, max_delay=4.0, max_elapsed=10.0,
                    clock=ft.clock, sleep=ft.sleep, random=lambda: 0.9)
    start = ft.t

    async def attempt() -> str:
        ft.t += 0.5  # each attempt takes half a second
        raise err(500)

    with pytest.raises(ProviderError):
        await p.run(attempt)
    assert ft.t - start <= 10.0 + 0.5  # the last attempt may start at the deadline
    for s in ft.sleeps:
        assert s <= 3.6 + 1e-9
    # and the final sleep was clipped to what remained
    assert sum(ft.sleeps) <= 10.0


async def test_gives_up_at_once_when_retry_after_exceeds_remaining() -> None:
    ft = FakeTime()
    p = RetryPolicy(max_attempts=5, max_elapsed=15.0, clock=ft.clock, sleep=ft.sleep)
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        raise err(429, headers={"retry-after": "20"})

    with pytest.raises(ProviderError) as info:
        await p.run(attempt)
    assert calls == 1 and ft.sleeps == [] and info.value.retry_after_ms == 20_000


def test_x_should_retry_false_stops_retries_sync() -> None:
    ft = FakeTime()
    p = RetryPolicy(max_attempts=5, clock=ft.clock, sleep_sync=ft.sleep_sync)
    calls = 0

    def attempt() -> str:
        nonlocal calls
        calls += 1
        raise err(529, headers={"x-should-retry": "false"})

    with pytest.raises(ProviderError):
        p.run_sync(attempt)
    assert calls == 1 and ft.sleeps == []


def test_x_should_retry_true_retries_a_400_sync() -> None:
    ft = FakeTime()
    p = RetryPolicy(max_attempts=3, base_delay=1, max_delay=1, clock=ft.clock,
                    sleep_sync=ft.sleep_sync, random=lambda: 0.25)
    calls = 0

    def attempt() -> str:
        nonlocal calls
        calls += 1
        raise err(400, headers={"x-should-retry": "true"})

    with pytest.raises(ProviderError):
        p.run_sync(attempt)
    assert calls == 3 and ft.sleeps == [0.25, 0.25]


def test_max_attempts_counts_the_first() -> None:
    ft = FakeTime()
    p = RetryPolicy.interactive(clock=ft.clock, sleep_sync=ft.sleep_sync, random=lambda: 0.1)
    calls = 0

    def attempt() -> str:
        nonlocal calls
        calls += 1
        raise err(503)

    with pytest.raises(ProviderError):
        p.run_sync(attempt)
    assert calls == 3 and len(ft.sleeps) == 2
