"""A handle on a REAL in-process limiterd for the client tests (config, admin, ledger)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import cast

import grpc

from limiterd.ledger.model import Reservation
from limiterd.server import RunningServer
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc

# "claude-scarce-1" admits 2 requests a minute, so a third caller waits.
CLIENT_TEST_CONFIG = """
[daemon]
default_lease_ms = 60000
max_lease_ms = 600000
max_wait_ms = 60000
refill_allowance_ms = 0  # exact refill times here; the allowance has its own tests

[models."claude-scarce-1"]
requests_per_minute = 2
input_tokens_per_minute = 100000
output_tokens_per_minute = 100000

[models."claude-opus*"]  # one budget per class, as the provider counts
requests_per_minute = 1000
input_tokens_per_minute = 1000000
output_tokens_per_minute = 1000000

[models."claude-sonnet*"]  # one budget per class, as the provider counts
requests_per_minute = 1000
input_tokens_per_minute = 1000000
output_tokens_per_minute = 1000000

[models."claude-haiku*"]  # one budget per class, as the provider counts
requests_per_minute = 1000
input_tokens_per_minute = 1000000
output_tokens_per_minute = 1000000

[models."claude-*"]
requests_per_minute = 1000
input_tokens_per_minute = 1000000
output_tokens_per_minute = 1000000

[models."tiny"]
requests_per_minute = 10
input_tokens_per_minute = 1000
output_tokens_per_minute = 1000
"""


class Daemon:
    def __init__(self, srv: RunningServer, channel: grpc.aio.Channel) -> None:
        self.srv = srv
        self.target = srv.target
        self.admin = pb_grpc.AdminStub(channel)

    async def open_leases(self) -> list[pb.Lease]:
        return list((await self.admin.ListLeases(pb.ListLeasesRequest())).leases)

    async def bucket(self, model: str) -> pb.Bucket:
        buckets = (await self.admin.GetBuckets(pb.GetBucketsRequest(model=model))).buckets
        [b] = [b for b in buckets if not b.user]
        return cast(pb.Bucket, b)

    def settled(self) -> list[Reservation]:
        """Settled reservations in settle order (read from the daemon's ledger)."""
        return sorted(self.srv.engine.ledger._settled.values(),
                      key=lambda r: r.settlement.settled_at if r.settlement else 0.0)




def refused_target() -> Iterator[str]:
    """A loopback address that refuses connections: its port bound, never listening, and held
    while the test runs (a port merely found free could be taken and answered meanwhile)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"
