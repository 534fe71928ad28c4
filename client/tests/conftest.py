"""Client fixtures: a REAL limiterd in-process on an ephemeral port, and the fake provider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from client_daemon import CLIENT_TEST_CONFIG, Daemon, refused_target
from fake_provider import FakeProvider

from limiterd.config.loader import parse_config
from limiterd.server import running_server


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    async with running_server(config=parse_config(CLIENT_TEST_CONFIG, "<client tests>")) as srv:
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
