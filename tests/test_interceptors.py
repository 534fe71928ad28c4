"""What wraps every call: requests that are not protobuf, metrics for every method (streams
included), and the admin token over reflection."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from limiterd.server import Security, running_server
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.conftest import make_test_config
from tests.metrics_scrape import body_once, calls_counted

# Field 1 (scope), length-delimited, says 100 bytes follow; 1 does.
TRUNCATED = b"\x0a\x64x"


async def test_malformed_requests_are_invalid_argument_with_throttled_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_server(config=make_test_config()) as d:
        async with grpc.aio.insecure_channel(d.target) as ch:
            for method in ("/limiter.v1.Limiter/Acquire", "/limiter.v1.Limiter/AcquireStream",
                           "/limiter.v1.Admin/ListLeases"):
                raw = (ch.unary_stream if method.endswith("Stream") else ch.unary_unary)(method)
                for _ in range(20):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        call = raw(TRUNCATED)
                        if method.endswith("Stream"):
                            async for _event in call:  # type: ignore[union-attr]
                                pass
                        else:
                            await call
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "not a valid" in str(err.value.details())
            # A good call still works on the same channel.
            ok = await pb_grpc.LimiterStub(ch).Acquire(pb.AcquireRequest(
                scope="s", model="tiny", input_tokens=1))
            assert ok.reservation_id
    bad = [r for r in caplog.records if "could not be decoded" in r.getMessage()]
    assert len(bad) == 1  # 60 bad requests, one line (the next after 10 s says how many more)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text


async def test_acquire_stream_counts_like_acquire() -> None:
    async with running_server(config=make_test_config(), metrics_listen="127.0.0.1:0") as d:
        async with grpc.aio.insecure_channel(d.target) as ch:
            stub = pb_grpc.LimiterStub(ch)
            events = [e async for e in stub.AcquireStream(pb.AcquireRequest(
                scope="s", model="tiny", input_tokens=1000))]
            assert events[-1].HasField("granted")
            with pytest.raises(grpc.aio.AioRpcError) as err:  # nothing left: tries once
                async for _ in stub.AcquireStream(pb.AcquireRequest(
                        scope="s", model="tiny", input_tokens=10)):
                    pass
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await stub.Acquire(pb.AcquireRequest(scope="t", model="tiny", input_tokens=1))
        # Counted when grpc says each call is done, which may follow the answer.
        both = (calls_counted("AcquireStream", 2), calls_counted("Acquire", 1))
        text = await body_once(d.metrics_target, lambda m: all(c(m) for c in both))
    assert 'limiterd_acquires_total{result="granted"} 2.0' in text
    assert 'limiterd_acquires_total{result="timed_out"} 1.0' in text
    assert 'limiterd_acquire_wait_seconds_count 2.0' in text
    assert 'limiterd_rpc_duration_seconds_count{method="AcquireStream"} 2.0' in text
    assert 'limiterd_rpc_duration_seconds_count{method="Acquire"} 1.0' in text


async def list_services(ch: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()
                        ) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata)
    return [s.name async for r in call for s in r.list_services_response.service]


async def test_reflection_needs_the_admin_token_when_one_is_set() -> None:
    async with running_server(config=make_test_config(),
                              security=Security(admin_token="s3cret")) as d:
        async with grpc.aio.insecure_channel(d.target) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await list_services(ch)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            names = await list_services(ch, (("x-limiterd-admin-token", "s3cret"),))
            assert "limiter.v1.Admin" in names
            # Limiter calls and health need no token.
            await pb_grpc.LimiterStub(ch).Acquire(pb.AcquireRequest(
                scope="s", model="tiny", input_tokens=1))
    async with running_server(config=make_test_config()) as d:  # no token: open as before
        async with grpc.aio.insecure_channel(d.target) as ch:
            assert "limiter.v1.Limiter" in await list_services(ch)
