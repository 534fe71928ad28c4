"""What goes over the wire: provider-format errors and the header rules. The SSE usage tap
and the JSON usage reader are the client's (limiterd_client.sse), shared with its drop-in
httpx transport."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from limiterd_client.sse import SseTap, StreamError, json_usage, usage_of

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never forwarded;
# host is set again for the next leg, and so is content-length unless the body passes
# through byte for byte (then it keeps the sender's framing).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
                        "host"})
# Our own request headers (x-limiterd-*) stop at the gateway.
OWN_PREFIX = "x-limiterd-"

PING_EVENT = b'event: ping\ndata: {"type": "ping"}\n\n'


def forward_headers(headers: Iterable[tuple[str, str]], *, same_body: bool = False
                    ) -> list[tuple[str, str]]:
    """The headers to send on to the next leg (request or response), order and repeats kept.
    `same_body`: the body is passed on unchanged, so its content-length still holds."""
    return [(k, v) for k, v in headers
            if k.lower() not in HOP_BY_HOP and not k.lower().startswith(OWN_PREFIX)
            and (same_body or k.lower() != "content-length")]


def api_key(headers: Mapping[str, str]) -> str:
    """The caller's key: `x-api-key`, else the bearer token of `Authorization`."""
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def error_body(kind: str, message: str) -> dict[str, Any]:
    """Anthropic's error shape, so SDKs raise their usual exception types."""
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_bytes(kind: str, message: str) -> bytes:
    return json.dumps(error_body(kind, message)).encode()


def error_event(payload: bytes) -> bytes:
    """An SSE `error` event carrying an error JSON body (the provider's, or ours)."""
    data = payload.strip().replace(b"\n", b" ") or error_bytes("api_error", "upstream error")
    return b"event: error\ndata: " + data + b"\n\n"


__all__ = ["SseTap", "StreamError", "json_usage", "usage_of"]  # re-exported for the gateway
