"""Admin listings page: GetBuckets like ListLeases, bad page tokens are INVALID_ARGUMENT, and
the CLI follows the pages."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys

import grpc
import pytest

from limiterd.server import RunningServer
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.test_process import ROOT


async def fill(limiter: pb_grpc.LimiterStub, scopes: int) -> None:
    for start in range(0, scopes, 200):
        await asyncio.gather(*(
            limiter.Acquire(pb.AcquireRequest(scope=f"scope-{i:05d}", model="claude-x",
                                              input_tokens=1))
            for i in range(start, min(scopes, start + 200))
        ))


async def test_get_buckets_pages_in_key_order(
    daemon: RunningServer, limiter: pb_grpc.LimiterStub, admin: pb_grpc.AdminStub
) -> None:
    await fill(limiter, 250)
    first = await admin.GetBuckets(pb.GetBucketsRequest())
    assert len(first.buckets) == 100 and first.next_page_token  # the default page
    seen: list[str] = []
    token = ""
    while True:
        page = await admin.GetBuckets(pb.GetBucketsRequest(page_size=60, page_token=token))
        assert len(page.buckets) <= 60 and page.now_ms > 0
        seen += [b.scope for b in page.buckets]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"scope-{i:05d}" for i in range(250)]
    filtered = await admin.GetBuckets(pb.GetBucketsRequest(scope="scope-00007", page_size=1))
    assert [b.scope for b in filtered.buckets] == ["scope-00007"]
    assert not filtered.next_page_token


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize("token", [
    "nan:x", b64("nan:x"), b64('[NaN, "x"]'), b64('[Infinity, "x"]'), b64("{}"),
    b64('["a", "b", "c"]'), "garbage!", base64.urlsafe_b64encode(b"\xff\xfe").decode(),
])
async def test_list_leases_rejects_tokens_it_never_returned(
    admin: pb_grpc.AdminStub, token: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.ListLeases(pb.ListLeasesRequest(page_token=token))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in str(err.value.details())


@pytest.mark.parametrize("token", [
    "nan:x", b64("nan:x"), b64('[1.5, "x"]'), b64('["a", "b"]'), b64('["a", "b", 3]'),
])
async def test_get_buckets_rejects_tokens_it_never_returned(
    admin: pb_grpc.AdminStub, token: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.GetBuckets(pb.GetBucketsRequest(page_token=token))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in str(err.value.details())


@pytest.mark.parametrize("size", [-1, 1001])
async def test_page_size_out_of_range(admin: pb_grpc.AdminStub, size: int) -> None:
    for call, request in ((admin.GetBuckets, pb.GetBucketsRequest(page_size=size)),
                          (admin.ListLeases, pb.ListLeasesRequest(page_size=size))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_size" in str(err.value.details())


async def test_cli_follows_bucket_pages(
    daemon: RunningServer, limiter: pb_grpc.LimiterStub
) -> None:
    await fill(limiter, 1100)  # more than the largest page
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'client' / 'src'}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "limiterd", "buckets", "--json", "--target", daemon.target,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    scopes = [b["scope"] for b in json.loads(out)["buckets"]]
    assert scopes == [f"scope-{i:05d}" for i in range(1100)]
