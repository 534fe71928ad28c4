// runCall / streamCall: retries and fallback around any provider, against a real daemon and the
// fake provider reached with plain fetch.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  FallbackPolicy, LimiterRejected, PartialResponseError, ProviderError, RetryPolicy, SseUsage,
  classifyHttp, connectionError, runCall, streamCall, usageOf, type Attempt, type HopProposal,
  type Limiter, type Params, type Reservation, type StreamHandle,
} from "limiterd-client";
import { FakeProvider } from "./fake-provider.js";
import { limiterFor, openLeases, startDaemon, uniqueScope, type Daemon } from "./harness.js";

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

const noWait = RetryPolicy.interactive({ sleep: async () => {} });

async function post(p: Params): Promise<Response> {
  const resp = await fetch(`${provider.url}/v1/messages`, { method: "POST", body: JSON.stringify(p) });
  if (!resp.ok) {
    const body = await resp.json() as { error: { type: string; message: string } };
    throw classifyHttp({ provider: "anthropic", status: resp.status, headers: resp.headers, code: body.error.type, message: body.error.message });
  }
  return resp;
}

async function attempt(p: Params): Promise<Attempt<string>> {
  const resp = await post(p);
  const msg = await resp.json() as { content: Array<{ text: string }>; usage: unknown };
  return { value: msg.content[0]!.text, usage: usageOf(msg.usage), meta: { httpStatus: 200 } };
}

/** A StreamHandle over the fake provider's SSE with nothing but fetch. */
async function openStream(p: Params, r: Reservation): Promise<StreamHandle<string>> {
  const resp = await post({ ...p, stream: true });
  const sse = new SseUsage(r.inputTokens);
  let text = "";
  return {
    async *texts() {
      const reader = resp.body!.getReader();
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (e) {
          throw connectionError("anthropic", String(e), { usage: sse.usage() });
        }
        if (chunk.done) break;
        const before = sse.text.length;
        sse.feed(chunk.value);
        if (sse.error) throw classifyHttp({ provider: "anthropic", status: 200, code: sse.error.type, message: sse.error.message });
        if (sse.text.length > before) {
          text += sse.text.slice(before);
          yield sse.text.slice(before);
        }
      }
    },
    usage: () => sse.usage(),
    meta: () => ({ httpStatus: 200 }),
    final: async () => text,
    close: async () => undefined,
  };
}

const params = (model: string, extra: Params = {}): Params => ({
  model, max_tokens: 200, messages: [{ role: "user", content: "Hello" }], ...extra,
});

