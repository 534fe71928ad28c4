"""An app calling Claude through limiterd, with a fallback chain (the README's example).

Run a daemon (`make run`), then `python client/examples/anthropic_fallback.py`. It reads
ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL, if set) like the SDK itself, and LIMITERD_TARGET.
"""

from __future__ import annotations

import asyncio
import os

import anthropic

from limiterd_client import (
    AsyncAnthropicAdapter,
    FallbackPolicy,
    FallbackTriggers,
    Limiter,
    RetryPolicy,
    SafeCapacity,
)


async def main() -> None:
    fallback = FallbackPolicy(
        chain=("claude-opus-4-1", "claude-sonnet-4-5", "claude-haiku-4-5"),
        # fall back after 2 overloads, a 429 asking for > 20 s, or > 5 s queued in limiterd
        triggers=FallbackTriggers(overloaded_after=2, rate_limited_beyond=20, limiter_wait=5),
        adjust={"claude-haiku-4-5": lambda p: {**p, "max_tokens": min(p["max_tokens"], 1024)}},
    )
    target = os.environ.get("LIMITERD_TARGET", "127.0.0.1:50051")
    # While the daemon is unreachable, allow a small local budget instead of failing.
    unavailable = SafeCapacity(requests_per_minute=5, tokens_per_minute=20_000)
    async with (
        anthropic.AsyncAnthropic() as client,  # ANTHROPIC_API_KEY from the environment
        Limiter(target, on_unavailable=unavailable) as limiter,
    ):
        llm = AsyncAnthropicAdapter(client, limiter, retry=RetryPolicy.interactive(),
                                    fallback=fallback)
        result = await llm.create(model="claude-opus-4-1", max_tokens=2048,
                                  messages=[{"role": "user", "content": "Hello, Claude"}])
        print(result.value.content[0].text)
        print("served by", result.model, "after trying", " -> ".join(result.models_tried),
              "| fallbacks:", limiter.counters.fallbacks)

        stream = llm.stream(model="claude-opus-4-1", max_tokens=1024,
                            messages=[{"role": "user", "content": "Count to five"}])
        async for text in stream:
            print(text, end="", flush=True)
        print("\nusage:", stream.result.usage)


if __name__ == "__main__":
    asyncio.run(main())
