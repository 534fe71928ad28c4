"""MarkSent from the client (issue 15): the real SDK against the fake provider and a REAL
limiterd whose refill allowance is on. A call that takes a full bucket down is held by the
daemon until the client marks its send; every face of the client marks just before it sends,
without waiting for the answer.

The proof is the daemon's bucket while the provider still works on the call: a held refill
resumes only on the mark (without it, only at the Report, which has not happened yet).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import anthropic
import grpc
import pytest
from client_daemon import CLIENT_TEST_CONFIG, Daemon
from fake_provider import FakeProvider, Reply

from limiterd.config.loader import parse_config
from limiterd.server import running_server
from limiterd.shared.settings import SharedLedger
from limiterd_client import (
    AnthropicAdapter,
    AsyncAnthropicAdapter,
    Limiter,
    RetryPolicy,
    SyncLimiter,
)
from limiterd_client.transport import limited_http_client
from tests.redis_server import redis_server

SONNET = "claude-sonnet-4-6"  # 1000 requests a minute in the test config
MSG: dict[str, Any] = {"max_tokens": 64, "messages": [{"role": "user", "content": "Hi there"}]}
# How long the test waits for the daemon to reach a state before calling it hung.
HANG_S = 20.0


@pytest.fixture(params=["local", "redis"])
async def marking(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Daemon]:
    """A daemon with the shipped refill allowance (the client tests' own config has it off)."""
    base = parse_config(CLIENT_TEST_CONFIG, "<client tests>")
    config = replace(base, settings=replace(base.settings, refill_allowance_s=0.1))
    async with AsyncExitStack() as stack:
        shared = None
        if request.param == "redis":
            shared = SharedLedger(stack.enter_context(redis_server(tmp_path / "redis")).url)
        srv = await stack.enter_async_context(running_server(config=config, shared=shared))
        async with grpc.aio.insecure_channel(srv.target) as ch:
            yield Daemon(srv, ch)


async def requests_level(daemon: Daemon) -> float:
    b = await daemon.bucket(SONNET)
    return next(d.level for d in b.dimensions if d.name == "requests")


async def until(check: Any, what: str) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + HANG_S
    while not await check():
        assert loop.time() < give_up, f"hung waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("face", ["adapter", "sync adapter", "transport", "sync transport"])
async def test_the_client_marks_its_send_and_the_daemon_refills_from_it(
        marking: Daemon, provider: FakeProvider, face: str) -> None:
    hold = threading.Event()
    provider.script(SONNET, Reply.ok("marked", hold=hold))
    sync = face.startswith("sync")
    lim: Any = SyncLimiter(marking.target) if sync else Limiter(marking.target)
    try:
        if face == "adapter":
            sdk: Any = anthropic.AsyncAnthropic(api_key="sk-test", base_url=provider.base_url)
            ad = AsyncAnthropicAdapter(sdk, lim, scope="s", retry=RetryPolicy.none())
            call: Any = asyncio.ensure_future(ad.create(model=SONNET, **MSG))
        elif face == "sync adapter":
            sdk = anthropic.Anthropic(api_key="sk-test", base_url=provider.base_url)
            sad = AnthropicAdapter(sdk, lim, scope="s", retry=RetryPolicy.none())
            call = asyncio.ensure_future(asyncio.to_thread(sad.create, model=SONNET, **MSG))
        elif face == "transport":
            sdk = anthropic.AsyncAnthropic(api_key="sk-test", base_url=provider.base_url,
                                           http_client=limited_http_client(lim), max_retries=0)
            call = asyncio.ensure_future(sdk.messages.create(model=SONNET, **MSG))
        else:
            sdk = anthropic.Anthropic(api_key="sk-test", base_url=provider.base_url,
                                      http_client=limited_http_client(lim), max_retries=0)
            call = asyncio.ensure_future(asyncio.to_thread(
                sdk.messages.create, model=SONNET, **MSG))

        async def at_provider() -> bool:
            return any(r.path == "/v1/messages" for r in provider.requests)

        await until(at_provider, "the call to reach the provider")
        # The provider still works on it (no Report yet): the refill runs again, from the mark.
        await until(lambda: _above(marking, 999.0), "the daemon's refill to resume")
        assert lim.counters.marks_sent == 1
        hold.set()
        await call
        assert [r.settlement is not None for r in marking.settled()] == [True]
        if sync:
            sdk.close()
        else:
            await sdk.close()
    finally:
        hold.set()
        if sync:
            await asyncio.to_thread(lim.close)
        else:
            await lim.close()


async def _above(daemon: Daemon, level: float) -> bool:
    return await requests_level(daemon) > level + 1e-6


async def test_a_reservation_that_does_not_promise_is_not_asked_to_mark(
        marking: Daemon) -> None:
    async with Limiter(marking.target) as lim:
        async with lim.reserve("s", SONNET, input_tokens=10, max_output_tokens=10) as r:
            assert r.grant is not None and not r.grant.mark_sent_wanted
            r.mark_called()
            await r.report(10, 10)
        async with lim.reserve("s2", SONNET, input_tokens=10, max_output_tokens=10,
                               marks_sent=True) as r:
            assert r.grant is not None and r.grant.mark_sent_wanted  # s2's bucket was full
            r.mark_called()
            r.mark_called()  # once only
            await r.report(10, 10)
        assert lim.counters.marks_sent == 1


@pytest.mark.parametrize("sync", [False, True])
async def test_the_transport_marks_only_once_connected(marking: Daemon, dead: str,
                                                       sync: bool) -> None:
    """The drop-in transport marks when the request's headers go out, after DNS, TCP and
    TLS: a request that never connects sends no mark (the hold ends at its Report)."""
    url = f"http://{dead}"
    if sync:
        lim: Any = SyncLimiter(marking.target)
        sdk: Any = anthropic.Anthropic(api_key="sk-test", base_url=url, max_retries=0,
                                       http_client=limited_http_client(lim))
        with pytest.raises(anthropic.APIConnectionError):
            await asyncio.to_thread(sdk.messages.create, model=SONNET, **MSG)
        sdk.close()
        await asyncio.to_thread(lim.close)
    else:
        lim = Limiter(marking.target)
        sdk = anthropic.AsyncAnthropic(api_key="sk-test", base_url=url, max_retries=0,
                                       http_client=limited_http_client(lim))
        with pytest.raises(anthropic.APIConnectionError):
            await sdk.messages.create(model=SONNET, **MSG)
        await sdk.close()
        await lim.close()
    assert lim.counters.marks_sent == 0
    assert await marking.open_leases() == []  # reported as never sent
