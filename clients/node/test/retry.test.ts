// RetryPolicy and error classification: pure, with an injected clock, sleep and random.
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { ProviderError, RetryPolicy, classifyHttp, parseRetryAfterMs } from "limiterd-client";

const now = Date.parse("2026-11-28T08:00:00Z");

describe("classification", () => {
  test("retry-after-ms wins, then retry-after seconds, then an HTTP date", () => {
    assert.equal(parseRetryAfterMs({ "retry-after-ms": "1500", "retry-after": "9" }, now), 1500);
    assert.equal(parseRetryAfterMs({ "Retry-After": "2.5" }, now), 2500);
    assert.equal(parseRetryAfterMs({ "retry-after": "Sat, 28 Nov 2026 08:00:30 GMT" }, now), 30_000);
    assert.equal(parseRetryAfterMs({ "retry-after": "soon" }, now), null);
    assert.equal(parseRetryAfterMs({}, now), null);
    assert.equal(parseRetryAfterMs(new Headers({ "retry-after": "-3" }), now), 0);
  });

  test("retryable statuses, spend limits, x-should-retry", () => {
    const c = (status: number, extra: Partial<Parameters<typeof classifyHttp>[0]> = {}) =>
      classifyHttp({ provider: "anthropic", status, nowMs: now, ...extra });
    for (const s of [408, 409, 429, 500, 502, 503, 504, 529]) assert.equal(c(s).retryable, true, String(s));
    for (const s of [400, 401, 403, 404, 413]) assert.equal(c(s).retryable, false, String(s));
    assert.equal(c(429, { message: "You have reached your specified API usage limits" }).retryable, false);
    assert.equal(c(429, { code: "billing_error" }).retryable, false);
    assert.equal(c(529, { headers: { "x-should-retry": "false" } }).retryable, false);
    assert.equal(c(400, { headers: { "X-Should-Retry": "true" } }).retryable, true);
    const overload = c(200, { code: "overloaded_error" }); // an error event inside a 200 stream
    assert.equal(overload.status, 529);
    assert.ok(overload.overloaded && overload.retryable);
    const limited = c(429, { headers: { "retry-after": "3", "request-id": "req_9" } });
    assert.ok(limited.rateLimited);
    assert.equal(limited.retryAfterMs, 3000);
    assert.equal(limited.requestId, "req_9");
    assert.ok(c(504).timeout);
  });
});

describe("RetryPolicy", () => {
  const err = (fields: Partial<ConstructorParameters<typeof ProviderError>[0]> = {}) => new ProviderError({
    provider: "anthropic", status: 529, code: "overloaded_error", message: "m", retryable: true, ...fields,
  });

  test("full jitter under the cap, doubling per failure", () => {
    const top = new RetryPolicy({ baseDelayMs: 100, maxDelayMs: 1000, random: () => 0.999999 });
    assert.deepEqual([1, 2, 3, 4, 5].map((f) => Math.round(top.backoff(f))), [100, 200, 400, 800, 1000]);
    assert.equal(new RetryPolicy({ random: () => 0 }).backoff(3), 0);
  });

  test("gives up: not retryable, attempts used, deadline passed, Retry-After beyond it", () => {
    const p = new RetryPolicy({ maxAttempts: 3, maxElapsedMs: 10_000, random: () => 0.5 });
    assert.equal(p.delay(err({ retryable: false }), 1, 0), null);
    assert.equal(p.delay(err(), 3, 0), null);
    assert.equal(p.delay(err(), 1, 10_000), null);
    assert.equal(p.delay(err({ retryAfterMs: 20_000 }), 1, 0), null);
    assert.equal(p.delay(err({ retryAfterMs: 2_000 }), 1, 0), 2_000);
    assert.equal(p.delay(err(), 1, 9_990), 10, "never sleeps past the deadline");
  });

  test("presets", () => {
    const i = RetryPolicy.interactive();
    assert.deepEqual([i.maxAttempts, i.maxElapsedMs], [3, 15_000]);
    const a = RetryPolicy.analysis({ maxAttempts: 4 });
    assert.deepEqual([a.maxAttempts, a.maxElapsedMs, a.maxDelayMs], [4, 600_000, 120_000]);
    assert.equal(RetryPolicy.none().maxAttempts, 1);
    assert.throws(() => new RetryPolicy({ maxAttempts: 0 }), /maxAttempts/);
    assert.ok(Object.isFrozen(i));
  });

  test("run retries a retryable failure and sleeps what the policy says", async () => {
    const sleeps: number[] = [];
    let t = 0;
    const p = new RetryPolicy({ clock: () => t, sleep: async (ms) => { sleeps.push(ms); t += ms; }, random: () => 0.5 });
    let calls = 0;
    const value = await p.run(async () => {
      if (++calls < 3) throw err({ retryAfterMs: calls === 1 ? 700 : null });
      return "ok";
    });
    assert.equal(value, "ok");
    assert.deepEqual(sleeps, [700, 500]); // Retry-After, then jitter 0.5 x (500 x 2)
    await assert.rejects(p.run(async () => { throw err({ retryable: false }); }), ProviderError);
  });
});
