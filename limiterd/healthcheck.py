"""`python -m limiterd.healthcheck [TARGET]`: exit 0 when limiterd answers SERVING.

For probes that must run inside the daemon's own network namespace: Docker's HEALTHCHECK and
Kubernetes exec probes. A kubelet `grpc:` probe dials the pod IP, which a daemon that listens
only on loopback (the sidecar default) never sees; grpc_health_probe is a separate binary.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from limiterd.address import dial_target
from limiterd.defaults import DEFAULT_LISTEN, ENV_PREFIX


def probe_target(listen: str) -> str:
    """The address to dial for a daemon started with `--listen listen`."""
    return dial_target(listen)


def check(target: str, timeout_s: float, service: str = "") -> tuple[bool, str]:
    """(serving, reason) from one grpc.health.v1.Health/Check call."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(  # type: ignore[attr-defined]  # the stub types omit it
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            name = code.name if code is not None else "ERROR"
            return False, f"{name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str] | None = None) -> int:
    env_listen = os.environ.get(f"{ENV_PREFIX}_LISTEN") or DEFAULT_LISTEN
    parser = argparse.ArgumentParser(
        prog="python -m limiterd.healthcheck",
        description="Exit 0 when limiterd's gRPC health service answers SERVING, else 1.",
    )
    parser.add_argument(
        "target", nargs="?", default=env_listen,
        help=f"the daemon's --listen address (default ${ENV_PREFIX}_LISTEN or {DEFAULT_LISTEN})",
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    parser.add_argument("--service", default="", help="health service name (default: server)")
    args = parser.parse_args(argv)
    try:
        target = probe_target(args.target)
    except ValueError as exc:
        parser.error(str(exc))
    serving, reason = check(target, args.timeout, args.service)
    if not serving:
        print(f"limiterd at {target} is not serving: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