describe("runCall", () => {
  test("a 429 with retry-after is retried after it; every attempt reported", async () => {
    const scope = uniqueScope("retry");
    const sleeps: number[] = [];
    provider.queue({ kind: "status", status: 429, type: "rate_limit_error", headers: { "retry-after-ms": "250" } },
      { kind: "json", text: "second time" });
    const result = await runCall(limiter, {
      scope, params: params("claude-test"), retry: noWait.with({ sleep: async (ms) => { sleeps.push(ms); } }),
    }, attempt);
    assert.equal(result.value, "second time");
    assert.equal(result.attempts, 2);
    assert.deepEqual(sleeps, [250]);
    assert.equal(result.fellBack, false);
    assert.equal(await openLeases(d, scope), 0);
  });

  test("a request too big for one model falls back to one it fits (never fits)", async () => {
    const scope = uniqueScope("fits");
    provider.queue({ kind: "json", text: "fits here" });
    const result = await runCall(limiter, {
      scope, params: params("claude-tight"), retry: noWait, estimate: () => 5000,
      fallback: new FallbackPolicy({ chain: ["claude-tight", "claude-test"] }),
    }, attempt);
    assert.equal(result.value, "fits here");
    assert.deepEqual(result.path, [{ fromModel: "claude-tight", toModel: "claude-test", reason: "never_fits" }]);
    // Nothing in the chain fits: the error says so and names the models tried.
    await assert.rejects(runCall(limiter, {
      scope, params: params("claude-tight"), retry: noWait, estimate: () => 5_000_000,
      fallback: new FallbackPolicy({ chain: ["claude-tight", "claude-test"] }),
    }, attempt), (e: unknown) => e instanceof LimiterRejected && /models tried: claude-tight, claude-test/.test(e.message));
  });

  test("a long limiter wait hops at once on the live estimate", async () => {
    const scope = uniqueScope("wait");
    await runCall(limiter, { scope, params: params("claude-one"), retry: noWait }, attempt); // spend the 1/min
    provider.queue({ kind: "json", text: "from small" });
    const result = await runCall(limiter, {
      scope, params: params("claude-one"), retry: noWait,
      fallback: new FallbackPolicy({ chain: ["claude-one", "claude-small"], triggers: { limiterWaitMs: 2000 } }),
    }, attempt);
    assert.equal(result.model, "claude-small");
    assert.equal(result.path[0]!.reason, "limiter_wait");
    assert.equal(await openLeases(d, scope), 0);
  });

  test("ask may veto a hop or pick a model", async () => {
    const scope = uniqueScope("ask");
    const proposals: HopProposal[] = [];
    const overloaded = { kind: "status", status: 529, type: "overloaded_error" } as const;
    provider.queue(overloaded, overloaded);
    const veto = new FallbackPolicy({
      chain: ["claude-big", "claude-test", "claude-small"], triggers: { overloadedAfter: 1 },
      ask: (p) => { proposals.push(p); return null; },
    });
    await assert.rejects(runCall(limiter, { scope, params: params("claude-big"), retry: noWait.with({ maxAttempts: 2 }), fallback: veto }, attempt),
      (e: unknown) => e instanceof ProviderError && e.overloaded);
    assert.deepEqual(proposals.map((p) => [p.fromModel, p.reason, p.candidates]),
      [["claude-big", "overloaded", ["claude-test", "claude-small"]], ["claude-big", "overloaded", ["claude-test", "claude-small"]]]);

    provider.queue(overloaded, { kind: "json", text: "small" });
    const pick = new FallbackPolicy({
      chain: ["claude-big", "claude-test", "claude-small"], triggers: { overloadedAfter: 1 }, ask: async () => "claude-small",
    });
    const result = await runCall(limiter, { scope, params: params("claude-big"), retry: noWait, fallback: pick }, attempt);
    assert.deepEqual(result.modelsTried, ["claude-big", "claude-small"]);
    assert.equal(await openLeases(d, scope), 0);
  });

  test("policies validate their input", () => {
    assert.throws(() => new FallbackPolicy({ chain: [] }), /chain/);
    assert.throws(() => new FallbackPolicy({ chain: ["a", "a"] }), /unique/);
    assert.throws(() => new FallbackPolicy({ chain: ["a"], mode: "ask" }), /ask: required/);
    assert.throws(() => new FallbackPolicy({ chain: ["a"], adjust: { b: (p) => p } }), /adjust: models not in the chain: b/);
  });
});

describe("streamCall", () => {
  test("a failure before any text is retried; the stream then completes", async () => {
    const scope = uniqueScope("stream");
    provider.queue({ kind: "sse", texts: ["x"], failAfter: { deltas: 0, how: "error" } },
      { kind: "sse", texts: ["Hel", "lo"], output: 5 });
    const call = streamCall(limiter, { scope, params: params("claude-test"), retry: noWait }, openStream);
    const parts: string[] = [];
    for await (const t of call) parts.push(t);
    assert.equal(parts.join(""), "Hello"); // deltas may arrive coalesced
    assert.equal(call.text, "Hello");
    assert.equal(call.result!.attempts, 2);
    assert.equal(call.result!.usage.outputTokens, 5);
    assert.equal(await openLeases(d, scope), 0);
  });

  test("a failure after text reached the caller: PartialResponseError, usage reported", async () => {
    const scope = uniqueScope("partial");
    provider.queue({ kind: "sse", texts: ["one ", "two ", "three"], failAfter: { deltas: 2, how: "cut" } });
    const call = streamCall(limiter, { scope, params: params("claude-test"), retry: noWait }, openStream);
    const parts: string[] = [];
    const err = await (async () => { for await (const t of call) parts.push(t); })().then(() => null, (e: unknown) => e);
    assert.ok(err instanceof PartialResponseError, String(err));
    assert.equal(err.text, "one two ");
    assert.equal(parts.join(""), "one two ");
    assert.ok(err.usage.outputTokens >= 1);
    assert.equal(await openLeases(d, scope), 0);
    const log = await d.admin.listErrors({ model: "claude-test" });
    assert.ok(log.errors.some((e) => e.errorType === "connection_error"));
  });
});
