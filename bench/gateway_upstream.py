"""A fixed-latency Anthropic Messages API for the gateway benchmark, in its own process.

Every answer waits `ttfb_ms` before its first byte (a model's time to first token), then a
stream sends `events` text deltas `gap_ms` apart; a JSON answer comes after the same total.

    python -m bench.gateway_upstream PORT TTFB_MS EVENTS GAP_MS
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

HEADERS = {"request-id": "req_bench", "anthropic-ratelimit-requests-limit": "1000000000",
           "anthropic-ratelimit-requests-remaining": "999999999"}


def _event(name: str, doc: dict[str, object]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(doc)}\n\n".encode()


def app(ttfb_s: float, events: int, gap_s: float) -> web.Application:
    async def messages(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        usage = {"input_tokens": 20, "output_tokens": events}
        await asyncio.sleep(ttfb_s)
        if not body.get("stream"):
            await asyncio.sleep(gap_s * events)
            return web.json_response({
                "id": "msg_bench", "type": "message", "role": "assistant",
                "model": body["model"], "content": [{"type": "text", "text": "w " * events}],
                "stop_reason": "end_turn", "stop_sequence": None, "usage": usage},
                headers=HEADERS)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", **HEADERS})
        await resp.prepare(request)
        await resp.write(_event("message_start", {"type": "message_start", "message": {
            "id": "msg_bench", "type": "message", "role": "assistant", "model": body["model"],
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1}}}))
        await resp.write(_event("content_block_start", {
            "type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}))
        for _ in range(events):
            await asyncio.sleep(gap_s)
            await resp.write(_event("content_block_delta", {
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "w "}}))
        await resp.write(_event("content_block_stop", {"type": "content_block_stop",
                                                       "index": 0}))
        await resp.write(_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": "end_turn",
                                               "stop_sequence": None},
            "usage": {"output_tokens": events}}))
        await resp.write(_event("message_stop", {"type": "message_stop"}))
        await resp.write_eof()
        return resp

    a = web.Application()
    a.router.add_post("/v1/messages", messages)
    return a


if __name__ == "__main__":
    port, ttfb_ms, n, gap_ms = (int(x) for x in sys.argv[1:5])
    web.run_app(app(ttfb_ms / 1000, n, gap_ms / 1000), host="127.0.0.1", port=port,
                print=None, access_log=None)
