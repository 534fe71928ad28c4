// The limiter: reserve before a provider call, report (or release) after, and never leak.
import { randomUUID } from "node:crypto";
import type { Interceptor } from "@connectrpc/connect";
import { setTimeout as delay } from "node:timers/promises";
import {
  DaemonApi, isTransient, mapError, type AcquireArgs, type DaemonGrant, type Outcome,
  type Settlement,
} from "./daemon.js";
import {
  LimiterBusy, LimiterError, LimiterInvalidArgument, LimiterRejected, LimiterUnavailable,
  LocalCapacityRejected, ProviderError, metaOf, type ProviderMeta, type Usage,
} from "./errors.js";
import { failClosed, LocalBucket, type UnavailablePolicy } from "./local.js";
import { Outbox } from "./outbox.js";
import { openChannel, parseTarget, type Channel, type TlsOptions } from "./transport.js";
import { WaitGate, type WaitCallback, type WaitUpdate } from "./wait.js";

export type { Outcome, Settlement } from "./daemon.js";

export type Sleep = (ms: number, signal?: AbortSignal) => Promise<void>;
export interface Logger { warn(message: string): void }

export interface LimiterOptions {
  /** "host:port" or "unix:/path/to.sock". */
  target: string;
  /** true for TLS with the system's roots, or the CA / client certificate to use. */
  tls?: boolean | TlsOptions;
  /** Connect interceptors around every RPC (metadata, tracing, logging). */
  interceptors?: Interceptor[];
  /** While the daemon cannot be reached: failClosed() (default), failOpen(), safeCapacity(). */
  onUnavailable?: UnavailablePolicy;
  /** Lease asked for each reservation; 0 = the daemon's default. */
  leaseMs?: number;
  /** Deadline of one RPC, on top of any wait. */
  rpcTimeoutMs?: number;
  /** Attempts per RPC on UNAVAILABLE / DEADLINE_EXCEEDED, with the same request. */
  transportAttempts?: number;
  transportBackoffMs?: number;
  /** Extend the lease of a call that outlives `keepaliveFraction` of it. */
  keepalive?: boolean;
  keepaliveFraction?: number;
  /** Reports (and releases) still undelivered when this many more arrive: the oldest is dropped. */
  maxPendingSettlements?: number;
  /** Monotonic milliseconds; injected by tests. */
  clock?: () => number;
  sleep?: Sleep;
  logger?: Logger;
}

/** What the client did on its own, visible to the app. */
export interface Counters {
  acquireRetries: number;
  streamReattaches: number;
  failOpen: number;
  localGrants: number;
  fallbacks: number;
  settleFailures: number;
  /** Reports/releases the daemon did not take at once, retried in the background. */
  settlementsDeferred: number;
  settlementsDelivered: number;
  /** Given up: the lease had ended (the daemon settled it as consumed) or the queue was full. */
  settlementsDropped: number;
  /** MarkSent calls sent (a grant held a refill until the send). */
  marksSent: number;
}

export interface ReserveRequest {
  scope: string;
  model: string;
  inputTokens: number;
  maxOutputTokens: number;
  /** How long the daemon may queue the call; 0 = try once. */
  maxWaitMs?: number;
  user?: string;
  leaseMs?: number;
  /** Live wait status: the Acquire runs as AcquireStream and this hears every Queued event. */
  onWait?: WaitCallback;
  /** Give up as soon as the daemon's estimate exceeds what is left of this budget. */
  waitBudgetMs?: number | null;
  /** Give up when the daemon marks the model overloaded. */
  overloadedHint?: boolean;
  /** Abort the wait; the place in the queue (and any grant made meanwhile) is given back. */
  signal?: AbortSignal;
  /**
   * A promise to call `markCalled()` just before sending the provider request: a burst from a
   * full bucket then refills from that moment (the provider's), not from a guess. Without the
   * mark the daemon's hold lasts until the report.
   */
  marksSent?: boolean;
}

