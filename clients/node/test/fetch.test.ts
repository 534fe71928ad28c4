// The fetch wrapper under the real @anthropic-ai/sdk, a real daemon and a fake provider.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import Anthropic from "@anthropic-ai/sdk";
import {
  FallbackPolicy, Limiter, LimiterUnavailable, PartialResponseError, RetryPolicy, failOpen, limitedFetch, scopeForApiKey,
  type CallEvent, type LimitedFetchOptions,
} from "limiterd-client";
import { FakeProvider } from "./fake-provider.js";
import { freePort, limiterFor, openLeases, startDaemon, waitFor, type Daemon } from "./harness.js";

let d: Daemon;
let limiter: Limiter;
let provider: FakeProvider;
before(async () => {
  [d, provider] = await Promise.all([startDaemon(), new FakeProvider().start()]);
  limiter = limiterFor(d);
});
after(async () => {
  await limiter?.close();
  await Promise.all([d?.stop(), provider?.stop()]);
});

let keys = 0;
/** An SDK client on the fake provider with its own API key (so its own scope). */
function client(options: LimitedFetchOptions = {}, maxRetries = 0): { sdk: Anthropic; scope: string } {
  const apiKey = `sk-ant-test-${process.pid}-${++keys}`;
  const sdk = new Anthropic({ apiKey, baseURL: provider.url, maxRetries, fetch: limitedFetch(limiter, options) });
  return { sdk, scope: scopeForApiKey(apiKey) };
}

const ask = { max_tokens: 300, messages: [{ role: "user" as const, content: "Hello" }] };

