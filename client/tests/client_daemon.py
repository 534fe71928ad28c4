"""A handle on a REAL in-process limiterd for the client tests (config, admin, ledger)."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import cast

import grpc
import pytest

from limiterd.engine import Engine
from limiterd.ledger.model import Change, Reservation, ReservationOpened, ReservationSettled
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
reattach_grace_ms = 600000  # a lost stream's place outlives any test: only a cancel frees it

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


# The ledgers the contract-level client tests run over (`backend` fixture, client conftest).
BACKENDS = ("local", "redis")
over_backends = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


class Daemon:
    def __init__(self, srv: RunningServer, channel: grpc.aio.Channel) -> None:
        self.srv = srv
        self.target = srv.target
        self.admin = pb_grpc.AdminStub(channel)
        # The shared ledger keeps settled reservations in Redis, not in this process: they are
        # recorded here as it announces them (before it answers the call that settled them).
        self._opened: dict[str, Reservation] = {}
        self._settled: list[Reservation] = []
        if not isinstance(srv.engine, Engine):
            srv.engine.add_listener(self._observe)

    def _observe(self, changes: Sequence[Change]) -> None:
        for c in changes:
            if isinstance(c, ReservationOpened):
                self._opened[c.reservation.id] = c.reservation
            elif isinstance(c, ReservationSettled) and c.reservation_id in self._opened:
                self._settled.append(replace(self._opened.pop(c.reservation_id),
                                             settlement=c.settlement))

    async def open_leases(self) -> list[pb.Lease]:
        return list((await self.admin.ListLeases(pb.ListLeasesRequest())).leases)

    async def bucket(self, model: str) -> pb.Bucket:
        buckets = (await self.admin.GetBuckets(pb.GetBucketsRequest(model=model))).buckets
        [b] = [b for b in buckets if not b.user]
        return cast(pb.Bucket, b)

    def settled(self) -> list[Reservation]:
        """Settled reservations in settle order (read from the daemon's ledger)."""
        engine = self.srv.engine
        held = engine.ledger._settled.values() if isinstance(engine, Engine) else self._settled
        return sorted(held, key=lambda r: r.settlement.settled_at if r.settlement else 0.0)




def refused_target() -> Iterator[str]:
    """A loopback address that refuses connections: its port bound, never listening, and held
    while the test runs (a port merely found free could be taken and answered meanwhile)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"