export interface ReportArgs {
  inputTokens: number;
  outputTokens: number;
  outcome?: Outcome;
  retryAfterMs?: number;
  provider?: ProviderMeta | null;
}

export type GrantMode = "daemon" | "local" | "open";

export interface Grant {
  readonly reservationId: string;
  readonly requestId: string;
  readonly mode: GrantMode;
  readonly leaseExpiresAtMs: number;
  /** How long a lease lasts, learnt at grant time (0 = unknown). */
  readonly leaseMs: number;
  readonly replayed: boolean;
  readonly waitedMs: number;
  readonly modelOverloaded: boolean;
  readonly inputTokens: number;
  readonly outputTokens: number;
  /** The daemon holds a bucket's refill until this call is sent: markCalled() tells it. */
  readonly markSentWanted: boolean;
}

const sleepReal: Sleep = async (ms, signal) => {
  await delay(Math.max(0, ms), undefined, signal ? { signal } : {});
};

function checkCount(name: string, v: number): void {
  if (!Number.isSafeInteger(v) || v < 0) {
    throw new LimiterInvalidArgument(`${name}: must be a non-negative integer, got ${v}`);
  }
}

/** Client of one limiterd. */
export class Limiter {
  readonly target: string;
  readonly onUnavailable: UnavailablePolicy;
  readonly leaseMs: number;
  readonly rpcTimeoutMs: number;
  readonly transportAttempts: number;
  readonly transportBackoffMs: number;
  readonly keepalive: boolean;
  readonly keepaliveFraction: number;
  readonly clock: () => number;
  readonly sleep: Sleep;
  readonly logger: Logger;
  readonly counters: Counters = {
    acquireRetries: 0, streamReattaches: 0, failOpen: 0, localGrants: 0, fallbacks: 0,
    settleFailures: 0, settlementsDeferred: 0, settlementsDelivered: 0, settlementsDropped: 0,
    marksSent: 0,
  };
  /** @internal */ readonly api: DaemonApi;
  private readonly channel: Channel;
  private readonly local = new Map<string, LocalBucket>();
  private readonly outbox: Outbox;
  private lastWarnAt = -Infinity;
  private quietWarnings = 0;
  private closed = false;

  constructor(options: LimiterOptions) {
    const target = parseTarget(options.target);
    const o = options;
    this.target = options.target;
    this.onUnavailable = o.onUnavailable ?? failClosed();
    this.leaseMs = o.leaseMs ?? 0;
    this.rpcTimeoutMs = o.rpcTimeoutMs ?? 5_000;
    this.transportAttempts = o.transportAttempts ?? 3;
    this.transportBackoffMs = o.transportBackoffMs ?? 50;
    this.keepalive = o.keepalive ?? true;
    this.keepaliveFraction = o.keepaliveFraction ?? 0.5;
    this.clock = o.clock ?? (() => performance.now());
    this.sleep = o.sleep ?? sleepReal;
    this.logger = o.logger ?? { warn: (m) => process.emitWarning(m, "LimiterWarning") };
    checkCount("leaseMs", this.leaseMs);
    if (!(this.keepaliveFraction > 0 && this.keepaliveFraction < 1)) {
      throw new LimiterInvalidArgument("keepaliveFraction: must be in (0, 1)");
    }
    if (!Number.isInteger(this.transportAttempts) || this.transportAttempts < 1) {
      throw new LimiterInvalidArgument("transportAttempts: must be an integer >= 1");
    }
    this.channel = openChannel(target, o.tls, o.interceptors ?? []);
    this.api = new DaemonApi(this.channel);
    this.outbox = new Outbox(this, o.maxPendingSettlements ?? 10_000);
  }