describe("limitedFetch", () => {
  test("a JSON answer: reserved, reported with the usage, the SDK's Message intact", async () => {
    const { sdk, scope } = client();
    provider.queue({ kind: "json", text: "hi there", input: 20, output: 9 });
    const msg = await sdk.messages.create({ model: "claude-test", ...ask });
    assert.equal(msg.content[0]!.type, "text");
    assert.equal((msg.content[0] as Anthropic.TextBlock).text, "hi there");
    assert.equal(msg.usage.output_tokens, 9);
    assert.equal(await openLeases(d, scope), 0);
    // The daemon settled with what the provider said: 300 reserved, 9 used.
    const buckets = await d.admin.getBuckets({ scope, model: "claude-test" });
    const out = buckets.buckets[0]!.dimensions.find((x) => x.name === "output_tokens")!;
    assert.ok(out.level > 100_000 - 300 + 200, `level ${out.level}: the unused output came back`);
    // The raw key never reached the daemon: only its scope.
    const seen = provider.seen.at(-1)!;
    assert.equal(seen.path, "/v1/messages");
  });

  test("count_tokens and other paths pass straight through", async () => {
    const { sdk, scope } = client();
    provider.queue({ kind: "json" });
    await sdk.messages.countTokens({ model: "claude-test", messages: ask.messages }).catch(() => undefined);
    assert.equal(provider.seen.at(-1)!.path, "/v1/messages/count_tokens");
    const buckets = await d.admin.getBuckets({ scope });
    assert.equal(buckets.buckets.length, 0, "no reservation for count_tokens");
  });

  test("a stream: SDK events intact (tool_use too), usage from the SSE usage events", async () => {
    const { sdk, scope } = client();
    provider.queue({ kind: "sse", texts: ["Hel", "lo"], input: 30, output: 12, toolUse: true });
    const stream = sdk.messages.stream({ model: "claude-test", ...ask });
    const types: string[] = [];
    for await (const ev of stream) types.push(ev.type);
    const final = await stream.finalMessage();
    assert.deepEqual(types.filter((t) => t === "content_block_start").length, 2);
    assert.ok(types.includes("message_delta") && types.at(-1) === "message_stop");
    assert.equal((final.content[0] as Anthropic.TextBlock).text, "Hello");
    assert.equal(final.content[1]!.type, "tool_use");
    assert.deepEqual((final.content[1] as Anthropic.ToolUseBlock).input, { city: "Paris" });
    assert.equal(final.usage.output_tokens, 12);
    await waitFor(async () => (await openLeases(d, scope)) === 0);
    const out = (await d.admin.getBuckets({ scope, model: "claude-test" })).buckets[0]!
      .dimensions.find((x) => x.name === "output_tokens")!;
    assert.ok(out.level >= 100_000 - 12 - 1 && out.level <= 100_000, `level ${out.level}`);
  });

  test("a 429 reaches the SDK as RateLimitError, reported as refused with its headers", async () => {
    const { sdk, scope } = client();
    provider.queue({ kind: "status", status: 429, type: "rate_limit_error", headers: { "retry-after": "1" } });
    const err = await sdk.messages.create({ model: "claude-small", ...ask }).then(() => null, (e: unknown) => e);
    assert.ok(err instanceof Anthropic.RateLimitError, String(err));
    assert.equal(err.headers.get("anthropic-ratelimit-requests-remaining"), "0");
    assert.equal(await openLeases(d, scope), 0);
    const b = (await d.admin.getBuckets({ scope, model: "claude-small" })).buckets[0]!;
    // RATE_LIMITED with retry-after pauses the scope x model at the daemon.
    assert.ok(b.pausedUntilMs > 0n, "the daemon paused the model on the provider's 429");
    const out = b.dimensions.find((x) => x.name === "output_tokens")!;
    assert.ok(out.level > 100_000 - 100, `a refused attempt used nothing (level ${out.level})`);
    const log = await d.admin.listErrors({ model: "claude-small" });
    assert.ok(log.errors.some((e) => e.httpStatus === 429 && e.errorType === "rate_limit_error"));
  });

  test("the SDK's own retries go through the wrapper one reserved attempt at a time", async () => {
    const { sdk, scope } = client({}, 2);
    provider.queue(
      { kind: "status", status: 529, type: "overloaded_error", headers: { "retry-after-ms": "5" } },
      { kind: "json", output: 3 });
    const before = provider.seen.length;
    const msg = await sdk.messages.create({ model: "claude-test", ...ask });
    assert.equal(msg.usage.output_tokens, 3);
    assert.equal(provider.seen.length - before, 2);
    assert.equal(await openLeases(d, scope), 0);
  });

  test("RetryPolicy and FallbackPolicy in the wrapper: 529s hop to the next model", async () => {
    const events: CallEvent[] = [];
    const retry = RetryPolicy.interactive({ sleep: async () => {} });
    const fallback = new FallbackPolicy({
      chain: ["claude-big", "claude-small"],
      triggers: { overloadedAfter: 2 },
      adjust: { "claude-small": (p) => ({ ...p, max_tokens: 100 }) },
    });
    const { sdk, scope } = client({ retry, fallback, onEvent: (e) => events.push(e) });
    provider.queue(
      { kind: "status", status: 529, type: "overloaded_error" },
      { kind: "status", status: 529, type: "overloaded_error" },
      { kind: "json", text: "from small" });
    const before = provider.seen.length;
    const msg = await sdk.messages.create({ model: "claude-big", ...ask });
    assert.equal((msg.content[0] as Anthropic.TextBlock).text, "from small");
    const sent = provider.seen.slice(before).map((s) => [s.body["model"], s.body["max_tokens"]]);
    assert.deepEqual(sent, [["claude-big", 300], ["claude-big", 300], ["claude-small", 100]]);
    assert.deepEqual(events.map((e) => e.type), ["retry", "fallback"]);
    assert.equal(await openLeases(d, scope), 0);
    const log = await d.admin.listErrors({ model: "claude-big" });
    assert.deepEqual(log.errors.slice(0, 2).map((e) => [e.httpStatus, e.fellBack]), [[529, true], [529, false]]);
  });

  test("a limiter that cannot grant answers the SDK with a 429 it understands", async () => {
    const { sdk, scope } = client({ maxWaitMs: 0 });
    provider.queue({ kind: "json" });
    await sdk.messages.create({ model: "claude-one", ...ask }); // the one request a minute
    const before = provider.seen.length;
    const err = await sdk.messages.create({ model: "claude-one", ...ask }).then(() => null, (e: unknown) => e);
    assert.ok(err instanceof Anthropic.RateLimitError, String(err));
    assert.match(err.message, /limiterd: /);
    assert.equal(err.headers.get("x-limiterd"), "busy");
    assert.ok(Number(err.headers.get("retry-after-ms")) > 0);
    assert.equal(provider.seen.length, before, "the provider was never called");
    assert.equal(await openLeases(d, scope), 0);
  });

  test("a stream cut mid-way: the SDK sees the failure, the used tokens are reported", async () => {
    const { sdk, scope } = client();
    provider.queue({ kind: "sse", texts: ["one ", "two ", "three"], failAfter: { deltas: 2, how: "cut" } });
    const stream = sdk.messages.stream({ model: "claude-test", ...ask });
    let text = "";
    const err = await (async () => {
      for await (const ev of stream) {
        if (ev.type === "content_block_delta" && ev.delta.type === "text_delta") text += ev.delta.text;
      }
    })().then(() => null, (e: unknown) => e);
    assert.ok(err, "the cut surfaced");
    assert.equal(text, "one two ");
    const partial = findCause(err, PartialResponseError);
    assert.ok(partial, `a PartialResponseError in ${String(err)}`);
    assert.equal(partial.text, "one two ");
    assert.ok(partial.usage.outputTokens >= 1);
    await waitFor(async () => (await openLeases(d, scope)) === 0);
    // The error log is written after the settlement the lease count shows: wait for it too.
    await waitFor(async () => (await d.admin.listErrors({ model: "claude-test" })).errors
      .some((e) => e.errorType === "connection_error"));
  });

  test("an error event mid-stream: the SDK raises its error, reported OVERLOADED", async () => {
    const { sdk, scope } = client();
    provider.queue({ kind: "sse", texts: ["a", "b"], failAfter: { deltas: 1, how: "error" } });
    const stream = sdk.messages.stream({ model: "claude-big", ...ask });
    const err = await stream.finalMessage().then(() => null, (e: unknown) => e);
    assert.ok(err instanceof Anthropic.APIError, String(err));
    await waitFor(async () => (await openLeases(d, scope)) === 0);
    const log = await d.admin.listErrors({ model: "claude-big" });
    assert.ok(log.errors.some((e) => e.errorType === "overloaded_error" && e.httpStatus === 529));
  });

  test("a caller that stops reading settles the reservation as cancelled", async () => {
    const { sdk, scope } = client();
    provider.queue({ kind: "sse", texts: ["x", "y", "z"] });
    const stream = sdk.messages.stream({ model: "claude-test", ...ask });
    for await (const ev of stream) {
      if (ev.type === "content_block_delta") break;
    }
    await waitFor(async () => (await openLeases(d, scope)) === 0);
  });

  test("the daemon away: fail closed never calls the provider, fail open does", async () => {
    const target = `127.0.0.1:${await freePort()}`; // nothing listens there
    const quiet = { target, transportAttempts: 1, rpcTimeoutMs: 500, logger: { warn: () => {} } };
    const closed = new Limiter(quiet);
    const before = provider.seen.length;
    const sdk = new Anthropic({ apiKey: "k", baseURL: provider.url, maxRetries: 0, fetch: limitedFetch(closed) });
    const err = await sdk.messages.create({ model: "claude-test", ...ask }).then(() => null, (e: unknown) => e);
    assert.ok(err instanceof Anthropic.APIConnectionError, String(err));
    assert.ok(err.cause instanceof LimiterUnavailable, String(err.cause));
    assert.equal(provider.seen.length, before, "no unmetered call went out");
    await closed.close();

    const open = new Limiter({ ...quiet, onUnavailable: failOpen() });
    provider.queue({ kind: "json", text: "unmetered" });
    const sdk2 = new Anthropic({ apiKey: "k", baseURL: provider.url, maxRetries: 0, fetch: limitedFetch(open) });
    const msg = await sdk2.messages.create({ model: "claude-test", ...ask });
    assert.equal((msg.content[0] as Anthropic.TextBlock).text, "unmetered");
    assert.equal(open.counters.failOpen, 1);
    await open.close();
  });

  test("40 concurrent calls, half of them streams: every reservation settled, usage exact", async () => {
    const { sdk, scope } = client();
    provider.fallback = { kind: "json", output: 5 };
    const calls = Array.from({ length: 40 }, async (_, i) => {
      if (i % 2 === 0) return (await sdk.messages.create({ model: "claude-big", ...ask })).usage.output_tokens;
      const stream = sdk.messages.stream({ model: "claude-big", ...ask });
      return (await stream.finalMessage()).usage.output_tokens;
    });
    try {
      const outputs = await Promise.all(calls);
      assert.deepEqual(outputs, Array(40).fill(5));
    } finally {
      provider.fallback = { kind: "json" };
    }
    await waitFor(async () => (await openLeases(d, scope)) === 0);
    // Charged what was used (40 x 5), not what was reserved (40 x 300).
    const out = (await d.admin.getBuckets({ scope, model: "claude-big" })).buckets[0]!
      .dimensions.find((x) => x.name === "output_tokens")!;
    assert.ok(out.level >= 100_000 - 40 * 5 - 1, `level ${out.level}`);
  });
});

function findCause<T>(err: unknown, type: new (...a: never[]) => T): T | null {
  for (let e: unknown = err, i = 0; e && i < 5; e = (e as { cause?: unknown }).cause, i++) {
    if (e instanceof type) return e;
  }
  return null;
}

