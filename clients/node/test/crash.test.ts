// The daemon killed (SIGKILL) while a provider call runs: the app keeps its answer, and the
// Report reaches the daemon once it is back.
import assert from "node:assert/strict";
import { test } from "node:test";
import Anthropic from "@anthropic-ai/sdk";
import { limitedFetch, scopeForApiKey } from "limiterd-client";
import { FakeProvider } from "./fake-provider.js";
import { limiterFor, openLeases, portOf, startDaemon, waitFor } from "./harness.js";

test("daemon killed mid-call: the answer is kept, the Report delivered later", async () => {
  const first = await startDaemon();
  const port = portOf(first.target);
  const provider = await new FakeProvider().start();
  const limiter = limiterFor(first, { transportAttempts: 2, rpcTimeoutMs: 1000, logger: { warn: () => {} } });
  try {
    const apiKey = "sk-ant-crash-test";
    const scope = scopeForApiKey(apiKey);
    const sdk = new Anthropic({ apiKey, baseURL: provider.url, maxRetries: 0, fetch: limitedFetch(limiter) });
    let answer!: () => void;
    provider.queue({ kind: "json", text: "served", input: 15, output: 42, until: new Promise<void>((ok) => { answer = ok; }) });
    const call = sdk.messages.create({ model: "claude-test", max_tokens: 500, messages: [{ role: "user", content: "hi" }] });
    await waitFor(() => provider.seen.length === 1); // the provider call is running
    assert.equal(await openLeases(first, scope), 1);
    await first.kill();
    answer(); // the provider answers while the daemon is down

    const msg = await call;
    assert.equal((msg.content[0] as Anthropic.TextBlock).text, "served");
    assert.equal(limiter.pendingSettlements, 1);
    assert.equal(limiter.counters.settlementsDeferred, 1);

    const second = await startDaemon({ port, db: first.db }); // same journal, same address
    try {
      // The reservation survived the crash (journaled) and is still open until the Report lands.
      assert.ok(await limiter.flush(30_000), "the deferred Report was delivered");
      assert.equal(limiter.counters.settlementsDelivered, 1);
      assert.equal(limiter.pendingSettlements, 0);
      assert.equal(await openLeases(second, scope), 0);
      const out = (await second.admin.getBuckets({ scope, model: "claude-test" })).buckets[0]!
        .dimensions.find((x) => x.name === "output_tokens")!;
      assert.ok(out.level > 100_000 - 500 + 400, `the 458 unused output tokens came back (level ${out.level})`);
    } finally {
      await second.stop();
    }
  } finally {
    await limiter.close({ flushTimeoutMs: 0 });
    await provider.stop();
  }
});

test("a daemon restarted without its state refuses the Report: the answer is still returned", async () => {
  const first = await startDaemon({ db: ":memory:" });
  const port = portOf(first.target);
  const provider = await new FakeProvider().start();
  const warnings: string[] = [];
  const limiter = limiterFor(first, { logger: { warn: (m) => warnings.push(m) } });
  let second: Awaited<ReturnType<typeof startDaemon>> | undefined;
  try {
    const sdk = new Anthropic({ apiKey: "sk-ant-amnesia", baseURL: provider.url, maxRetries: 0, fetch: limitedFetch(limiter) });
    let answer!: () => void;
    provider.queue({ kind: "json", text: "served anyway", until: new Promise<void>((ok) => { answer = ok; }) });
    const call = sdk.messages.create({ model: "claude-test", max_tokens: 50, messages: [{ role: "user", content: "hi" }] });
    await waitFor(() => provider.seen.length === 1);
    await first.kill();
    second = await startDaemon({ port, db: ":memory:" }); // up again, the reservation forgotten
    answer(); // the provider call ends only now, so the Report meets the new daemon
    const msg = await call;
    assert.equal((msg.content[0] as Anthropic.TextBlock).text, "served anyway");
    assert.equal(limiter.counters.settleFailures, 1);
    assert.equal(limiter.pendingSettlements, 0, "a refused Report is not retried forever");
    assert.ok(warnings.some((w) => /could not settle/.test(w)), warnings.join("\n"));
  } finally {
    await limiter.close({ flushTimeoutMs: 0 });
    await provider.stop();
    await second?.stop();
  }
});

test("close() gives up what it could not flush, so nothing retries on a closed channel", async () => {
  const d = await startDaemon({ db: ":memory:" });
  const limiter = limiterFor(d, { transportAttempts: 1, rpcTimeoutMs: 500, logger: { warn: () => {} } });
  const r = await limiter.reserve({ scope: "s", model: "claude-test", inputTokens: 1, maxOutputTokens: 1 });
  await d.kill();
  assert.equal(await r.report({ inputTokens: 1, outputTokens: 1 }), null, "deferred, not thrown");
  assert.equal(limiter.pendingSettlements, 1);
  await limiter.close({ flushTimeoutMs: 50 });
  assert.equal(limiter.pendingSettlements, 0);
  assert.equal(limiter.counters.settlementsDropped, 1);
});
