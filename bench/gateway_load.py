"""Load generator for the gateway benchmark: the same requests straight to the upstream and
through the gateway, interleaved so that both see the same machine noise.

Each worker sends one request direct and one through the gateway, in alternating order, and
records the time to the first byte of the body and to the end of it.

    python -m bench.gateway_load DIRECT_URL GATEWAY_URL CONCURRENCY SECONDS STREAM(0|1)
    -> one JSON line: {"direct": {...}, "gateway": {...}} with p50/p99 in ms and counts
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

import aiohttp

BODY = {"model": "bench-model", "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hello, benchmark"}]}
HEADERS = {"x-api-key": "sk-bench", "anthropic-version": "2023-06-01"}


async def one(session: aiohttp.ClientSession, url: str, stream: bool) -> tuple[float, float]:
    start = time.perf_counter()
    async with session.post(url + "/v1/messages", json={**BODY, "stream": stream},
                            headers=HEADERS) as resp:
        first = None
        async for _ in resp.content.iter_any():
            if first is None:
                first = time.perf_counter()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")
    end = time.perf_counter()
    return (first or end) - start, end - start


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


async def main(direct: str, gateway: str, conc: int, seconds: float, stream: bool) -> None:
    samples: dict[str, list[tuple[float, float]]] = {"direct": [], "gateway": []}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for url in (direct, gateway):  # warm up connections and the daemon
            await asyncio.gather(*(one(session, url, stream) for _ in range(conc)))
        stop = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            flip = i % 2 == 0
            while time.perf_counter() < stop:
                order = [("direct", direct), ("gateway", gateway)]
                for name, url in (order if flip else order[::-1]):
                    samples[name].append(await one(session, url, stream))
                flip = not flip

        await asyncio.gather(*(worker(i) for i in range(conc)))
    out = {}
    for name, xs in samples.items():
        ttfb = [t for t, _ in xs]
        total = [t for _, t in xs]
        out[name] = {"n": len(xs), "ttfb_p50_ms": pct(ttfb, 0.5), "ttfb_p99_ms": pct(ttfb, 0.99),
                     "p50_ms": pct(total, 0.5), "p99_ms": pct(total, 0.99),
                     "mean_ms": statistics.fmean(total) * 1000}
    print(json.dumps(out))


if __name__ == "__main__":
    d, g, c, s, st = sys.argv[1:6]
    asyncio.run(main(d, g, int(c), float(s), st == "1"))
