"""The gateway marks its upstream send (issue 15): `limiterd gateway` as a subprocess, a real
daemon with the shipped refill allowance, the fake provider holding the call.

A call that takes a full bucket down holds the daemon's refill until the gateway's MarkSent;
while the provider still works on the call (no Report yet) the refill runs again only if
that mark arrived.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import anthropic
import grpc
import pytest

from client.tests.fake_provider import FakeProvider, Reply
from limiterd.config.loader import parse_config
from limiterd.server import running_server
from tests.gateway_harness import DAEMON_CONFIG, DaemonView, start_gateway, wait_for

KEY = "sk-test-marks"
MODEL = "claude-any-1"  # the "claude-*" rule: 10,000 requests a minute


async def test_the_gateway_marks_just_before_it_sends_upstream(tmp_path: Path) -> None:
    config = parse_config(DAEMON_CONFIG, "<gateway tests>")
    assert config.settings.refill_allowance_s > 0  # the shipped default
    hold = threading.Event()
    with FakeProvider() as provider:
        provider.script(MODEL, Reply.ok("marked", hold=hold))
        async with running_server(config=config) as srv, \
                grpc.aio.insecure_channel(srv.target) as ch:
            daemon = DaemonView(srv, ch)
            marked: list[str] = []  # what the daemon's engine was told (it still does it)
            engine_mark = srv.engine.mark_sent

            async def seen(reservation_id: str) -> None:
                marked.append(reservation_id)
                await engine_mark(reservation_id)

            srv.engine.mark_sent = seen  # type: ignore[method-assign]
            gw = await start_gateway(tmp_path, srv.target, provider.base_url)
            try:
                sdk = anthropic.AsyncAnthropic(api_key=KEY, base_url=gw.base_url,
                                               max_retries=0)
                call = asyncio.ensure_future(sdk.messages.create(
                    model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}]))
                await wait_for(lambda: any(r.path == "/v1/messages" for r in provider.requests),
                               "the call to reach the provider")
                levels: list[float] = []

                async def refilling() -> bool:
                    b = await daemon.bucket(KEY, MODEL)
                    levels.append(next(d.level for d in b.dimensions if d.name == "requests"))
                    return levels[-1] > 9999.0 + 1e-6

                loop = asyncio.get_running_loop()
                give_up = loop.time() + 20
                while not await refilling():  # resumed by the mark, not by a Report
                    assert loop.time() < give_up, f"still held: {levels[-5:]}"
                    await asyncio.sleep(0.01)
                assert daemon.settled(KEY) == []  # the call is still at the provider
                [opened] = [r.id for r in srv.engine.ledger.open_reservations()]
                assert marked == [opened]
                hold.set()
                await call
                await sdk.close()
                await daemon.wait_settled(KEY, 1)
            finally:
                hold.set()
                assert await gw.close() == 0, gw.log_text()


async def test_an_upstream_never_reached_gets_no_mark(tmp_path: Path) -> None:
    """The gateway marks when the request's headers go out (after connecting): a refused
    connection sends none, and the hold ends at the Report of the failed attempt."""
    config = parse_config(DAEMON_CONFIG, "<gateway tests>")
    with socket.socket() as refused:  # bound, never listening: connections are refused
        refused.bind(("127.0.0.1", 0))
        upstream = f"http://127.0.0.1:{refused.getsockname()[1]}"
        async with running_server(config=config) as srv, \
                grpc.aio.insecure_channel(srv.target) as ch:
            daemon = DaemonView(srv, ch)
            marked: list[str] = []
            engine_mark = srv.engine.mark_sent

            async def seen(reservation_id: str) -> None:
                marked.append(reservation_id)
                await engine_mark(reservation_id)

            srv.engine.mark_sent = seen  # type: ignore[method-assign]
            gw = await start_gateway(tmp_path, srv.target, upstream)
            try:
                sdk = anthropic.AsyncAnthropic(api_key=KEY, base_url=gw.base_url,
                                               max_retries=0)
                with pytest.raises(anthropic.APIStatusError):
                    await sdk.messages.create(model=MODEL, max_tokens=16,
                                              messages=[{"role": "user", "content": "hi"}])
                await sdk.close()
                [r] = await daemon.wait_settled(KEY, 1)
                assert r.settlement is not None
            finally:
                assert await gw.close() == 0, gw.log_text()
            assert marked == []
