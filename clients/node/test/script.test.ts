// examples/acquire_report.mjs: the API from the generated stubs alone, against a real daemon.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";
import { freePort, NODE_DIR, startDaemon, uniqueScope, type Daemon } from "./harness.js";

const run = promisify(execFile);
const SCRIPT = join(NODE_DIR, "examples/acquire_report.mjs");

async function client(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [SCRIPT, ...args], { timeout: 60_000 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

let d: Daemon;
before(async () => { d = await startDaemon(); });
after(async () => { await d?.stop(); });

test("acquire then report settles, int64 as decimal strings", async () => {
  const done = await client("--target", d.target, "--scope", uniqueScope("script"), "--model", "claude-test",
    "--input-tokens", "1000", "--max-output-tokens", "500",
    "--actual-input-tokens", "1000", "--actual-output-tokens", "120");
  assert.equal(done.code, 0, done.stderr);
  const lines = done.stdout.trim().split("\n");
  assert.equal(lines.length, 1);
  const out = JSON.parse(lines[0]!);
  assert.ok(out.acquire.reservation_id);
  assert.equal(out.acquire.reserved_requests, "1");
  assert.equal(out.acquire.reserved_input_tokens, "1000");
  assert.equal(out.acquire.reserved_output_tokens, "500");
  assert.ok(BigInt(out.acquire.lease_expires_at_ms) > BigInt(out.acquire.granted_at_ms));
  assert.equal(out.acquire.replayed, false);
  const s = out.report.settlement;
  assert.equal(s.reservation_id, out.acquire.reservation_id);
  assert.equal(s.state, "REPORTED");
  assert.equal(s.refunded_output_tokens, String(500 - 120));
  assert.equal(s.refunded_input_tokens, "0");
});

test("exhausted prints the code and retry-after-ms on one line", async () => {
  const args = ["--target", d.target, "--scope", uniqueScope("script"), "--model", "claude-one",
    "--input-tokens", "10", "--max-output-tokens", "10"];
  assert.equal((await client(...args)).code, 0);
  const second = await client(...args);
  assert.equal(second.code, 1);
  assert.equal(second.stdout, "");
  const lines = second.stderr.trim().split("\n");
  assert.equal(lines.length, 1);
  assert.match(lines[0]!, /^error: Acquire failed: RESOURCE_EXHAUSTED: .*\(retry-after-ms=(\d+)\)$/);
  const ms = Number(/retry-after-ms=(\d+)/.exec(lines[0]!)![1]);
  assert.ok(ms > 0 && ms <= 60_000);
});

test("an unreachable daemon names the status", async () => {
  const done = await client("--target", `127.0.0.1:${await freePort()}`, "--scope", "s", "--model", "m",
    "--input-tokens", "1", "--max-output-tokens", "1", "--timeout-ms", "3000");
  assert.equal(done.code, 1);
  assert.match(done.stderr, /^error: Acquire failed: UNAVAILABLE: /);
  assert.equal(done.stderr.trim().split("\n").length, 1);
});

test("a bad flag is a usage error", async () => {
  const done = await client("--scope", "s", "--model", "m", "--input-tokens=-5", "--max-output-tokens", "1");
  assert.equal(done.code, 2);
  assert.equal(done.stderr.split("\n")[0], 'error: --input-tokens must be a non-negative integer, got "-5"');
});
