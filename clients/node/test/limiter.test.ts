// Reserve / report / release against a real limiterd process.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  LimiterBusy, LimiterInvalidArgument, LimiterRejected, LimiterUnavailable, Limiter, failOpen,
  safeCapacity, ProviderError, type Reservation,
} from "limiterd-client";
import { freePort, level, limiterFor, openLeases, startDaemon, uniqueScope, waitFor, type Daemon } from "./harness.js";

let d: Daemon;
let limiter: Limiter;
before(async () => {
  d = await startDaemon();
  limiter = limiterFor(d);
});
after(async () => {
  await limiter?.close();
  await d?.stop();
});

describe("reserve and report", () => {
  test("a grant, then a report that refunds the unused output", async () => {
    const scope = uniqueScope("cycle");
    const r = await limiter.reserve({ scope, model: "claude-test", inputTokens: 1000, maxOutputTokens: 500 });
    assert.equal(r.mode, "daemon");
    assert.ok(r.reservationId);
    assert.equal(r.grant!.inputTokens, 1000);
    assert.equal(r.grant!.outputTokens, 500);
    assert.ok(r.grant!.leaseMs > 0);
    assert.equal(await openLeases(d, scope), 1);
    r.markCalled();
    const s = await r.report({ inputTokens: 1000, outputTokens: 120 });
    assert.ok(s);
    assert.equal(s.state, "REPORTED");
    assert.equal(s.reservationId, r.reservationId);
    assert.equal(s.refundedOutputTokens, 380);
    assert.equal(s.refundedInputTokens, 0);
    assert.equal(await openLeases(d, scope), 0);
    await assert.rejects(r.report({ inputTokens: 1, outputTokens: 1 }), /already settled/);
  });

  test("release refunds everything", async () => {
    const scope = uniqueScope("release");
    const r = await limiter.reserve({ scope, model: "claude-test", inputTokens: 10, maxOutputTokens: 700 });
    // Levels refill as time passes: allow a little, far less than the 700 taken.
    assert.ok(await level(d, scope, "claude-test", "output_tokens") < 100_000 - 500);
    const s = await r.release();
    assert.equal(s!.state, "RELEASED");
    assert.equal(s!.refundedOutputTokens, 700);
    assert.equal(await openLeases(d, scope), 0);
  });

  test("withReservation: an error before the call releases, after it reports", async () => {
    const scope = uniqueScope("exit");
    const boom = new Error("boom");
    let held: Reservation | undefined;
    await assert.rejects(limiter.withReservation(
      { scope, model: "claude-test", inputTokens: 5, maxOutputTokens: 100 }, async (r) => {
        held = r;
        throw boom;
      }), boom);
    assert.equal(await openLeases(d, scope), 0);
    assert.equal(held!.settlement!.state, "RELEASED");
    assert.equal(held!.settlement!.refundedOutputTokens, 100);

    const overloaded = new ProviderError({ provider: "anthropic", status: 529, code: "overloaded_error",
      message: "Overloaded", retryable: true });
    await assert.rejects(limiter.withReservation(
      { scope, model: "claude-test", inputTokens: 5, maxOutputTokens: 100 }, async (r) => {
        held = r;
        r.markCalled();
        throw overloaded;
      }), overloaded);
    assert.ok(held!.settled);
    assert.equal(await openLeases(d, scope), 0);
    // A refused attempt used nothing: the whole reservation came back.
    assert.equal(held!.settlement!.state, "REPORTED");
    assert.equal(held!.settlement!.refundedOutputTokens, 100);
    assert.equal(held!.settlement!.refundedInputTokens, 5);

    // A normal return without a report: the recorded usage is reported as OK.
    const value = await limiter.withReservation(
      { scope, model: "claude-test", inputTokens: 5, maxOutputTokens: 100 }, async (r) => {
        held = r;
        r.markCalled();
        r.recordUsage({ inputTokens: 5, outputTokens: 40 });
        return "answer";
      });
    assert.equal(value, "answer");
    assert.equal(await openLeases(d, scope), 0);
    assert.equal(held!.settlement!.refundedOutputTokens, 60);
  });

  test("await using releases a reservation whose call never started", async () => {
    const scope = uniqueScope("using");
    let held: Reservation | undefined;
    {
      await using r = await limiter.reserve({ scope, model: "claude-test", inputTokens: 1, maxOutputTokens: 50 });
      held = r;
      assert.equal(await openLeases(d, scope), 1);
      assert.equal(r.settled, false);
    }
    assert.equal(await openLeases(d, scope), 0);
    assert.equal(held.settlement!.state, "RELEASED");
  });

  test("busy carries retry-after; never-fits is rejected; bad fields are named", async () => {
    const scope = uniqueScope("busy");
    const first = await limiter.reserve({ scope, model: "claude-one", inputTokens: 1, maxOutputTokens: 1 });
    const err = await limiter.reserve({ scope, model: "claude-one", inputTokens: 1, maxOutputTokens: 1 })
      .then(() => null, (e: unknown) => e);
    assert.ok(err instanceof LimiterBusy, String(err));
    assert.ok(err.retryAfterMs! > 0 && err.retryAfterMs! <= 60_000, String(err.retryAfterMs));
    await first.release();

    await assert.rejects(limiter.reserve({ scope, model: "claude-tight", inputTokens: 5000, maxOutputTokens: 1 }),
      LimiterRejected);
    await assert.rejects(limiter.reserve({ scope, model: "claude-test", inputTokens: -1, maxOutputTokens: 1 }),
      (e: unknown) => e instanceof LimiterInvalidArgument && /inputTokens/.test(e.message));
    await assert.rejects(limiter.reserve({ scope: "x".repeat(300), model: "claude-test", inputTokens: 1, maxOutputTokens: 1 }),
      (e: unknown) => e instanceof LimiterInvalidArgument && /scope/.test(e.message));
  });

  test("keepalive extends the lease of a long call", async () => {
    const scope = uniqueScope("keepalive");
    const r = await limiter.reserve({ scope, model: "claude-test", inputTokens: 1, maxOutputTokens: 1, leaseMs: 300 });
    const first = r.leaseExpiresAtMs;
    // Wait on the condition (a keepalive landed), not on a fixed sleep.
    await waitFor(() => r.keepalives >= 2);
    assert.ok(r.leaseExpiresAtMs > first);
    assert.equal(await openLeases(d, scope), 1);
    const s = await r.report({ inputTokens: 1, outputTokens: 1 });
    assert.equal(s!.state, "REPORTED"); // not EXPIRED, though 300 ms passed long ago
  });
});

