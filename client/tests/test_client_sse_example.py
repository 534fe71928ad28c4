"""The SSE example (client/examples/sse_wait.py) over a real loopback socket, in front of a
real limiterd: queued events, then granted and done; a browser that hangs up leaves the
queue and holds nothing."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from client_daemon import Daemon, over_backends

from limiterd_client import Limiter, Reservation

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import sse_wait  # noqa: E402


async def read_event(reader: asyncio.StreamReader) -> tuple[str, dict[str, object]]:
    """The next SSE event, skipping comment lines (keepalives)."""
    event, data = "", ""
    while True:
        line = (await asyncio.wait_for(reader.readline(), 10)).decode()
        if line == "":
            raise EOFError("stream closed")
        if line.startswith(":"):
            continue
        if line == "\n":
            if event:
                return event, json.loads(data)
            continue
        field, _, value = line.rstrip("\n").partition(": ")
        if field == "event":
            event = value
        elif field == "data":
            data = value


async def open_wait(port: int, query: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /wait?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    return reader, writer


async def hold_all(lim: Limiter) -> Reservation:
    r = lim.reserve("demo", "tiny", input_tokens=1000, max_output_tokens=0)
    await r.__aenter__()
    return r


@over_backends
async def test_sse_forwards_queued_then_granted(daemon: Daemon) -> None:
    async with Limiter(daemon.target) as lim:
        holder = await hold_all(lim)
        server = await sse_wait.serve(lim, keepalive_s=0.05)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await open_wait(port, "model=tiny&input_tokens=500&max_wait=30")
            event, data = await read_event(reader)
            assert event == "queued" and data["position"] == 1 and data["queue_depth"] == 1
            assert float(str(data["estimated_wait_s"])) > 0
            await holder.release()
            events = [event]
            while events[-1] != "done":
                events.append((await read_event(reader))[0])
            assert set(events[:-2]) == {"queued"} and events[-2:] == ["granted", "done"]
            assert await reader.read() == b""  # the server ends the stream
            writer.close()
    [_, served] = daemon.settled()
    assert served.model == "tiny" and served.reserved.input_tokens == 500


@over_backends
async def test_sse_busy_and_a_browser_that_hangs_up(daemon: Daemon) -> None:
    async with Limiter(daemon.target) as lim:
        holder = await hold_all(lim)
        server = await sse_wait.serve(lim)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await open_wait(port, "model=tiny&input_tokens=500&max_wait=0")
            assert (await read_event(reader))[0] == "busy"
            writer.close()

            reader, writer = await open_wait(port, "model=tiny&input_tokens=500&max_wait=30")
            assert (await read_event(reader))[0] == "queued"
            assert (await daemon.bucket("tiny")).queue_depth == 1
            writer.close()  # the browser goes away mid-wait
            # The daemon would keep a lost stream's place for its re-attach grace, 10 minutes
            # here: an empty queue is the hang-up reaching it (the bound only turns a hang
            # into a failure).
            async with asyncio.timeout(60):
                while (await daemon.bucket("tiny")).queue_depth:
                    await asyncio.sleep(0.02)
        await holder.release()
    assert len(daemon.settled()) == 1  # only the holder ever held anything


def test_the_doc_shows_the_tested_code() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "sse_example.md").read_text()
    code = (Path(__file__).resolve().parents[1] / "examples" / "sse_wait.py").read_text()
    assert f"```python\n{code}```" in doc
