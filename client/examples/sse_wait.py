"""Forward limiterd's live wait status to a browser as server-sent events (stdlib only).

    python client/examples/sse_wait.py --target 127.0.0.1:50051 --port 8080
    curl -N 'http://127.0.0.1:8080/wait?model=claude-sonnet-4-5&input_tokens=2000'

Each request reserves through limiterd with `on_wait`; the browser gets `event: queued`
(position, estimated wait...) while it waits, then `event: granted` and `event: done`, or
`event: busy`. A browser that hangs up cancels the wait: the client leaves the queue at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any
from urllib.parse import parse_qs, urlsplit

from limiterd_client import Limiter, LimiterBusy, Reservation, WaitUpdate

Work = Callable[[Reservation], Awaitable[dict[str, Any]]]


async def release_only(r: Reservation) -> dict[str, Any]:
    """Stand-in for the provider call: give the reservation back."""
    await r.release()
    return {"reservation_id": r.reservation_id}


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def handler(limiter: Limiter, *, scope: str = "demo", work: Work = release_only,
            keepalive_s: float = 15.0
            ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            q = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
            model, tokens = q["model"], int(q.get("input_tokens", "0"))
            max_out, max_wait = int(q.get("max_output_tokens", "0")), float(
                q.get("max_wait", "60"))
        except (ValueError, KeyError, IndexError, asyncio.IncompleteReadError) as e:
            writer.write(f"HTTP/1.1 400 Bad Request\r\n\r\n{e!r}\n".encode())
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n")

        async def on_wait(u: WaitUpdate) -> None:
            writer.write(sse("queued", asdict(u)))
            await writer.drain()

        async def keepalive() -> None:  # proxies drop silent connections
            while True:
                await asyncio.sleep(keepalive_s)
                writer.write(b": keepalive\n\n")
                await writer.drain()

        async def flow() -> None:
            try:
                async with limiter.reserve(scope, model, input_tokens=tokens,
                                           max_output_tokens=max_out, max_wait=max_wait,
                                           on_wait=on_wait) as r:
                    writer.write(sse("granted", {"waited": len(r.updates)}))
                    await writer.drain()
                    writer.write(sse("done", await work(r)))
            except LimiterBusy as e:
                writer.write(sse("busy", {"retry_after_ms": e.retry_after_ms}))
            await writer.drain()

        async def hung_up() -> None:  # EOF from the browser: it went away
            while await reader.read(1024):
                pass

        tasks = [asyncio.create_task(c) for c in (flow(), keepalive(), hung_up())]
        try:
            await asyncio.wait((tasks[0], tasks[2]), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()  # a cancelled wait leaves limiterd's queue (see Limiter.reserve)
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await t
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return handle


async def serve(limiter: Limiter, host: str = "127.0.0.1", port: int = 0,
                **kw: Any) -> asyncio.Server:
    return await asyncio.start_server(handler(limiter, **kw), host, port)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args()
    async with Limiter(args.target) as lim:
        server = await serve(lim, port=args.port)
        async with server:
            await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
