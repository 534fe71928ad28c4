"""Reading a test daemon's /metrics. The RPC counters move when grpc reports a call done,
which can be just after the caller has its answer: a test waits until they show the calls it
made rather than reading once and racing that callback."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# A bound against a hang only: the callback runs within milliseconds on an idle machine.
SETTLE_BOUND_S = 30.0


def body(target: str) -> str:
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as r:
        text: str = r.read().decode()
    return text


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(target: str) -> Samples:
    return parse(body(target))


async def body_once(target: str, shown: Callable[[Samples], bool]) -> str:
    """/metrics as text once `shown` holds for its samples (or, past the bound, as it is:
    the test's own assertions then say what is missing)."""
    deadline = time.monotonic() + SETTLE_BOUND_S
    while True:
        text = await asyncio.to_thread(body, target)
        if shown(parse(text)) or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.02)


async def scrape_once(target: str, shown: Callable[[Samples], bool]) -> Samples:
    return parse(await body_once(target, shown))


def calls_counted(method: str, n: int) -> Callable[[Samples], bool]:
    """`n` calls of `method` have reached the RPC duration histogram."""
    key = ("limiterd_rpc_duration_seconds_count", (("method", method),))
    return lambda samples: samples.get(key, 0) >= n