  /** Resolve once the daemon answers its health check as SERVING; throw LimiterUnavailable
   * (with the last error) when `timeoutMs` passes first. For start-up ordering. */
  async waitReady(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    const timeoutMs = options.timeoutMs ?? 30_000;
    const start = this.clock();
    let last = "no answer";
    for (let attempt = 0; ; attempt++) {
      const left = timeoutMs - (this.clock() - start);
      if (left <= 0) break;
      try {
        if (await this.api.serving(Math.max(1, Math.min(left, this.rpcTimeoutMs)))) return;
        last = "the daemon is NOT_SERVING";
      } catch (e) {
        last = mapError(e).message;
      }
      options.signal?.throwIfAborted();
      await this.sleep(Math.min(50 * 2 ** Math.min(attempt, 4), Math.max(0, timeoutMs - (this.clock() - start))),
        options.signal);
    }
    throw new LimiterUnavailable(`limiterd at ${this.target} not ready after ${timeoutMs} ms: ${last}`);
  }

  /**
   * Reserve capacity for one provider call. Settle it with `report()` / `release()`, or use
   * `withReservation()` (or `await using`) so that it is settled on every path.
   */
  async reserve(req: ReserveRequest): Promise<Reservation> {
    if (this.closed) throw new LimiterError("reserve: the limiter is closed");
    if (typeof req.scope !== "string" || req.scope === "") throw new LimiterInvalidArgument("scope: must be non-empty");
    if (typeof req.model !== "string" || req.model === "") throw new LimiterInvalidArgument("model: must be non-empty");
    checkCount("inputTokens", req.inputTokens);
    checkCount("maxOutputTokens", req.maxOutputTokens);
    checkCount("maxWaitMs", Math.round(req.maxWaitMs ?? 0));
    const r = new Reservation(this, req);
    r.grant = await this.acquire(r);
    r.leaseExpiresAtMs = r.grant.leaseExpiresAtMs;
    if (r.grant.mode === "daemon" && this.keepalive) r.startKeepalive();
    return r;
  }

  /**
   * Reserve, run `fn`, settle: an error before `r.markCalled()` releases, after it reports
   * ERROR (or the ProviderError's outcome) with the best-known usage; a normal return without
   * a report reports the usage recorded (or what was reserved) as OK.
   */
  async withReservation<T>(req: ReserveRequest, fn: (r: Reservation) => Promise<T>): Promise<T> {
    const r = await this.reserve(req);
    let result: T;
    try {
      result = await fn(r);
    } catch (e) {
      await r.settle(e, true);
      throw e;
    }
    await r.settle(undefined, false);
    return result;
  }

  /** Deliver what is pending, then close the connection. */
  async close(options: { flushTimeoutMs?: number } = {}): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.outbox.flush(options.flushTimeoutMs ?? 10_000);
    this.outbox.stop(); // nothing keeps retrying on a closed channel
    this.channel.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** Settlements waiting for the daemon. */
  get pendingSettlements(): number {
    return this.outbox.size;
  }

  /** Resolve when nothing is pending (or after `timeoutMs`); true when all were delivered. */
  flush(timeoutMs = 10_000): Promise<boolean> {
    return this.outbox.flush(timeoutMs);
  }

