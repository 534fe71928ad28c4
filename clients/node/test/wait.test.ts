// Live wait status: onWait from AcquireStream, and the example route handler that forwards it
// to a browser as server-sent events.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { LimiterBusy, WaitTooLong, scopeForApiKey, type Limiter, type WaitUpdate } from "limiterd-client";
import { waitStatusRoute } from "../examples/wait-status-route.js";
import { FakeProvider } from "./fake-provider.js";
import { limiterFor, openLeases, startDaemon, uniqueScope, waitFor, type Daemon } from "./harness.js";

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

const conc = (scope: string) => ({ scope, model: "claude-conc", inputTokens: 10, maxOutputTokens: 10 });

test("onWait hears where the call stands until it is granted", async () => {
  const scope = uniqueScope("onwait");
  const holder = await limiter.reserve(conc(scope)); // max_concurrent = 1: the next one queues
  const updates: WaitUpdate[] = [];
  const waiting = limiter.reserve({ ...conc(scope), maxWaitMs: 20_000, onWait: (u) => { updates.push(u); } });
  await waitFor(() => updates.length > 0);
  assert.equal(updates[0]!.position, 1);
  assert.ok(updates[0]!.queueDepth >= 1);
  await holder.release();
  const r = await waiting;
  assert.equal(r.mode, "daemon");
  assert.deepEqual(r.updates, updates);
  await r.release();
});

test("a wait budget below the estimate gives the place up at once; abort does too", async () => {
  const scope = uniqueScope("budget");
  const r1 = await limiter.reserve({ scope, model: "claude-one", inputTokens: 1, maxOutputTokens: 1 });
  await r1.report({ inputTokens: 1, outputTokens: 1 });
  const err = await limiter.reserve({ scope, model: "claude-one", inputTokens: 1, maxOutputTokens: 1, maxWaitMs: 50_000,
    waitBudgetMs: 1_000 }).then(() => null, (e: unknown) => e);
  assert.ok(err instanceof WaitTooLong && err instanceof LimiterBusy, String(err));
  assert.ok(err.retryAfterMs! > 1_000);

  const holder = await limiter.reserve(conc(scope));
  const stop = new AbortController();
  const waiting = limiter.reserve({ ...conc(scope), maxWaitMs: 20_000, signal: stop.signal,
    onWait: () => stop.abort(new Error("user left")) });
  await assert.rejects(waiting, /user left/);
  await holder.release();
  // The abandoned place left nothing behind: no lease, and the next caller is granted at once.
  assert.equal(await openLeases(d, scope), 0);
  const next = await limiter.reserve(conc(scope));
  await next.release();
});

test("the example route handler streams queued events, pings, the text, then done", async () => {
  const apiKey = "sk-ant-route-test";
  const scope = scopeForApiKey(apiKey);
  const holder = await limiter.reserve(conc(scope));
  provider.queue({ kind: "sse", texts: ["Hi", " there"], output: 4 });
  const route = waitStatusRoute(limiter, { model: "claude-conc", baseURL: provider.url, apiKey, pingMs: 30 });
  const resp = await route(new Request("http://app/api/ask", { method: "POST", body: JSON.stringify({ prompt: "hello" }) }));
  assert.equal(resp.headers.get("content-type"), "text/event-stream");
  const reader = resp.body!.pipeThrough(new TextDecoderStream()).getReader();
  let seen = "";
  const readUntil = async (cond: () => boolean): Promise<void> => {
    while (!cond()) {
      const { value, done } = await reader.read();
      if (done) return;
      seen += value;
    }
  };
  await readUntil(() => seen.includes("event: queued") && seen.includes(": ping"));
  const queued = JSON.parse(/event: queued\ndata: (.*)\n/.exec(seen)![1]!) as WaitUpdate;
  assert.equal(queued.position, 1);
  await holder.release(); // the call is granted and goes out
  await readUntil(() => false); // to the end of the stream
  const events = [...seen.matchAll(/^event: (\w+)$/gm)].map((m) => m[1]);
  // queued (one or more) before anything else, then the text deltas, then done.
  assert.match(events.join(","), /^(queued,)+(text,)+done$/);
  assert.equal(events.at(-1), "done");
  const texts = [...seen.matchAll(/^event: text\ndata: (.*)$/gm)].map((m) => JSON.parse(m[1]!) as string);
  assert.equal(texts.join(""), "Hi there");
  await waitFor(async () => (await openLeases(d, scope)) === 0);
});

test("the route handler refuses a request without a prompt", async () => {
  const route = waitStatusRoute(limiter, { baseURL: provider.url, apiKey: "k" });
  const resp = await route(new Request("http://app/api/ask", { method: "POST", body: "{}" }));
  assert.equal(resp.status, 400);
  assert.match(((await resp.json()) as { error: string }).error, /^prompt: /);
});
