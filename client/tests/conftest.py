"""Client fixtures: a REAL limiterd in-process on an ephemeral port, and the fake provider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest
from client_daemon import CLIENT_TEST_CONFIG, Daemon, refused_target
from fake_provider import FakeProvider

from limiterd.config.loader import parse_config
from limiterd.server import running_server
from limiterd.shared.settings import SharedLedger
from tests.redis_server import redis_server


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The daemon's ledger: "local" unless a test is parametrized with `over_backends`."""
    return str(getattr(request, "param", "local"))


@pytest.fixture
async def daemon(backend: str, tmp_path: Path) -> AsyncIterator[Daemon]:
    config = parse_config(CLIENT_TEST_CONFIG, "<client tests>")
    async with AsyncExitStack() as stack:
        shared = None
        if backend == "redis":  # a real redis-server of the test's own
            redis = stack.enter_context(redis_server(tmp_path / "redis"))
            shared = SharedLedger(redis.url)
        srv = await stack.enter_async_context(running_server(config=config, shared=shared))
        async with grpc.aio.insecure_channel(srv.target) as ch:
            d = Daemon(srv, ch)
            yield d
            # Every scenario must leave the daemon holding no open reservation.
            await asyncio.sleep(0)
            leases = await d.open_leases()
            assert leases == [], f"leaked reservations: {leases}"


dead = pytest.fixture(refused_target)


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        yield fp
