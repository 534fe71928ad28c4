"""A fake Anthropic Messages API on 127.0.0.1 (port 0), scriptable per model.

    with FakeProvider() as fp:
        fp.script("claude-opus-4-1", Reply.overloaded(), Reply.ok("hi"))
        client = anthropic.Anthropic(api_key="k", base_url=fp.base_url)

Speaks POST /v1/messages (JSON, or SSE when "stream": true) and /v1/messages/count_tokens.
Unscripted requests get `default` (an OK answer). Every request is recorded in `requests`.
Also used by the benchmarks: keep it importable and free of test-framework imports.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    """One scripted answer. kind: ok | status | reset_mid_stream | stream_error."""

    kind: str = "ok"
    status: int = 200
    text: str = "Hello from the fake provider, one word at a time."
    headers: tuple[tuple[str, str], ...] = ()
    error_type: str = ""
    error_message: str = ""
    input_tokens: int | None = None  # None = estimated from the request body
    output_tokens: int | None = None  # None = one per streamed chunk (word)
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    after_chunks: int = 1  # for reset_mid_stream / stream_error: deltas sent first
    delay: float = 0.0  # seconds before answering (the benchmarks' latency)
    hard_reset: bool = False  # reset_mid_stream: TCP RST instead of a truncated body
    # answer only once this is set (a test acts while the provider "works"; no sleeps)
    hold: threading.Event | None = field(default=None, compare=False)
    thinking: str = ""  # a thinking block (with its signature) before the text
    tool_use: tuple[str, str] | None = None  # (name, input JSON): a tool_use block after it
    # streams: after `pause_after` text deltas, wait for `pause` (a caller hangs up meanwhile)
    pause: threading.Event | None = field(default=None, compare=False)
    pause_after: int = 1

    @staticmethod
    def ok(text: str = "Hello from the fake provider, one word at a time.",
           **kw: Any) -> Reply:
        return Reply(kind="ok", text=text, **kw)

    @staticmethod
    def error(status: int, error_type: str, message: str = "", **kw: Any) -> Reply:
        return Reply(kind="status", status=status, error_type=error_type,
                     error_message=message or error_type, **kw)

    @staticmethod
    def rate_limited(retry_after: str | None = "1", message: str = "rate limited",
                     **kw: Any) -> Reply:
        headers = kw.pop("headers", ())
        if retry_after is not None:
            headers = (*headers, ("retry-after", retry_after))
        return Reply.error(429, "rate_limit_error", message, headers=headers, **kw)

    @staticmethod
    def overloaded(**kw: Any) -> Reply:
        return Reply.error(529, "overloaded_error", "Overloaded", **kw)

    @staticmethod
    def server_error(status: int = 500, **kw: Any) -> Reply:
        return Reply.error(status, "api_error", "Internal server error", **kw)

    @staticmethod
    def reset_mid_stream(after_chunks: int = 2, *, hard: bool = False, **kw: Any) -> Reply:
        return Reply(kind="reset_mid_stream", after_chunks=after_chunks, hard_reset=hard, **kw)

    @staticmethod
    def overload_in_stream(after_chunks: int = 0, **kw: Any) -> Reply:
        return Reply(kind="stream_error", after_chunks=after_chunks,
                     error_type="overloaded_error", error_message="Overloaded", **kw)


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    reply: Reply = field(default_factory=Reply)
    query: str = ""  # what followed "?" in the request target


def _estimate_input(body: dict[str, Any]) -> int:
    text = json.dumps([body.get("system"), body.get("messages"), body.get("tools")])
    return max(1, math.ceil(len(text) / 4))


class FakeProvider:
    def __init__(self, *, default: Reply | None = None) -> None:
        self.default = default or Reply.ok()
        self._scripts: dict[str, deque[Reply]] = {}
        self._lock = threading.Lock()
        self.requests: list[Recorded] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- scripting ---------------------------------------------------------------------------
    def script(self, model: str, *replies: Reply) -> None:
        """Queue answers for requests naming `model` ("*" = any model without its own queue)."""
        with self._lock:
            self._scripts.setdefault(model, deque()).extend(replies)

    def next_reply(self, model: str) -> Reply:
        with self._lock:
            for key in (model, "*"):
                queue = self._scripts.get(key)
                if queue:
                    return queue.popleft()
            return self.default

    def models_called(self) -> list[str]:
        return [r.body.get("model", "") for r in self.requests if r.path == "/v1/messages"]

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._server is not None, "start() the fake provider first"
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)
        return f"http://{host}:{port}"

    def start(self) -> FakeProvider:
        provider = self

        class Handler(_Handler):
            fake = provider

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True,
                                        name="fake-provider")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ratelimit_headers() -> list[tuple[str, str]]:
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
    return [("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", reset),
            ("anthropic-ratelimit-input-tokens-limit", "30000"),
            ("anthropic-ratelimit-input-tokens-remaining", "29000"),
            ("anthropic-ratelimit-output-tokens-limit", "8000"),
            ("anthropic-ratelimit-output-tokens-remaining", "7900"),
            ("anthropic-ratelimit-tokens-reset", reset)]


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client closing its kept-alive connection is what clients do (and what some tests
        # make them do): not worth a traceback in the middle of pytest's output.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeProvider
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        try:
            self._post()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away (e.g. its timeout): fine

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        self.fake.requests.append(Recorded(path, {k.lower(): v
                                                  for k, v in self.headers.items()}, {}))
        if path == "/v1/models":
            self._json(200, {"data": [{"type": "model", "id": "claude-sonnet-4-5",
                                       "display_name": "Claude Sonnet 4.5",
                                       "created_at": "2025-09-29T00:00:00Z"}],
                             "has_more": False, "first_id": "claude-sonnet-4-5",
                             "last_id": "claude-sonnet-4-5"}, [])
            return
        self._json(404, {"type": "error", "error": {"type": "not_found_error",
                                                    "message": path}}, [])

    def _post(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = {}
        path = self.path.split("?")[0]
        rec = Recorded(path, {k.lower(): v for k, v in self.headers.items()}, body,
                       query=self.path.partition("?")[2])
        self.fake.requests.append(rec)
        if path == "/v1/messages/count_tokens":
            self._json(200, {"input_tokens": _estimate_input(body)}, [])
            return
        if path.startswith("/v1/messages/batches"):
            self._json(200, {"id": "msgbatch_fake", "type": "message_batch",
                             "processing_status": "in_progress"}, [])
            return
        if path != "/v1/messages":
            self._json(404, {"type": "error", "error": {"type": "not_found_error",
                                                        "message": path}}, [])
            return
        reply = self.fake.next_reply(str(body.get("model", "")))
        rec.reply = reply
        if reply.delay:
            time.sleep(reply.delay)
        if reply.hold is not None:
            reply.hold.wait(30)
        own = {k.lower() for k, _ in reply.headers}  # scripted headers replace the defaults
        headers = [(k, v) for k, v in [("request-id", f"req_{uuid.uuid4().hex[:16]}"),
                                       *ratelimit_headers()] if k not in own]
        headers += list(reply.headers)
        if reply.kind == "status":
            self._json(reply.status, {"type": "error", "error": {
                "type": reply.error_type, "message": reply.error_message}}, headers)
        elif body.get("stream"):
            self._stream(body, reply, headers)
        else:
            self._json(200, self._message(body, reply), headers)

    def _usage(self, body: dict[str, Any], reply: Reply, chunks: int) -> dict[str, int]:
        return {"input_tokens": (reply.input_tokens if reply.input_tokens is not None
                                 else _estimate_input(body)),
                "output_tokens": (reply.output_tokens if reply.output_tokens is not None
                                  else chunks),
                "cache_creation_input_tokens": reply.cache_creation_input_tokens,
                "cache_read_input_tokens": reply.cache_read_input_tokens}

    def _message(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}]
        if reply.thinking:
            content.insert(0, {"type": "thinking", "thinking": reply.thinking,
                               "signature": "sig-fake"})
        if reply.tool_use:
            content.append({"type": "tool_use", "id": "toolu_fake", "name": reply.tool_use[0],
                            "input": json.loads(reply.tool_use[1])})
        return {"id": f"msg_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant",
                "model": body.get("model", ""), "content": content,
                "stop_reason": "tool_use" if reply.tool_use else "end_turn",
                "stop_sequence": None,
                "usage": self._usage(body, reply, len(_chunks(reply.text)))}

    def _json(self, status: int, payload: dict[str, Any], headers: list[tuple[str, str]]
              ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, name: str, payload: dict[str, Any]) -> None:
        self._chunk(f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode())

    def _stream(self, body: dict[str, Any], reply: Reply, headers: list[tuple[str, str]]
                ) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("cache-control", "no-cache")
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        chunks = _chunks(reply.text)
        usage = self._usage(body, reply, len(chunks))
        start = self._message(body, reply)
        start["content"], start["stop_reason"] = [], None
        start["usage"] = {**usage, "output_tokens": 1}
        self._event("message_start", {"type": "message_start", "message": start})
        index = 0
        if reply.thinking:
            self._block(0, {"type": "thinking", "thinking": "", "signature": ""},
                        [{"type": "thinking_delta", "thinking": reply.thinking},
                         {"type": "signature_delta", "signature": "sig-fake"}])
            index = 1
        self._event("content_block_start", {"type": "content_block_start", "index": index,
                                            "content_block": {"type": "text", "text": ""}})
        for i, piece in enumerate(chunks):
            if reply.kind in ("reset_mid_stream", "stream_error") and i == reply.after_chunks:
                break
            if reply.pause is not None and i == reply.pause_after:
                reply.pause.wait(30)
            self._event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                "delta": {"type": "text_delta", "text": piece}})
        if reply.kind == "reset_mid_stream":
            self._reset(reply.hard_reset)
            return
        if reply.kind == "stream_error":
            self._event("error", {"type": "error", "error": {"type": reply.error_type,
                                                             "message": reply.error_message}})
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            return
        self._event("content_block_stop", {"type": "content_block_stop", "index": index})
        if reply.tool_use:
            name, args = reply.tool_use
            half = len(args) // 2
            self._block(index + 1, {"type": "tool_use", "id": "toolu_fake", "name": name,
                                    "input": {}},
                        [{"type": "input_json_delta", "partial_json": args[:half]},
                         {"type": "input_json_delta", "partial_json": args[half:]}])
        stop = "tool_use" if reply.tool_use else "end_turn"
        self._event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop, "stop_sequence": None},
                                      "usage": {"output_tokens": usage["output_tokens"]}})
        self._event("message_stop", {"type": "message_stop"})
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _block(self, index: int, start: dict[str, Any], deltas: list[dict[str, Any]]) -> None:
        self._event("content_block_start", {"type": "content_block_start", "index": index,
                                            "content_block": start})
        for delta in deltas:
            self._event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                "delta": delta})
        self._event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _reset(self, hard: bool) -> None:
        """Cut the connection mid chunked body. Soft: FIN, so the client reads every delta
        sent and then fails on the incomplete body (deterministic). Hard: TCP RST, which may
        also discard deltas the client had not read yet."""
        self.close_connection = True
        if hard:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
            return
        self.connection.shutdown(socket.SHUT_WR)
        self.connection.settimeout(5)
        try:
            while self.connection.recv(4096):
                pass
        except OSError:
            pass


def _chunks(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]