  /** One RPC with transport retries: the same request, so idempotent on the daemon. */
  async call<T>(what: string, rpc: () => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await rpc();
      } catch (e) {
        if (isTransient(e) && attempt < this.transportAttempts) {
          if (what === "Acquire") this.counters.acquireRetries++;
          await this.sleep(this.transportBackoffMs * 2 ** (attempt - 1));
          continue;
        }
        throw mapError(e);
      }
    }
  }

  /** A warning at most every 5 s, with how many were held back. */
  warn(message: string): void {
    const now = this.clock();
    if (now - this.lastWarnAt < 5_000) {
      this.quietWarnings++;
      return;
    }
    const more = this.quietWarnings ? ` (${this.quietWarnings} similar since the last warning)` : "";
    this.lastWarnAt = now;
    this.quietWarnings = 0;
    this.logger.warn(`limiterd-client: ${message}${more}`);
  }

  /** @internal MarkSent, fire and forget: a lost mark only ends the daemon's hold at the report. */
  markSent(reservationId: string): void {
    this.counters.marksSent++;
    this.api.markSent(reservationId, this.rpcTimeoutMs).catch(() => undefined); // nobody waits
  }

  /** @internal */
  deferSettlement(kind: "report" | "release", r: Reservation, rpc: () => Promise<Settlement>): void {
    this.counters.settlementsDeferred++;
    this.outbox.add({ kind, reservationId: r.reservationId, deadlineMs: r.leaseExpiresAtMs, rpc });
  }

  private args(r: Reservation, maxWaitMs: number): AcquireArgs {
    return {
      scope: r.scope, model: r.model, user: r.user, inputTokens: r.inputTokens,
      maxOutputTokens: r.maxOutputTokens, maxWaitMs: Math.round(maxWaitMs), leaseMs: r.leaseMs,
      requestId: r.requestId, marksSent: r.marksSent,
    };
  }

  private async acquire(r: Reservation): Promise<Grant> {
    try {
      const g = r.streams
        ? await this.acquireStream(r)
        : await this.call("Acquire", () => this.api.acquire(this.args(r, r.maxWaitMs), r.maxWaitMs + this.rpcTimeoutMs));
      return daemonGrant(r.requestId, g);
    } catch (e) {
      if (e instanceof LimiterUnavailable) return this.unavailable(r, e);
      throw e;
    }
  }

  /** AcquireStream with re-attach: a broken stream is called again with the same request id
   * and what is left of the wait, so the daemon keeps the caller's place. */
  private async acquireStream(r: Reservation): Promise<DaemonGrant> {
    const start = this.clock();
    for (let attempt = 1; ; attempt++) {
      const left = Math.max(0, r.maxWaitMs - (this.clock() - start));
      const abort = new AbortController();
      const onAbort = (): void => abort.abort(r.signal?.reason);
      r.signal?.addEventListener("abort", onAbort, { once: true });
      try {
        r.signal?.throwIfAborted();
        for await (const ev of this.api.acquireStream(this.args(r, left), left + this.rpcTimeoutMs, abort.signal)) {
          if ("granted" in ev) {
            const stop = r.gate.checkGrant(ev.granted.modelOverloaded);
            if (stop) {
              await this.releaseQuietly(ev.granted.reservationId);
              throw stop;
            }
            return ev.granted;
          }
          r.updates.push(ev.queued);
          if (r.onWait) await r.onWait(ev.queued); // heard even when it ends the wait
          const stop = r.gate.check(ev.queued, this.clock() - start);
          if (stop) throw stop;
        }
        throw new LimiterUnavailable("limiter unavailable: the wait stream ended early");
      } catch (e) {
        const stopped = e instanceof LimiterError || r.signal?.aborted || !isConnectError(e);
        if (!stopped && isTransient(e) && attempt < this.transportAttempts &&
            (this.clock() - start < r.maxWaitMs || attempt === 1)) {
          this.counters.streamReattaches++;
          await this.sleep(this.transportBackoffMs * 2 ** (attempt - 1));
          continue;
        }
        abort.abort();
        // Queued once, or gave up on purpose: leave no place (or grant) behind.
        if (r.updates.length > 0 || stopped) await this.abandon(r);
        if (r.signal?.aborted) throw r.signal.reason;
        throw isConnectError(e) ? mapError(e) : e;
      } finally {
        r.signal?.removeEventListener("abort", onAbort);
      }
    }
  }

  /** Make the daemon drop a place kept for this request id (re-attach with max_wait 0) and
   * release a grant made meanwhile; without this it would stay open until its lease ends. */
  private async abandon(r: Reservation): Promise<void> {
    let g: DaemonGrant;
    try {
      g = await this.call("Acquire", () => this.api.acquire(this.args(r, 0), this.rpcTimeoutMs));
    } catch (e) {
      if (e instanceof LimiterBusy || e instanceof LimiterRejected) return; // nothing held
      this.counters.settleFailures++;
      this.warn(`could not abandon wait ${r.requestId}: ${(e as Error).message}`);
      return;
    }
    await this.releaseQuietly(g.reservationId);
  }

  private async releaseQuietly(reservationId: string): Promise<void> {
    try {
      await this.call("Release", () => this.api.release(reservationId, this.rpcTimeoutMs));
    } catch (e) {
      this.counters.settleFailures++;
      this.warn(`could not release ${reservationId}: ${(e as Error).message}`);
    }
  }

  private async unavailable(r: Reservation, err: LimiterUnavailable): Promise<Grant> {
    const policy = this.onUnavailable;
    if (policy.kind === "fail-open") {
      this.counters.failOpen++;
      this.warn(`limiterd unreachable, failing open (${err.message})`);
      return localGrant(r, "open");
    }
    if (policy.kind === "safe-capacity") {
      let bucket = this.local.get(r.model);
      if (!bucket) this.local.set(r.model, bucket = new LocalBucket(policy, this.clock));
      const deadline = this.clock() + (r.maxWaitMs ?? 0);
      const tokens = r.inputTokens + r.maxOutputTokens;
      for (;;) {
        const wait = bucket.tryTake(tokens);
        if (wait === 0) {
          this.counters.localGrants++;
          this.warn(`limiterd unreachable, granting from the local safe capacity (${err.message})`);
          return localGrant(r, "local");
        }
        if (wait === Infinity) {
          throw new LocalCapacityRejected(`request of ${tokens} tokens exceeds the local safe capacity ` +
            `(${policy.tokensPerMinute} tokens/min) while limiterd is down`, { cause: err });
        }
        if (this.clock() + wait > deadline) {
          throw new LimiterBusy("local safe capacity exhausted while limiterd is down", Math.ceil(wait));
        }
        await this.sleep(wait, r.signal);
        // Back to the daemon as soon as it answers again.
        try {
          return daemonGrant(r.requestId, await this.api.acquire(this.args(r, Math.max(0, deadline - this.clock())),
            this.rpcTimeoutMs + Math.max(0, deadline - this.clock())));
        } catch (e) {
          if (!isTransient(e)) throw mapError(e);
        }
      }
    }
    throw err;
  }

  /** @internal */
  giveBackLocal(r: Reservation, used: number): void {
    if (r.grant?.mode === "local") this.local.get(r.model)?.giveBack(r.inputTokens + r.maxOutputTokens - used);
  }
}

