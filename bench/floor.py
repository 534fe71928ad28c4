"""The floor: a bare grpc.aio server answering the same messages with no logic at all."""

from __future__ import annotations

import asyncio
import sys

import grpc

from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc


class Echo(pb_grpc.LimiterServicer):  # type: ignore[misc]
    async def Acquire(self, request: pb.AcquireRequest, context: object) -> pb.AcquireResponse:
        return pb.AcquireResponse(
            reservation_id="0" * 32, lease_expires_at_ms=1, granted_at_ms=1,
            reserved_requests=1, reserved_input_tokens=request.input_tokens,
            reserved_output_tokens=request.max_output_tokens)

    async def Report(self, request: pb.ReportRequest, context: object) -> pb.ReportResponse:
        return pb.ReportResponse(settlement=pb.Settlement(
            reservation_id=request.reservation_id, state=pb.REPORTED, settled_at_ms=1,
            refunded_input_tokens=1, refunded_output_tokens=1))


async def main(listen: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_LimiterServicer_to_server(Echo(), server)
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