describe("target and readiness", () => {
  test("targets are validated with a clear message", () => {
    for (const [bad, why] of [["http://127.0.0.1:50051", /is a URL.*"127\.0\.0\.1:50051"/], ["127.0.0.1", /no port/],
      ["", /empty/], ["localhost:99999", /out of range/], ["unix:", /needs a path/]] as const) {
      assert.throws(() => new Limiter({ target: bad }), (e: unknown) =>
        e instanceof LimiterInvalidArgument && /^target: /.test(e.message) && why.test(e.message), bad);
    }
    for (const good of ["127.0.0.1:1", "[::1]:50051", "localhost:50051", "unix:/tmp/x.sock"]) {
      void new Limiter({ target: good }).close();
    }
  });

  test("waitReady resolves on a serving daemon and times out on a dead port", async () => {
    await limiter.waitReady({ timeoutMs: 5000 });
    const dead = new Limiter({ target: `127.0.0.1:${await freePort()}`, rpcTimeoutMs: 200 });
    await assert.rejects(dead.waitReady({ timeoutMs: 300 }), (e: unknown) =>
      e instanceof LimiterUnavailable && /not ready after 300 ms/.test(e.message));
    await dead.close();
  });
});

describe("when the daemon is unreachable", () => {
  test("fail closed, fail open, safe capacity", async () => {
    const target = `127.0.0.1:${await freePort()}`;
    const opts = { target, rpcTimeoutMs: 300, transportAttempts: 1, logger: { warn: () => {} } };
    const req = { scope: "s", model: "m", inputTokens: 10, maxOutputTokens: 10 };

    const closed = new Limiter(opts);
    await assert.rejects(closed.reserve(req), LimiterUnavailable);
    await closed.close();

    const open = new Limiter({ ...opts, onUnavailable: failOpen() });
    const r = await open.reserve(req);
    assert.equal(r.mode, "open");
    assert.equal(await r.report({ inputTokens: 1, outputTokens: 1 }), null);
    assert.equal(open.counters.failOpen, 1);
    await open.close();

    const safe = new Limiter({ ...opts, onUnavailable: safeCapacity(2, 1000) });
    const a = await safe.reserve(req);
    const b = await safe.reserve(req);
    assert.deepEqual([a.mode, b.mode], ["local", "local"]);
    await assert.rejects(safe.reserve(req), LimiterBusy); // 2 requests a minute, no wait
    await assert.rejects(safe.reserve({ ...req, inputTokens: 5000 }), LimiterRejected);
    await a.release();
    await b.release();
    assert.equal(safe.counters.localGrants, 2);
    await safe.close();
  });
});
