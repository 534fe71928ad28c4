"""One app process of the goodput benchmark: N agents making realistic requests through the
real `anthropic` SDK, in one of three setups.

    sdk       the SDK's own retries (2), no limiter
    local     a limiter inside this process (limiterd's own engine, in memory) configured with
              the full key limit, as each replica would do alone; the SDK's retries stay on
    limiterd  the shared daemon, through the client library and its anthropic adapter
    gateway   the plain SDK (as `sdk`), its base URL pointing at `limiterd gateway`

    python -m bench.app MODE AGENTS SECONDS PROVIDER_URL OUT.jsonl [LIMITERD_TARGET] [SEED]
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

import anthropic

from bench.goodput_config import KEY_LIMITS, MODEL, limiter_config
from limiterd.clock import SystemClock
from limiterd.engine import Engine
from limiterd.ledger.ledger import Granted
from limiterd.ledger.model import AcquireRequest, Outcome
from limiterd.storage.memory import MemoryJournal
from limiterd_client import AsyncAnthropicAdapter, Limiter, RetryPolicy, count_tokens_estimator

WORDS = "the screenplay act scene character conflict beat arc dialogue draft note".split()


def request(rng: random.Random) -> dict[str, Any]:
    words = rng.randint(300, 1500)
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return {"model": MODEL, "max_tokens": rng.choice([256, 512, 768]),
            "messages": [{"role": "user", "content": f"Review this scene: {text}"}]}


async def agent(mode: str, n: int, stop: float, out: Any, rng: random.Random,
                client: anthropic.AsyncAnthropic, adapter: AsyncAnthropicAdapter | None,
                engine: Engine | None) -> None:
    while time.time() < stop:
        params = request(rng)
        started = time.time()
        ok, error = False, ""
        try:
            if mode == "limiterd":
                assert adapter is not None
                await adapter.create(**params)
            elif mode == "local":
                assert engine is not None
                est = len(json.dumps(params["messages"])) // 3
                got = await engine.acquire(AcquireRequest(
                    "key", MODEL, "", est, params["max_tokens"]), max(0.0, stop - time.time()))
                if not isinstance(got, Granted):
                    raise TimeoutError("local limiter: no capacity before the end")
                try:
                    msg = await client.messages.create(**params)
                except Exception:
                    await engine.report(got.reservation.id, est, 0, Outcome.ERROR, 0)
                    raise
                await engine.report(got.reservation.id, msg.usage.input_tokens,
                                    msg.usage.output_tokens, Outcome.OK, 0)
            else:
                await client.messages.create(**params)
            ok = True
        except Exception as exc:  # noqa: BLE001 - every failure is a data point
            error = f"{type(exc).__name__}: {exc}"[:300]
        out.write(json.dumps({"agent": n, "start": started, "end": time.time(), "ok": ok,
                              "error": error}) + "\n")


async def main(mode: str, agents: int, seconds: float, url: str, out_path: str,
               target: str, seed: int) -> None:
    rng = random.Random(seed)
    retries = 0 if mode == "limiterd" else 2
    client = anthropic.AsyncAnthropic(api_key="sk-bench", base_url=url, max_retries=retries,
                                      timeout=120)
    stop = time.time() + seconds
    engine = adapter = None
    limiter = None
    if mode == "local":
        engine = Engine(limiter_config(KEY_LIMITS), MemoryJournal(), SystemClock())
        await engine.start()
    if mode == "limiterd":
        limiter = Limiter(target)
        retry = RetryPolicy(max_attempts=6, base_delay=0.5, max_delay=10.0,
                            max_elapsed=max(1.0, seconds))
        # Input tokens counted by the provider's count_tokens endpoint: exact reservations.
        adapter = AsyncAnthropicAdapter(client, limiter, retry=retry, max_wait=seconds,
                                        estimator=count_tokens_estimator(client))
    with open(out_path, "w", buffering=1) as out:
        await asyncio.gather(*(agent(mode, i, stop, out, random.Random(rng.random()), client,
                                     adapter, engine) for i in range(agents)))
    if engine is not None:
        await engine.stop()
    if limiter is not None:
        await limiter.close()
    await client.close()


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(main(a[0], int(a[1]), float(a[2]), a[3], a[4], a[5] if len(a) > 5 else "",
                     int(a[6]) if len(a) > 6 else 1))
