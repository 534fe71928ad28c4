"""A /v1/messages request, read and checked before anything is reserved or forwarded."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from limiterd.gateway.config import GatewayConfig
from limiterd.gateway.wire import api_key, forward_headers
from limiterd_client import scope_for_api_key

# Our own request headers; they stop at the gateway (wire.OWN_PREFIX).
USER_HEADER = "x-limiterd-user"
MAX_WAIT_HEADER = "x-limiterd-max-wait"  # seconds, at most the config's max_wait_s


class BadRequest(Exception):
    """Input the gateway refuses before anything is reserved; the message names the field."""


@dataclass(frozen=True)
class Call:
    """A validated request: what the caller sent, and the parts the limiter needs."""

    raw: bytes
    body: dict[str, Any]
    model: str
    max_tokens: int
    stream: bool
    scope: str
    headers: tuple[tuple[str, str], ...]  # to forward upstream
    user: str = ""  # x-limiterd-user: the per-user limits' key (an agent, a tenant)
    max_wait_s: float = 0.0  # the config's max_wait_s, or less when x-limiterd-max-wait asks
    query: str = ""  # passed on as is (Claude Code calls /v1/messages?beta=true)

    def url(self, base: str, path: str = "/v1/messages") -> str:
        return f"{base}{path}?{self.query}" if self.query else base + path

    def for_model(self, model: str, max_tokens: int | None) -> Call:
        """This call rewritten for a fallback model (max_tokens capped when asked for and
        still above a thinking budget)."""
        body = {**self.body, "model": model}
        budget = (self.body.get("thinking") or {}).get("budget_tokens", 0)
        limit = self.max_tokens
        if max_tokens is not None and max_tokens < limit and max_tokens > budget:
            limit = max_tokens
        body["max_tokens"] = limit
        return replace(self, raw=json.dumps(body).encode(), body=body, model=model,
                       max_tokens=limit)


async def read_call(request: web.Request, cfg: GatewayConfig) -> Call:
    raw = bytearray()
    async for chunk in request.content.iter_any():
        raw += chunk
        if len(raw) > cfg.max_body_bytes:
            raise BadRequest(f"request body: larger than the gateway's limit of "
                             f"{cfg.max_body_bytes} bytes")
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise BadRequest(f"request body: not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest("request body: must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: required, a non-empty string")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("max_tokens: required, an integer >= 1")
    if not isinstance(body.get("messages"), list):
        raise BadRequest("messages: required, a list")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream: must be true or false")
    key = api_key(request.headers)
    if not key:
        raise PermissionError("x-api-key header is required")
    headers = [(k, v) for k, v in forward_headers(request.headers.items())
               if k.lower() != "accept-encoding"]
    # The gateway must read the usage in the answer: ask for it uncompressed.
    headers.append(("accept-encoding", "identity"))
    return Call(bytes(raw), body, model, max_tokens, stream,
                scope_for_api_key(key, salt=cfg.salt), tuple(headers),
                request.headers.get(USER_HEADER, ""), _max_wait(request, cfg),
                request.query_string)


def _max_wait(request: web.Request, cfg: GatewayConfig) -> float:
    raw = request.headers.get(MAX_WAIT_HEADER)
    if raw is None:
        return cfg.max_wait_s
    try:
        asked = float(raw)
    except ValueError:
        asked = -1.0
    if not 0 <= asked < float("inf"):
        raise BadRequest(f"{MAX_WAIT_HEADER}: must be a number of seconds >= 0")
    return min(asked, cfg.max_wait_s)