function isConnectError(e: unknown): boolean {
  return e instanceof Error && e.name === "ConnectError";
}

function daemonGrant(requestId: string, g: DaemonGrant): Grant {
  return {
    reservationId: g.reservationId, requestId, mode: "daemon",
    leaseExpiresAtMs: g.leaseExpiresAtMs, leaseMs: Math.max(0, g.leaseExpiresAtMs - g.grantedAtMs),
    replayed: g.replayed, waitedMs: g.waitedMs, modelOverloaded: g.modelOverloaded,
    inputTokens: g.reservedInputTokens, outputTokens: g.reservedOutputTokens,
    markSentWanted: g.markSentWanted,
  };
}

function localGrant(r: Reservation, mode: GrantMode): Grant {
  return {
    reservationId: "", requestId: r.requestId, mode, leaseExpiresAtMs: 0, leaseMs: 0,
    replayed: false, waitedMs: 0, modelOverloaded: false, inputTokens: r.inputTokens,
    outputTokens: r.maxOutputTokens, markSentWanted: false,
  };
}

/** The outcome an error stands for when it ends a call that was made. */
export function outcomeFor(err: unknown): Outcome {
  if (err instanceof ProviderError) {
    return err.rateLimited ? "RATE_LIMITED" : err.overloaded ? "OVERLOADED" : "ERROR";
  }
  if (err instanceof Error && (err.name === "AbortError" || err.name === "APIUserAbortError")) {
    return "CANCELLED";
  }
  return "ERROR";
}

