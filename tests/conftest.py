"""Shared fixtures: a real daemon in-process on an ephemeral port, and real channels to it.
Also the hypothesis profiles (client/tests has no property tests)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.internal.conjecture import engine as hypothesis_engine

from limiterd.clock import FakeClock
from limiterd.config.loader import parse_config
from limiterd.config.model import Config
from limiterd.server import RunningServer, running_server
from limiterd.shared.settings import SharedLedger
from limiterd.storage import Journal, MemoryJournal
from limiterd.storage.sqlite import SqliteJournal
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.redis_server import redis_cluster, redis_server

# Small limits so tests reach them quickly. "tiny": 10 requests, 1000 in, 1000 out per minute.
TEST_CONFIG_TOML = """
[daemon]
default_lease_ms = 60000
max_lease_ms = 600000
max_wait_ms = 60000
max_waiters_per_queue = 300
refill_allowance_ms = 0  # exact refill times here; the allowance has its own tests

[models."tiny"]
requests_per_minute = 10
input_tokens_per_minute = 1000
output_tokens_per_minute = 1000

[models."conc"]
requests_per_minute = 1000
input_tokens_per_minute = 1000000
output_tokens_per_minute = 1000000
max_concurrent = 2

[models."claude-*"]
requests_per_minute = 1000
input_tokens_per_minute = 1000000
output_tokens_per_minute = 200000

[user_limits."tiny"]
requests_per_minute = 3

[[scopes]]
scope = "7ea9a00123456789abcdef0123456789abcdef0123456789abcdef0123456789"
alias = "team-a"
"""


# The configured scope (alias "team-a"): a scope is a key's hash.
TEAM_A = "7ea9a00123456789abcdef0123456789abcdef0123456789abcdef0123456789"

# `make test`: the same examples every run (derandomize), so its verdict never changes; a
# failure prints the blob that reproduces it (@reproduce_failure). `make test-long`: random
# exploration with ten times the examples, under a seed the Makefile prints.
_COMMON = settings(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("repeatable", _COMMON, derandomize=True, max_examples=80)
settings.register_profile("explore", _COMMON, derandomize=False, max_examples=800)
settings.load_profile(os.environ.get("LIMITERD_HYPOTHESIS", "repeatable"))
# Shrinking a long stateful failure once took five minutes (hypothesis' own cap): report the
# smallest case found within a minute instead. The library leaves this constant to be patched.
hypothesis_engine.MAX_SHRINKING_SECONDS = 60


def make_test_config() -> Config:
    return parse_config(TEST_CONFIG_TOML, "<tests>")


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """Which ledger `daemon` runs: "local" unless a module parametrizes it (indirect) over
    BACKENDS, as the API contract suites do, so both ledgers give the same answers."""
    return getattr(request, "param", "local")


# The Cluster runs only in `make test-long` (3 more redis-server processes per test).
BACKENDS = ("local", "redis", pytest.param("cluster", marks=pytest.mark.long))


@pytest.fixture(params=["memory", "sqlite"])
def any_journal(request: pytest.FixtureRequest, tmp_path: Path) -> Journal:
    """Each journal the engine runs on (SQLite on a real file): engine tests run over all."""
    if request.param == "memory":
        return MemoryJournal()
    return SqliteJournal(tmp_path / "limiterd.sqlite3")


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A real redis-server of its own, on a free loopback port, for one test."""
    with redis_server(tmp_path / "redis") as server:
        yield server.url


@pytest.fixture
async def daemon(backend: str, tmp_path: Path) -> AsyncIterator[RunningServer]:
    if backend == "local":
        async with running_server(config=make_test_config()) as srv:
            yield srv
        return
    if backend == "cluster":
        with redis_cluster(tmp_path / "cluster") as nodes:
            async with running_server(config=make_test_config(),
                                      shared=SharedLedger(nodes[0].url, cluster=True)) as srv:
                yield srv
        return
    with redis_server(tmp_path / "redis") as server:
        async with running_server(config=make_test_config(),
                                  shared=SharedLedger(server.url)) as srv:
            yield srv


@pytest.fixture
async def channel(daemon: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(daemon.target) as ch:
        yield ch


@pytest.fixture
def limiter(channel: grpc.aio.Channel) -> pb_grpc.LimiterStub:
    return pb_grpc.LimiterStub(channel)


@pytest.fixture
def admin(channel: grpc.aio.Channel) -> pb_grpc.AdminStub:
    return pb_grpc.AdminStub(channel)


@dataclass(frozen=True)
class Clocked:
    """A real daemon over a real channel whose time only the test moves (FakeClock): refill,
    deadlines and leases happen when the test steps them, however slow the machine is."""

    server: RunningServer
    clock: FakeClock
    limiter: pb_grpc.LimiterStub
    admin: pb_grpc.AdminStub

    async def queue_depth(self, model: str = "tiny") -> int:
        buckets = (await self.admin.GetBuckets(pb.GetBucketsRequest(model=model))).buckets
        return buckets[0].queue_depth if buckets else 0


@pytest.fixture
async def clocked() -> AsyncIterator[Clocked]:
    clock = FakeClock()
    async with running_server(config=make_test_config(), clock=clock) as srv:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            yield Clocked(srv, clock, pb_grpc.LimiterStub(ch), pb_grpc.AdminStub(ch))


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     timeout_s: float = 10.0) -> None:
    """Wait until `check()` holds: for the daemon to have seen a call or a cancellation.
    Never a fixed sleep; the bound only turns a hang into a failure that says what."""
    try:
        async with asyncio.timeout(timeout_s):
            while not await check():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s} s: {what}") from None
