// Test harness: a real limiterd process (the repo's venv) on a loopback port, and Admin calls
// to look at its ledger. Nothing here fakes the daemon.
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { Admin, ReservationState } from "limiterd-client/proto";
import { Limiter, type LimiterOptions } from "limiterd-client";

// Compiled to clients/node/.test-build/test/: three levels up is clients/node.
export const NODE_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
export const REPO = resolve(NODE_DIR, "../..");
const LIMITERD = process.env.LIMITERD ?? join(REPO, ".venv/bin/limiterd");

export const CONFIG = `
[daemon]
default_lease_ms = 60000
max_lease_ms = 600000
max_wait_ms = 60000
refill_allowance_ms = 0  # exact refill times here; the allowance has its own tests

[models."claude-test"]
requests_per_minute = 1000
input_tokens_per_minute = 1000000
output_tokens_per_minute = 100000

[models."claude-big"]
requests_per_minute = 1000
input_tokens_per_minute = 1000000
output_tokens_per_minute = 100000

[models."claude-small"]
requests_per_minute = 1000
input_tokens_per_minute = 1000000
output_tokens_per_minute = 100000

[models."claude-one"]
requests_per_minute = 1
input_tokens_per_minute = 100000
output_tokens_per_minute = 100000

[models."claude-conc"]
requests_per_minute = 1000
input_tokens_per_minute = 1000000
output_tokens_per_minute = 100000
max_concurrent = 1

[models."claude-tight"]
requests_per_minute = 1000
input_tokens_per_minute = 1000
output_tokens_per_minute = 1000
`;

export async function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => ok(port));
    });
  });
}

/** The port of a "host:port" target (a restarted daemon keeps its address). */
export const portOf = (target: string): number => Number(target.slice(target.lastIndexOf(":") + 1));

export interface Daemon {
  readonly target: string;
  readonly db: string;
  readonly proc: ChildProcess;
  readonly admin: Client<typeof Admin>;
  /** SIGKILL and wait for the exit. */
  kill(): Promise<void>;
  /** SIGTERM and wait for the exit. */
  stop(): Promise<void>;
}

const exited = (p: ChildProcess): Promise<void> =>
  p.exitCode !== null || p.signalCode !== null ? Promise.resolve() : new Promise((ok) => p.once("exit", () => ok()));

/** Start `limiterd serve`; resolves once its health check says SERVING. */
export async function startDaemon(options: {
  config?: string; db?: string; port?: number;
  /** e.g. "unix:/path/to.sock" instead of a loopback port. */
  listen?: string;
  args?: string[];
  /** How the readiness probe connects (TLS options for a TLS daemon). */
  probe?: Partial<LimiterOptions>;
} = {}): Promise<Daemon> {
  if (!existsSync(LIMITERD)) {
    throw new Error(`${LIMITERD} not found: run 'make setup' in the repo first (or set LIMITERD)`);
  }
  const dir = mkdtempSync(join(tmpdir(), "limiterd-node-"));
  const config = join(dir, "limiterd.toml");
  writeFileSync(config, options.config ?? CONFIG);
  const db = options.db ?? join(dir, "journal.sqlite3");
  // Port 0 unless one is asked for (a restart keeps its address): the daemon's start-up line
  // says which port it got. A port picked free beforehand can be taken before the daemon binds.
  const listen = options.listen ?? `127.0.0.1:${options.port ?? 0}`;
  const proc = spawn(LIMITERD, ["serve", "--listen", listen, "--db", db, "--config", config,
    "--watch-config", "0", "--grace", "1", "--log-level", "info", ...(options.args ?? [])], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  const said = new Promise<string>((ok) => {
    proc.stderr!.on("data", (b: Buffer) => {
      stderr += b.toString();
      const found = /limiterd serving on (\S+?)[;( ]/.exec(stderr);
      if (found?.[1]) ok(found[1]);
    });
  });
  const died = exited(proc).then(() => { throw new Error(`limiterd exited before serving:\n${stderr}`); });
  const target = await Promise.race([said, died]);
  const probe = new Limiter({ target, rpcTimeoutMs: 1000, ...(options.probe ?? {}) });
  try {
    await Promise.race([
      probe.waitReady({ timeoutMs: 30_000 }),
      died,
    ]);
  } finally {
    await probe.close();
  }
  // Admin over plaintext TCP only (the TLS and unix-socket tests do not use it).
  const admin = createClient(Admin, createGrpcTransport({
    baseUrl: target.startsWith("unix:") ? "http://127.0.0.1:1" : `http://${target}`,
  }));
  return {
    target, db, proc, admin,
    async kill() { proc.kill("SIGKILL"); await exited(proc); },
    async stop() { proc.kill("SIGTERM"); await exited(proc); },
  };
}

/** A limiter on the daemon with test-friendly defaults, closed by the caller. */
export function limiterFor(d: { target: string }, options: Partial<LimiterOptions> = {}): Limiter {
  return new Limiter({ target: d.target, rpcTimeoutMs: 2000, ...options });
}

/** Open leases of a scope (the daemon's own view). */
export async function openLeases(d: Daemon, scope: string): Promise<number> {
  const resp = await d.admin.listLeases({ scope });
  return resp.leases.length;
}

/** Level of one dimension of the scope x model bucket. */
export async function level(d: Daemon, scope: string, model: string, dim: string): Promise<number> {
  const resp = await d.admin.getBuckets({ scope, model });
  const bucket = resp.buckets.find((b) => b.user === "");
  const found = bucket?.dimensions.find((x) => x.name === dim);
  if (!found) throw new Error(`no ${dim} bucket for ${scope} x ${model}`);
  return found.level;
}

export { ReservationState };

let n = 0;
/** A fresh scope per test, so tests sharing a daemon never see each other's buckets. */
export const uniqueScope = (name: string): string => `${name}-${process.pid}-${++n}`;

/** Poll a condition (never a fixed sleep), failing after 10 s. */
export async function waitFor(cond: () => Promise<boolean> | boolean, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error("condition not met in time");
    await new Promise((ok) => setTimeout(ok, 20));
  }
}

