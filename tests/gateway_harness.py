"""Real parts for the gateway tests: a daemon (in this process, over real gRPC), the fake
provider (a real HTTP server on loopback), and `limiterd gateway` as a subprocess.

The daemon runs on the test's event loop, so tests drive the gateway with the async
`anthropic` SDK (or aiohttp) and read exact settlements from the daemon's ledger.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc

from limiterd.ledger.model import Reservation
from limiterd.server import RunningServer
from limiterd_client import scope_for_api_key
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent

# "claude-one-1" serves one call at a time, so a second caller waits in the queue.
DAEMON_CONFIG = """
[daemon]
default_lease_ms = 60000
max_lease_ms = 600000
max_wait_ms = 60000

[models."claude-one-1"]
requests_per_minute = 1000
input_tokens_per_minute = 1000000
output_tokens_per_minute = 1000000
max_concurrent = 1

# Fallback tests: each model its own rule, so a pause on one leaves the other free.
[models."claude-big-1"]
requests_per_minute = 1000

[models."claude-small-1"]
requests_per_minute = 1000

# Per-user limits: one request a minute for each x-limiterd-user.
[models."claude-user-1"]
requests_per_minute = 1000

[user_limits."claude-user-1"]
requests_per_minute = 1

[models."claude-*"]
requests_per_minute = 10000
input_tokens_per_minute = 1000000
output_tokens_per_minute = 1000000
"""


async def wait_for(predicate: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """Wait on a condition (never a bare sleep): poll it on the loop until true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    async def close(self) -> int:
        """SIGTERM and wait for the exit, off the event loop: the in-process daemon must keep
        answering (the gateway's last Reports) while the gateway shuts down."""
        return await asyncio.to_thread(self.stop)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


async def start_gateway(tmp_path: Path, limiter: str, upstream: str, config: str = "",
                        *args: str) -> Gateway:
    """`limiterd gateway` on an ephemeral port, ready to serve when this returns."""
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(config)
    log = tmp_path / f"gateway-{len(list(tmp_path.glob('gateway-*.log')))}.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'client' / 'src'}"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "limiterd", "gateway", "--listen", "127.0.0.1:0",
             "--limiter", limiter, "--upstream", upstream, "--config", str(cfg),
             "--grace", "2", *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    found: list[int] = []

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited {proc.returncode}:\n{log.read_text()}")
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if m:
            found.append(int(m.group(1)))
        return bool(m)

    try:
        await wait_for(listening, "the gateway to listen", timeout=30)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Gateway(proc, log, found[0])


class DaemonView:
    """What the tests read from the daemon: settlements (from its ledger) and Admin calls."""

    def __init__(self, srv: RunningServer, channel: grpc.aio.Channel) -> None:
        self.srv = srv
        self.target = srv.target
        self.admin = pb_grpc.AdminStub(channel)

    def settled(self, key: str | None = None) -> list[Reservation]:
        scope = scope_for_api_key(key) if key is not None else None
        done = [r for r in self.srv.engine.ledger._settled.values()
                if scope is None or r.scope == scope]
        return sorted(done, key=lambda r: r.settlement.settled_at if r.settlement else 0.0)

    async def wait_settled(self, key: str, n: int, timeout: float = 15.0) -> list[Reservation]:
        await wait_for(lambda: len(self.settled(key)) >= n, f"{n} settlements", timeout)
        return self.settled(key)

    async def open_leases(self) -> list[pb.Lease]:
        return list((await self.admin.ListLeases(pb.ListLeasesRequest())).leases)

    async def bucket(self, key: str, model: str) -> pb.Bucket:
        buckets = (await self.admin.GetBuckets(pb.GetBucketsRequest(
            scope=scope_for_api_key(key), model=model))).buckets
        [b] = [b for b in buckets if not b.user]
        return cast(pb.Bucket, b)


def actual(r: Reservation) -> tuple[int, int]:
    """(input, output) tokens a settled reservation was charged."""
    assert r.settlement is not None
    s = r.settlement
    return (r.reserved.input_tokens - s.refunded.input_tokens + s.overrun.input_tokens,
            r.reserved.output_tokens - s.refunded.output_tokens + s.overrun.output_tokens)