/**
 * One reservation. Call `markCalled()` when the provider call starts, then `report()`. Left
 * unsettled, `settle(error)` (done for you by withReservation / `await using`) releases when
 * the call never started and reports otherwise.
 */
export class Reservation {
  readonly scope: string;
  readonly model: string;
  readonly user: string;
  readonly inputTokens: number;
  readonly maxOutputTokens: number;
  readonly maxWaitMs: number;
  readonly leaseMs: number;
  readonly requestId = randomUUID().replaceAll("-", "");
  readonly onWait: WaitCallback | undefined;
  readonly gate: WaitGate;
  readonly signal: AbortSignal | undefined;
  readonly marksSent: boolean;
  /** Every wait update heard, in order. */
  readonly updates: WaitUpdate[] = [];
  grant: Grant | null = null;
  /** What the daemon answered to the Report or Release (null: not yet, local, or deferred). */
  settlement: Settlement | null = null;
  leaseExpiresAtMs = 0;
  keepalives = 0;
  private called = false;
  private settledFlag = false;
  private usage: Usage | null = null;
  private kaTimer: NodeJS.Timeout | null = null;

  constructor(private readonly limiter: Limiter, req: ReserveRequest) {
    this.scope = req.scope;
    this.model = req.model;
    this.user = req.user ?? "";
    this.inputTokens = req.inputTokens;
    this.maxOutputTokens = req.maxOutputTokens;
    this.maxWaitMs = req.maxWaitMs ?? 0;
    this.leaseMs = req.leaseMs ?? limiter.leaseMs;
    this.onWait = req.onWait;
    this.gate = new WaitGate(req.waitBudgetMs ?? null, req.overloadedHint ?? false);
    this.signal = req.signal;
    this.marksSent = req.marksSent ?? false;
  }

  /** Acquire runs as AcquireStream: live status or an early give-up was asked for. */
  get streams(): boolean {
    return this.onWait !== undefined || this.gate.budgetMs !== null || this.gate.overloadedHint;
  }

  get reservationId(): string {
    return this.grant?.reservationId ?? "";
  }

  get mode(): GrantMode | "" {
    return this.grant?.mode ?? "";
  }

  get settled(): boolean {
    return this.settledFlag;
  }

  /**
   * The provider call starts now: from now on an error reports, not releases. When the grant
   * asks for it (`marksSent: true`), the daemon is told at once (MarkSent, not waited for).
   */
  markCalled(): void {
    const first = !this.called;
    this.called = true;
    if (first && this.grant?.markSentWanted) this.limiter.markSent(this.grant.reservationId);
  }

  get wasCalled(): boolean {
    return this.called;
  }

  /** Best-known usage so far, reported if the reservation is settled without a report. */
  recordUsage(usage: Usage): void {
    this.usage = usage;
  }

  get recordedUsage(): Usage | null {
    return this.usage;
  }

  /**
   * Settle with what the provider used. Resolves to the daemon's settlement; null when the
   * grant was local, or when the daemon was away: then the Report is retried in the
   * background until it lands or the lease is over, so the caller keeps its answer.
   */
  async report(a: ReportArgs): Promise<Settlement | null> {
    checkCount("inputTokens", a.inputTokens);
    checkCount("outputTokens", a.outputTokens);
    this.beginSettle("report");
    if (this.grant!.mode !== "daemon") {
      this.limiter.giveBackLocal(this, a.inputTokens + a.outputTokens);
      return null;
    }
    const args = {
      reservationId: this.reservationId, inputTokens: a.inputTokens, outputTokens: a.outputTokens,
      outcome: a.outcome ?? "OK", retryAfterMs: Math.round(a.retryAfterMs ?? 0),
      provider: a.provider ?? null,
    } as const;
    const rpc = (): Promise<Settlement> => this.limiter.api.report(args, this.limiter.rpcTimeoutMs);
    return this.deliver("report", rpc);
  }

