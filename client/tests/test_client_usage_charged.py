"""A failed attempt is charged what it used: nothing when the provider refused it (429, 529,
another 4xx, a connection never made), its known usage otherwise. The real SDK against the
fake provider and a REAL limiterd."""

from __future__ import annotations

from typing import Any

import anthropic
import grpc
import grpc.aio
import pytest
from client_daemon import Daemon, over_backends
from fake_provider import FakeProvider, Reply
from wire import Recorder

from limiterd.clock import FakeClock
from limiterd.config.loader import load_config
from limiterd.server import running_server
from limiterd_client import AsyncAnthropicAdapter, Limiter, ProviderError, RetryPolicy

SONNET, OPUS = "claude-sonnet-4-6", "claude-opus-4-1"
OUTPUT_CAP = 8000  # Opus's output tokens a minute, Tier 1 (the built-in limits)
MSG: dict[str, Any] = {"max_tokens": 300, "messages": [{"role": "user", "content": "Hi"}]}


def no_sleep_policy(**kw: Any) -> RetryPolicy:
    async def sleep(s: float) -> None:
        return None
    return RetryPolicy.interactive(sleep=sleep, random=lambda: 0.5, **kw)


async def test_three_overloads_on_opus_leave_its_output_budget_whole(
        provider: FakeProvider) -> None:
    """The issue's case: under the built-in (Tier 1) limits, 3 x 529 with max_tokens=2000 took
    Opus's output budget from 8,000 to about 2,000. A 529 uses no tokens."""
    provider.script(OPUS, *[Reply.overloaded()] * 3)
    # The daemon's time stands still: no refill can hide a charge. The first take from a full
    # bucket is charged the refill allowance (the way to the provider), as any grant is; a
    # real clock made that 0 or not by whether 0.1 s passed before the read (failed once).
    config = load_config(None)
    kept = 1 - config.settings.refill_allowance_s / 60.0  # a bucket less its allowance
    async with running_server(config, clock=FakeClock()) as srv, Limiter(srv.target) as lim:
        client = anthropic.AsyncAnthropic(api_key="sk-test", base_url=provider.base_url)
        ad = AsyncAnthropicAdapter(client, lim, retry=no_sleep_policy(max_attempts=3))
        with pytest.raises(ProviderError) as info:
            await ad.create(model=OPUS, max_tokens=2000,
                            messages=[{"role": "user", "content": "Plan my week"}])
        await client.close()
        assert info.value.overloaded and provider.models_called() == [OPUS] * 3
        async with grpc.aio.insecure_channel(srv.target) as ch:
            d = Daemon(srv, ch)
            dims = {x.name: x for x in (await d.bucket(OPUS)).dimensions}
        assert dims["output_tokens"].capacity == OUTPUT_CAP
        # every 529 refunded in full: only the allowance of the take from full is gone
        assert dims["output_tokens"].level == pytest.approx(OUTPUT_CAP * kept)
        assert dims["input_tokens"].level == pytest.approx(30000 * kept)


@pytest.mark.parametrize(("reply", "charged"), [
    (Reply.overloaded(), "nothing"),
    (Reply.rate_limited(retry_after="60"), "nothing"),
    (Reply.error(400, "invalid_request_error", "bad"), "nothing"),
    (Reply.server_error(500), "reserved"),  # unknown work: the safe side
])
@over_backends
async def test_a_failed_attempt_reports_what_it_used(
        daemon: Daemon, provider: FakeProvider, reply: Reply, charged: str) -> None:
    rec = Recorder()
    provider.script(SONNET, reply)
    async with grpc.aio.insecure_channel(daemon.target, interceptors=[rec]) as ch:
        client = anthropic.AsyncAnthropic(api_key="sk-test", base_url=provider.base_url)
        ad = AsyncAnthropicAdapter(client, Limiter(channel=ch), retry=RetryPolicy.none())
        with pytest.raises(ProviderError):
            await ad.create(model=SONNET, **MSG)
        await client.close()
    [acquire], [report] = rec.of("Acquire"), rec.of("Report")
    got = (report.actual_input_tokens, report.actual_output_tokens)
    assert got == ((0, 0) if charged == "nothing"
                   else (acquire.input_tokens, acquire.max_output_tokens))


@over_backends
async def test_a_connection_never_made_is_charged_nothing(daemon: Daemon, dead: str) -> None:
    rec = Recorder()
    async with grpc.aio.insecure_channel(daemon.target, interceptors=[rec]) as ch:
        client = anthropic.AsyncAnthropic(api_key="sk-test",
                                          base_url=f"http://{dead}")
        ad = AsyncAnthropicAdapter(client, Limiter(channel=ch), retry=RetryPolicy.none())
        with pytest.raises(ProviderError) as info:
            await ad.create(model=SONNET, **MSG)
        await client.close()
    assert info.value.code == "connection_error" and not info.value.sent
    [report] = rec.of("Report")
    assert (report.actual_input_tokens, report.actual_output_tokens) == (0, 0)
