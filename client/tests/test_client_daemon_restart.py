"""The daemon is killed (SIGKILL) while the provider works on a call, then restarted on the
same SQLite file: the app still gets the provider's answer, and the Report lands after the
restart. A real daemon process, the real SDK, the fake provider."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import grpc
import pytest
from client_daemon import CLIENT_TEST_CONFIG
from fake_provider import FakeProvider, Reply
from grpc_health.v1 import health_pb2, health_pb2_grpc
from wire import Recorder

from limiterd_client import (
    AnthropicAdapter,
    AsyncAnthropicAdapter,
    FailClosed,
    FailOpen,
    Limiter,
    LimiterUnavailable,
    RetryPolicy,
    SafeCapacity,
    SyncLimiter,
)
from limiterd_client._core import CHANNEL_OPTIONS
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
SONNET = "claude-sonnet-4-6"
MSG: dict[str, Any] = {"max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}


class DaemonProcess:
    """`limiterd serve` as a real process and a SQLite file. The first start takes a port of
    the kernel's choosing (read from its log: one picked free beforehand can be taken first);
    restarts keep it, as callers hold the target."""

    def __init__(self, tmp: Path) -> None:
        self.target = "127.0.0.1:0"
        self.config = tmp / "limiterd.toml"
        self.config.write_text(CLIENT_TEST_CONFIG)
        self.db = tmp / "limiterd.sqlite3"
        self.log = tmp / "limiterd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'client' / 'src'}")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "limiterd", "serve", "--listen", self.target,
                 "--config", str(self.config), "--db", str(self.db)],
                cwd=ROOT, env=env, stdout=log, stderr=log)
        if self.target.endswith(":0"):
            self.target = self._serving_on()
        with grpc.insecure_channel(self.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest()
            # wait_for_ready: the call waits for the daemon's port instead of a sleep loop
            status = health.Check(req, timeout=30, wait_for_ready=True).status
            assert status == health_pb2.HealthCheckResponse.SERVING, self.log.read_text()

    def _serving_on(self) -> str:
        deadline = time.monotonic() + 30
        while (found := re.search(r"limiterd serving on (\S+?);", self.log.read_text())) is None:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"no start-up line: {self.log.read_text()}"
            time.sleep(0.02)  # polling the daemon's log for its start-up line
        return found.group(1)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def open_leases(self) -> list[pb.Lease]:
        with grpc.insecure_channel(self.target) as ch:
            return list(pb_grpc.AdminStub(ch).ListLeases(pb.ListLeasesRequest()).leases)

    def report_again(self, request: pb.ReportRequest) -> pb.ReportResponse:
        with grpc.insecure_channel(self.target) as ch:
            return pb_grpc.LimiterStub(ch).Report(request)


@pytest.fixture
def daemon_process(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path)
    d.start()
    try:
        yield d
    finally:
        d.stop()


async def requested(provider: FakeProvider, n: int = 1) -> None:
    """Wait (on the condition, not a fixed sleep) until the provider has `n` requests."""
    while len(provider.models_called()) < n:
        await asyncio.sleep(0.01)


async def kill_while_provider_works(daemon: DaemonProcess, provider: FakeProvider,
                                    hold: threading.Event) -> None:
    await requested(provider)
    await asyncio.to_thread(daemon.kill)  # the reservation is open, the call in flight
    hold.set()  # the provider answers while the daemon is down


POLICIES = {"fail_closed": FailClosed(), "fail_open": FailOpen(),
            "safe_capacity": SafeCapacity(requests_per_minute=5, tokens_per_minute=20_000)}


@pytest.mark.parametrize(("kind", "policy"), [
    ("create", "fail_closed"), ("create", "fail_open"), ("create", "safe_capacity"),
    ("stream", "fail_closed")])
async def test_async_answer_is_returned_and_the_report_lands_after_restart(
        daemon_process: DaemonProcess, provider: FakeProvider, kind: str, policy: str) -> None:
    hold = threading.Event()
    provider.script(SONNET, Reply.ok("the provider did the work", input_tokens=7,
                                     output_tokens=5, hold=hold))
    rec = Recorder()
    channel = grpc.aio.insecure_channel(daemon_process.target, options=CHANNEL_OPTIONS,
                                        interceptors=[rec])
    async with channel, Limiter(channel=channel, on_unavailable=POLICIES[policy],
                                flush_timeout=30) as lim:
        client = anthropic.AsyncAnthropic(api_key="sk-test", base_url=provider.base_url)
        ad = AsyncAnthropicAdapter(client, lim, scope="s", retry=RetryPolicy.none())

        async def call() -> str:
            if kind == "create":
                result = await ad.create(model=SONNET, **MSG)
                return str(result.value.content[0].text)  # type: ignore[union-attr]
            return "".join([t async for t in ad.stream(model=SONNET, **MSG)])

        task = asyncio.create_task(call())
        await kill_while_provider_works(daemon_process, provider, hold)
        assert await task == "the provider did the work"  # not LimiterUnavailable
        await client.close()
        assert lim.pending_settles == 1 and lim.counters.settles_deferred == 1

        await asyncio.to_thread(daemon_process.start)  # same port, same SQLite file
        assert await lim.flush(30) == 0
    assert (lim.counters.settles_delivered, lim.counters.settles_dropped) == (1, 0)
    assert daemon_process.open_leases() == []
    # The daemon holds this very Report (a repeat is answered as a replay, not refused as a
    # lease settled by expiry), with the provider's usage: 64 reserved, 5 used.
    report = rec.of("Report")[-1]
    again = daemon_process.report_again(report)
    assert again.replayed and again.settlement.refunded_output_tokens == 64 - 5
    assert provider.models_called() == [SONNET]  # the app never paid twice


async def test_sync_answer_is_returned_and_close_flushes_the_report(
        daemon_process: DaemonProcess, provider: FakeProvider) -> None:
    hold = threading.Event()
    provider.script(SONNET, Reply.ok("sync answer", hold=hold))
    lim = SyncLimiter(daemon_process.target, flush_timeout=30)
    client = anthropic.Anthropic(api_key="sk-test", base_url=provider.base_url)
    ad = AnthropicAdapter(client, lim, scope="s", retry=RetryPolicy.none())
    task = asyncio.create_task(asyncio.to_thread(ad.create, model=SONNET, **MSG))
    await kill_while_provider_works(daemon_process, provider, hold)
    result = await task
    assert result.value.content[0].text == "sync answer"  # type: ignore[union-attr]
    assert lim.pending_settles == 1
    await asyncio.to_thread(daemon_process.start)
    await asyncio.to_thread(lim.close)  # flushes: the Report lands before close returns
    client.close()
    assert lim.pending_settles == 0 and lim.counters.settles_delivered == 1
    assert daemon_process.open_leases() == []


async def test_a_caller_waiting_when_the_daemon_drains_gets_unavailable(
        daemon_process: DaemonProcess) -> None:
    """SIGTERM ends the waits (CANCELLED or UNAVAILABLE from the daemon): the client says the
    limiter is unavailable, so the app's policy (fail closed/open, safe capacity) applies."""
    async with Limiter(daemon_process.target, transport_attempts=1) as lim:
        for _ in range(2):  # SCARCE admits 2 a minute
            async with lim.reserve("s", "claude-scarce-1", input_tokens=1,
                                   max_output_tokens=1) as r:
                r.mark_called()
        queued = asyncio.Event()
        waiter = asyncio.create_task(lim.reserve(
            "s", "claude-scarce-1", input_tokens=1, max_output_tokens=1, max_wait=50,
            on_wait=lambda u: queued.set()).__aenter__())
        await queued.wait()  # it is in the daemon's queue
        assert daemon_process.proc is not None
        daemon_process.proc.send_signal(signal.SIGTERM)
        with pytest.raises(LimiterUnavailable):
            await waiter
