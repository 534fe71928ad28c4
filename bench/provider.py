"""A simulated Anthropic Messages API for the goodput benchmark, on loopback.

Behaves like the real one where it matters to a rate limiter: per-model token buckets for
requests, input tokens and output tokens per minute (output estimated from max_tokens at the
start and adjusted to the actual count at the end), 429 with `retry-after` and
`anthropic-ratelimit-*` headers when a bucket is short, a schedule of 529 overload bursts, and
answers that take time in proportion to the tokens generated. Every answer is logged.

    python -m bench.provider PORT LOG.jsonl CONFIG.json
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

TOKENS_PER_S = 400.0  # generation speed
BASE_LATENCY_S = 0.15


@dataclass
class Bucket:
    capacity: float
    level: float
    at: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + self.capacity * (now - self.at) / 60.0)
        self.at = now

    def wait_for(self, amount: float) -> float:
        return max(0.0, (amount - self.level) * 60.0 / self.capacity)


@dataclass
class Model:
    requests: Bucket
    input: Bucket
    output: Bucket
    overloads: list[tuple[float, float, float]] = field(default_factory=list)  # start, end, p


def input_tokens(body: dict[str, Any]) -> int:
    """The provider's own count: about 4 characters a token."""
    text = json.dumps(body.get("messages", [])) + str(body.get("system", ""))
    return max(1, len(text) // 4)


class Provider:
    def __init__(self, config: dict[str, Any], log_path: str) -> None:
        now = time.time()
        self.start = now
        self.models: dict[str, Model] = {}
        for name, m in config["models"].items():
            self.models[name] = Model(
                Bucket(m["rpm"], m["rpm"], now), Bucket(m["itpm"], m["itpm"], now),
                Bucket(m["otpm"], m["otpm"], now),
                [tuple(o) for o in m.get("overloads", [])],
            )
        self.log = open(log_path, "a", buffering=1)  # noqa: SIM115
        self.rng = random.Random(7)

    def record(self, **event: Any) -> None:
        self.log.write(json.dumps({"t": time.time() - self.start, **event}) + "\n")

    def headers(self, m: Model) -> dict[str, str]:
        h = {}
        for name, b in (("requests", m.requests), ("input-tokens", m.input),
                        ("output-tokens", m.output)):
            remaining = int(b.level) if name == "requests" else int(b.level // 1000 * 1000)
            h[f"anthropic-ratelimit-{name}-limit"] = str(int(b.capacity))
            h[f"anthropic-ratelimit-{name}-remaining"] = str(max(0, remaining))
        return h

    async def messages(self, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        name = body.get("model", "")
        m = self.models.get(name)
        if m is None:
            return 404, {}, _error("not_found_error", f"model {name} not found")
        now = time.time()
        t = now - self.start
        for start, end, p in m.overloads:
            if start <= t < end and self.rng.random() < p:
                self.record(model=name, status=529)
                return 529, {}, _error("overloaded_error", "Overloaded")
        n_in, max_out = input_tokens(body), int(body.get("max_tokens", 1024))
        for b in (m.requests, m.input, m.output):
            b.refill(now)
        wait = max(m.requests.wait_for(1), m.input.wait_for(n_in), m.output.wait_for(max_out))
        if wait > 0:
            h = self.headers(m)
            h["retry-after"] = str(max(1, math.ceil(wait)))
            self.record(model=name, status=429, input=n_in)
            return 429, h, _error("rate_limit_error", "Number of request tokens has exceeded "
                                  "your per-minute rate limit")
        m.requests.level -= 1
        m.input.level -= n_in
        m.output.level -= max_out  # estimated from max_tokens at the start
        n_out = self.rng.randint(max(1, max_out // 4), max_out)
        await asyncio.sleep(BASE_LATENCY_S + n_out / TOKENS_PER_S)
        m.output.refill(time.time())
        m.output.level = min(m.output.capacity, m.output.level + (max_out - n_out))  # adjusted
        self.record(model=name, status=200, input=n_in, output=n_out)
        return 200, self.headers(m), {
            "id": f"msg_{self.rng.getrandbits(64):x}", "type": "message", "role": "assistant",
            "model": name, "content": [{"type": "text", "text": "ok " * min(n_out, 50)}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": n_in, "output_tokens": n_out,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        }

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                headers: dict[str, str] = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                path = line.split()[1].decode()
                extra: dict[str, str]
                if path.startswith("/v1/messages/count_tokens"):
                    status, extra = 200, {}
                    payload = {"input_tokens": input_tokens(json.loads(body or b"{}"))}
                elif path.startswith("/v1/messages"):
                    status, extra, payload = await self.messages(json.loads(body or b"{}"))
                else:
                    status, extra, payload = 404, {}, _error("not_found_error", path)
                data = json.dumps(payload).encode()
                head = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}",
                        "content-type: application/json", f"content-length: {len(data)}",
                        f"request-id: req_{self.rng.getrandbits(48):x}",
                        *(f"{k}: {v}" for k, v in extra.items())]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


async def main(port: int, log_path: str, config_path: str) -> None:
    with open(config_path) as f:
        provider = Provider(json.load(f), log_path)
    server = await asyncio.start_server(provider.handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
