// MarkSent (issue 15): the real @anthropic-ai/sdk through limitedFetch, a real daemon with the
// shipped refill allowance, and a fake provider that holds the call. A call that takes a full
// bucket down holds the daemon's refill until the client marks its send: while the provider
// still works on the call (no report yet) the refill runs again only if that mark arrived.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import Anthropic from "@anthropic-ai/sdk";
import { limitedFetch, scopeForApiKey, type Limiter } from "limiterd-client";
import { FakeProvider } from "./fake-provider.js";
import { CONFIG, level, limiterFor, openLeases, startDaemon, waitFor, type Daemon } from "./harness.js";

let d: Daemon;
let limiter: Limiter;
let provider: FakeProvider;
before(async () => {
  const config = CONFIG.replace("refill_allowance_ms = 0", "refill_allowance_ms = 100");
  [d, provider] = await Promise.all([startDaemon({ config }), new FakeProvider().start()]);
  limiter = limiterFor(d);
});
after(async () => {
  await limiter?.close();
  await Promise.all([d?.stop(), provider?.stop()]);
});

test("the client marks its send and the daemon's refill resumes from it", async () => {
  const apiKey = `sk-ant-marks-${process.pid}`;
  const scope = scopeForApiKey(apiKey);
  let finish!: () => void;
  provider.queue({ kind: "json", text: "marked", until: new Promise<void>((ok) => { finish = ok; }) });
  const sdk = new Anthropic({ apiKey, baseURL: provider.url, maxRetries: 0, fetch: limitedFetch(limiter) });
  const call = sdk.messages.create({ model: "claude-test", max_tokens: 10, messages: [{ role: "user", content: "hi" }] });
  try {
    await waitFor(() => provider.seen.some((s) => s.path === "/v1/messages"));
    // 1000 requests a minute: 999 left after the grant; above that only once the hold ended.
    await waitFor(async () => (await level(d, scope, "claude-test", "requests")) > 999 + 1e-6);
    assert.equal(await openLeases(d, scope), 1, "the call is still at the provider: no report yet");
    assert.equal(limiter.counters.marksSent, 1);
  } finally {
    finish();
  }
  await call;
  await waitFor(async () => (await openLeases(d, scope)) === 0);
});

test("a reservation that does not promise is not asked to mark", async () => {
  const r = await limiter.reserve({ scope: `plain-${process.pid}`, model: "claude-test", inputTokens: 1, maxOutputTokens: 1 });
  assert.equal(r.grant!.markSentWanted, false);
  await r.release();
  const p = await limiter.reserve({ scope: `promised-${process.pid}`, model: "claude-test", inputTokens: 1, maxOutputTokens: 1,
    marksSent: true });
  assert.equal(p.grant!.markSentWanted, true);
  await p.release();
});