  /** Report a failed attempt with the provider's details, so the daemon can pause the others.
   * A refused attempt (429, 529, a connection never made) used nothing and is reported so. */
  async reportError(err: ProviderError, options: { fellBack?: boolean } = {}): Promise<Settlement | null> {
    const used = err.usage ?? this.usage ?? { inputTokens: 0, outputTokens: 0 };
    return this.report({
      inputTokens: used.inputTokens, outputTokens: used.outputTokens, outcome: outcomeFor(err),
      retryAfterMs: err.retryAfterMs ?? 0, provider: metaOf(err, options.fellBack ?? false),
    });
  }

  /** The provider call never happened: refund everything. */
  async release(): Promise<Settlement | null> {
    this.beginSettle("release");
    if (this.grant!.mode !== "daemon") {
      this.limiter.giveBackLocal(this, 0);
      return null;
    }
    const id = this.reservationId;
    return this.deliver("release", () => this.limiter.api.release(id, this.limiter.rpcTimeoutMs));
  }

  /**
   * The exit rule for a reservation left open: `failed` with `error` before markCalled()
   * -> release; after it -> report (the error's outcome, the best-known usage); no error ->
   * report the recorded usage, else what was reserved, as OK. Never throws: a failure to
   * settle is counted and logged, the lease still ends and settles as consumed.
   */
  async settle(error: unknown, failed = error !== undefined): Promise<void> {
    if (this.settledFlag || this.grant === null) return;
    try {
      if (failed && !this.called) {
        await this.release();
      } else if (failed && error instanceof ProviderError) {
        await this.reportError(error);
      } else {
        const used = this.usage ?? { inputTokens: this.grant.inputTokens, outputTokens: this.grant.outputTokens };
        await this.report({ ...used, outcome: failed ? outcomeFor(error) : "OK" });
      }
    } catch (e) {
      this.limiter.counters.settleFailures++;
      this.limiter.warn(`could not settle ${this.reservationId}: ${(e as Error).message}`);
    }
  }

  /** For `await using r = await limiter.reserve(...)`: settles what was left open, with the
   * usage recorded so far (a disposer cannot see an exception: prefer withReservation). */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.settle(undefined, !this.called);
  }

  private beginSettle(what: string): void {
    if (this.grant === null) throw new LimiterError(`${what}: the reservation was not acquired`);
    if (this.settledFlag) throw new LimiterError(`${what}: reservation ${this.reservationId} already settled`);
    this.settledFlag = true;
    this.stopKeepalive();
  }

  private async deliver(kind: "report" | "release", rpc: () => Promise<Settlement>): Promise<Settlement | null> {
    try {
      this.settlement = await this.limiter.call(kind === "report" ? "Report" : "Release", rpc);
      return this.settlement;
    } catch (e) {
      if (!(e instanceof LimiterUnavailable)) throw e;
      // Report and Release are idempotent on the daemon: deliver later, keep the answer now.
      this.limiter.deferSettlement(kind, this, rpc);
      return null;
    }
  }

  /** @internal */
  startKeepalive(): void {
    const leaseMs = this.leaseMs || this.grant?.leaseMs || 0;
    if (leaseMs <= 0) return;
    const interval = leaseMs * this.limiter.keepaliveFraction;
    const tick = async (): Promise<void> => {
      let next = interval;
      try {
        this.leaseExpiresAtMs = await this.limiter.call("KeepAlive",
          () => this.limiter.api.keepAlive(this.reservationId, this.leaseMs, this.limiter.rpcTimeoutMs));
        this.keepalives++;
      } catch (e) { // keep trying: the lease may still be saved
        this.limiter.warn(`keepalive of ${this.reservationId} failed: ${(e as Error).message}`);
        next = Math.max(interval / 4, 10);
      }
      if (this.kaTimer !== null) this.kaTimer = setTimeout(() => void tick(), next).unref();
    };
    this.kaTimer = setTimeout(() => void tick(), interval).unref();
  }

  private stopKeepalive(): void {
    if (this.kaTimer !== null) clearTimeout(this.kaTimer);
    this.kaTimer = null;
  }
}
