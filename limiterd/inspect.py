"""What the operator commands (leases, buckets, release, watch, reload) need: a channel to a
running daemon, its answers as plain rows, and aligned tables. No click here."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from limiterd.address import dial_target
from limiterd.defaults import ADMIN_TOKEN_KEY
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc

# Exit codes shared by every operator command (2, a usage error, is click's own).
EXIT_FAILED, EXIT_UNREACHABLE = 1, 3


class Unreachable(Exception):
    """The daemon did not answer (one line for the operator)."""


@dataclass(frozen=True)
class Target:
    address: str
    admin_token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    timeout_s: float = 5.0

    def channel(self) -> grpc.Channel:
        address = dial_target(self.address)
        if not (self.tls_ca or self.tls_cert):
            return grpc.insecure_channel(address)
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca),
            private_key=_read(self.tls_key),
            certificate_chain=_read(self.tls_cert),
        )
        return grpc.secure_channel(address, creds)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((ADMIN_TOKEN_KEY, self.admin_token),) if self.admin_token else ()


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


class Client:
    """Synchronous calls to a running daemon; transport failures become Unreachable."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._channel = target.channel()
        self.limiter = pb_grpc.LimiterStub(self._channel)
        self.admin = pb_grpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.target.timeout_s,
                          metadata=self.target.metadata())
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unreachable(
                    f"cannot reach the daemon at {self.target.address}: "
                    f"{exc.details()}"
                ) from None
            raise

    def leases(self, scope: str = "", model: str = "") -> Iterator[pb.Lease]:
        token = ""
        while True:
            page = self.call(self.admin.ListLeases, pb.ListLeasesRequest(
                scope=scope, model=model, page_size=1000, page_token=token))
            yield from page.leases
            token = page.next_page_token
            if not token:
                return

    def buckets(self, scope: str = "", model: str = "") -> pb.GetBucketsResponse:
        """Every bucket, page by page, as one answer (now_ms from the last page)."""
        whole = pb.GetBucketsResponse()
        token = ""
        while True:
            page = self.call(self.admin.GetBuckets, pb.GetBucketsRequest(
                scope=scope, model=model, page_size=1000, page_token=token))
            whole.buckets.extend(page.buckets)
            whole.now_ms = page.now_ms
            token = page.next_page_token
            if not token:
                return whole


# ---- rows and tables -------------------------------------------------------------------------


def when(ms: int) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S")


SCOPE_SHOWN = 12  # characters of a scope hash in tables (`--scope` takes them back)


def short_scope(scope: str, alias: str) -> str:
    return alias or scope[:SCOPE_SHOWN]


def lease_rows(leases: Sequence[pb.Lease], now_ms: int, full: bool = False
               ) -> list[dict[str, Any]]:
    """Table rows; `full` (JSON) keeps the whole scope hash and its alias apart."""
    return [{
        "reservation_id": lease.reservation_id,
        **({"scope": lease.scope, "scope_alias": lease.scope_alias} if full
           else {"scope": short_scope(lease.scope, lease.scope_alias)}),
        "model": lease.model,
        "user": lease.user,
        "input": lease.reserved_input_tokens,
        "output": lease.reserved_output_tokens,
        "age_s": round((now_ms - lease.granted_at_ms) / 1000, 1),
        "expires_in_s": round((lease.lease_expires_at_ms - now_ms) / 1000, 1),
    } for lease in leases]


def bucket_rows(resp: pb.GetBucketsResponse) -> list[dict[str, Any]]:
    rows = []
    for b in resp.buckets:
        dims = {d.name: d for d in b.dimensions}

        def cell(name: str, dims: dict[str, pb.Dimension] = dims) -> str:
            d = dims.get(name)
            if d is None:
                return "-"
            learned = "*" if d.learned else ""
            return f"{d.level:,.0f}/{d.capacity:,}{learned}"

        rows.append({
            "scope": short_scope(b.scope, b.scope_alias),
            "model": b.model,
            "user": b.user,
            "requests": cell("requests"),
            "input_tokens": cell("input_tokens"),
            "output_tokens": cell("output_tokens"),
            "concurrent": cell("concurrent"),
            "open": b.open_reservations,
            "queued": b.queue_depth,
            "paused_until": when(b.paused_until_ms),
            "overloaded_until": when(b.overloaded_until_ms),
        })
    return rows


def table(rows: Sequence[dict[str, Any]], empty: str) -> str:
    if not rows:
        return empty
    headers = list(rows[0])
    cells = [[str(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    numeric = [all(_numeric(c[i]) for c in cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line([h.upper() for h in headers]), *(line(c) for c in cells)])


def _numeric(text: str) -> bool:
    return text.replace(",", "").replace(".", "", 1).replace("/", "").replace("-", "", 1)\
        .replace("*", "").isdigit()


def as_json(message_or_rows: Any) -> str:
    if hasattr(message_or_rows, "DESCRIPTOR"):
        return json.dumps(MessageToDict(message_or_rows, preserving_proto_field_name=True),
                          indent=2)
    return json.dumps(message_or_rows, indent=2)
