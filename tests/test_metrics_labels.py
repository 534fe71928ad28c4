"""Metric labels come from the config, never from what callers send: model names that callers
invent fold into `other`, so /metrics stays the same size however many they invent."""

from __future__ import annotations

import asyncio

import grpc

from limiterd.server import running_server
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.conftest import make_test_config
from tests.metrics_scrape import body_once, calls_counted


async def use_models(stub: pb_grpc.LimiterStub, names: list[str]) -> None:
    """Each name: a grant on an unconfigured scope, then a failed call (500 or overloaded,
    alternately; three overloaded reports on one model mark it overloaded)."""

    async def one(i: int, name: str) -> None:
        g = await stub.Acquire(pb.AcquireRequest(scope=f"scope-{i % 7}", model=name,
                                                 input_tokens=1, max_output_tokens=1))
        outcome, status = (pb.OVERLOADED, 529) if i % 2 else (pb.ERROR, 500)
        await stub.Report(pb.ReportRequest(reservation_id=g.reservation_id, outcome=outcome,
                                           provider=pb.ProviderInfo(http_status=status)))

    for start in range(0, len(names), 100):
        await asyncio.gather(*(one(start + i, n)
                               for i, n in enumerate(names[start:start + 100])))


async def test_invented_model_names_do_not_grow_metrics() -> None:
    async with running_server(config=make_test_config(), metrics_listen="127.0.0.1:0") as d:
        async with grpc.aio.insecure_channel(d.target) as ch:
            stub = pb_grpc.LimiterStub(ch)
            # "claude-*" is a configured rule: any name under it is granted.
            await use_models(stub, ["tiny", "claude-x1", *["claude-x0"] * 6])
            # Compared once every call made so far is counted (grpc's done callback).
            small = await body_once(d.metrics_target, calls_counted("Report", 8))
            invented = [f"claude-invented-{i}" for i in range(2000)]
            await use_models(stub, [*invented, *["claude-invented-hot"] * 6])
            large = await body_once(d.metrics_target, calls_counted("Report", 8 + 2006))
    # Every name under "claude-*" spends that one budget, and is labelled by its name.
    assert "claude-invented" not in large and "claude-x0" not in large
    assert 'model="tiny"' in large and 'model="claude-*"' in large
    assert 'limiterd_provider_failures_total{model="claude-*",status_class="5xx"}' in large
    assert 'limiterd_model_overloaded{model="claude-*"} 1.0' in large
    # Same families and label sets: only the numbers moved (a few characters each).
    assert len(large.splitlines()) == len(small.splitlines())
    assert len(large) < len(small) + 500
