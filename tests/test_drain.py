"""Stopping ends waits at once, on either ledger: UNAVAILABLE with a retry-after, not a hold
through the grace and a cut-off."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from limiterd.server import RunningServer, start_server
from limiterd.shared.settings import SharedLedger
from limiterd.storage.memory import MemoryJournal
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.conftest import BACKENDS, make_test_config
from tests.redis_server import redis_server


@contextlib.asynccontextmanager
async def started(backend: str, tmp_path: Path) -> AsyncIterator[RunningServer]:
    with contextlib.ExitStack() as stack:
        shared = None
        if backend == "redis":
            shared = SharedLedger(stack.enter_context(redis_server(tmp_path / "redis")).url)
        yield await start_server(make_test_config(), MemoryJournal(), "127.0.0.1:0",
                                 shared=shared)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_stop_ends_waits_with_a_retry_after(backend: str, tmp_path: Path) -> None:
    async with started(backend, tmp_path) as srv:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LimiterStub(ch)
            await stub.Acquire(pb.AcquireRequest(scope="s", model="tiny", input_tokens=1000))
            waiting = stub.Acquire(pb.AcquireRequest(scope="s", model="tiny", input_tokens=10,
                                                     max_wait_ms=60_000))
            while srv.engine.stats().waiting == 0:
                await asyncio.sleep(0.01)
            stopping = asyncio.create_task(srv.stop(grace_s=30))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await waiting
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert dict(err.value.trailing_metadata() or ())["retry-after-ms"] == "1000"
            await stopping
