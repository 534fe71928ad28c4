// Fallback across a chain of models, and the per-call planner shared by every call loop.
import { LimiterBusy, LimiterRejected, ModelOverloadedHint, ProviderError, WaitTooLong, type Usage } from "./errors.js";
import { RetryPolicy } from "./retry.js";

export type Params = Record<string, unknown>;

/** When to leave a model for the next one in the chain (null / false = never). */
export interface FallbackTriggers {
  /** This many overloaded (529) attempts on one model. */
  readonly overloadedAfter: number | null;
  /** A 429 whose Retry-After exceeds this. */
  readonly rateLimitedBeyondMs: number | null;
  /** The limiter could not grant within this budget... */
  readonly limiterWaitMs: number | null;
  /** ...or, at once, the daemon's live estimate already exceeds it (AcquireStream). */
  readonly limiterWaitEstimate: boolean;
  /** The daemon marks the model overloaded: hop before calling. */
  readonly overloadedHint: boolean;
  /** The provider call timed out (408/504/client timeout). */
  readonly timeouts: boolean;
  /** Retries on a model ran out on a retryable error. */
  readonly exhausted: boolean;
  /** The request can never fit this model's limits (it may fit the next one). */
  readonly neverFits: boolean;
}

export const DEFAULT_TRIGGERS: FallbackTriggers = Object.freeze({
  overloadedAfter: 2, rateLimitedBeyondMs: 20_000, limiterWaitMs: 5_000, limiterWaitEstimate: true,
  overloadedHint: false, timeouts: true, exhausted: true, neverFits: true,
});

export type HopReason =
  | "overloaded" | "overloaded_hint" | "rate_limited" | "limiter_wait" | "timeout" | "exhausted" | "never_fits";

/** Given to the `ask` hook: it answers one of `candidates`, or null to stay (veto). */
export interface HopProposal {
  readonly fromModel: string;
  readonly reason: HopReason;
  readonly candidates: readonly string[];
  readonly error: ProviderError | LimiterBusy | LimiterRejected;
}

export type AskHook = (proposal: HopProposal) => string | null | Promise<string | null>;
export type AdjustHook = (params: Params) => Params;

export interface FallbackPolicyOptions {
  /** Ordered, e.g. ["claude-opus-4-1", "claude-sonnet-4-5", "claude-haiku-4-5"]. */
  chain: readonly string[];
  triggers?: Partial<FallbackTriggers>;
  /** "auto" hops to the next model; "ask" lets `ask` pick or veto. */
  mode?: "auto" | "ask";
  ask?: AskHook;
  /** Rewrite the request for a model (e.g. a smaller max_tokens). */
  adjust?: Readonly<Record<string, AdjustHook>>;
}

export class FallbackPolicy {
  readonly chain: readonly string[];
  readonly triggers: FallbackTriggers;
  readonly mode: "auto" | "ask";
  readonly ask: AskHook | undefined;
  readonly adjust: Readonly<Record<string, AdjustHook>>;

  constructor(o: FallbackPolicyOptions) {
    if (!Array.isArray(o.chain) || o.chain.length === 0 || o.chain.some((m) => typeof m !== "string" || !m)) {
      throw new RangeError("chain: needs at least one non-empty model name");
    }
    if (new Set(o.chain).size !== o.chain.length) throw new RangeError("chain: model names must be unique");
    const mode = o.mode ?? (o.ask ? "ask" : "auto");
    if (mode !== "auto" && mode !== "ask") throw new RangeError("mode: must be 'auto' or 'ask'");
    if (mode === "ask" && !o.ask) throw new RangeError("ask: required when mode is 'ask'");
    const unknown = Object.keys(o.adjust ?? {}).filter((m) => !o.chain.includes(m));
    if (unknown.length) throw new RangeError(`adjust: models not in the chain: ${unknown.join(", ")}`);
    this.chain = Object.freeze([...o.chain]);
    this.triggers = Object.freeze({ ...DEFAULT_TRIGGERS, ...(o.triggers ?? {}) });
    this.mode = mode;
    this.ask = o.ask;
    this.adjust = Object.freeze({ ...(o.adjust ?? {}) });
    Object.freeze(this);
  }
}

export interface Hop {
  readonly fromModel: string;
  readonly toModel: string;
  readonly reason: HopReason;
}

/** What served the call: the value, the model, the hops taken to get there. */
export interface CallResult<T> {
  readonly value: T;
  readonly model: string;
  readonly path: readonly Hop[];
  readonly attempts: number;
  readonly usage: Usage;
  readonly fellBack: boolean;
  readonly modelsTried: readonly string[];
}

export interface Decision {
  /** Propose a hop for this reason... */
  readonly hopReason: HopReason | null;
  /** ...else (or if vetoed) retry the same model after this many ms; null = give up. */
  readonly delayMs: number | null;
}

/** State of one logical call across attempts and hops: pure decisions, no I/O. */
export class Planner {
  model: string;
  attempts = 0;
  failures = 0;
  overloaded = 0;
  readonly path: Hop[] = [];
  private readonly start: number;

  constructor(model: string, readonly retry: RetryPolicy, readonly fallback: FallbackPolicy | null) {
    if (fallback && !fallback.chain.includes(model)) {
      throw new RangeError(`model: ${JSON.stringify(model)} is not in the fallback chain ${fallback.chain.join(", ")}`);
    }
    this.model = model;
    this.start = retry.clock();
  }

  elapsedMs(): number {
    return this.retry.clock() - this.start;
  }

  remainingMs(): number {
    return Math.max(0, this.retry.maxElapsedMs - this.elapsedMs());
  }

  candidates(): readonly string[] {
    if (!this.fallback) return [];
    return this.fallback.chain.slice(this.fallback.chain.indexOf(this.model) + 1);
  }

  private canHop(): boolean {
    return this.candidates().length > 0 && this.remainingMs() > 0;
  }

  paramsFor(base: Params): Params {
    let params: Params = { ...base, model: this.model };
    const adjust = this.fallback?.adjust[this.model];
    if (adjust) params = { ...adjust({ ...params }), model: this.model };
    return params;
  }

  /** How long Acquire may wait: the fallback budget while a fallback remains. */
  acquireWaitMs(maxWaitMs: number): number {
    let wait = maxWaitMs;
    const budget = this.fallback?.triggers.limiterWaitMs;
    if (this.candidates().length > 0 && budget !== null && budget !== undefined) wait = Math.min(wait, budget);
    return Math.max(0, Math.min(wait, this.remainingMs()));
  }

  /** When Acquire should give up early: only while a fallback remains. */
  waitGate(): { waitBudgetMs: number | null; overloadedHint: boolean } {
    const t = this.fallback?.triggers;
    if (!t || this.candidates().length === 0) return { waitBudgetMs: null, overloadedHint: false };
    const budget = t.limiterWaitEstimate ? t.limiterWaitMs : null;
    return { waitBudgetMs: budget === null ? null : Math.min(budget, this.remainingMs()), overloadedHint: t.overloadedHint };
  }

  onError(err: ProviderError): Decision {
    this.failures++;
    if (err.overloaded) this.overloaded++;
    const delayMs = this.retry.delay(err, this.failures, this.elapsedMs());
    return { hopReason: this.hopReason(err, delayMs), delayMs };
  }

  private hopReason(err: ProviderError, delayMs: number | null): HopReason | null {
    if (!this.fallback || !this.canHop()) return null;
    const t = this.fallback.triggers;
    if (err.overloaded && t.overloadedAfter !== null && this.overloaded >= t.overloadedAfter) return "overloaded";
    if (err.rateLimited && err.retryable && t.rateLimitedBeyondMs !== null && err.retryAfterMs !== null &&
        err.retryAfterMs > t.rateLimitedBeyondMs) return "rate_limited";
    if (err.timeout && t.timeouts) return "timeout";
    if (delayMs === null && err.retryable && t.exhausted) return "exhausted";
    return null;
  }

  onBusy(err: LimiterBusy): Decision {
    this.failures++;
    let hopReason: HopReason | null = null;
    if (this.fallback && this.canHop()) {
      if (err instanceof ModelOverloadedHint) hopReason = "overloaded_hint";
      else if (err instanceof WaitTooLong || this.fallback.triggers.limiterWaitMs !== null) hopReason = "limiter_wait";
    }
    const delayMs = this.failures < this.retry.maxAttempts
      ? this.retry.waitWithin(err.retryAfterMs, this.failures, this.elapsedMs())
      : null;
    return { hopReason, delayMs };
  }

  /** A request too big for this model's limits: only another model can serve it. */
  onRejected(): Decision {
    const ok = this.fallback?.triggers.neverFits && this.canHop();
    return { hopReason: ok ? "never_fits" : null, delayMs: null };
  }

  proposal(reason: HopReason, error: HopProposal["error"]): HopProposal {
    return { fromModel: this.model, reason, candidates: this.candidates(), error };
  }

  /** Auto mode takes the next model; ask mode asks the app, which may pick or veto. */
  async choose(reason: HopReason, error: HopProposal["error"]): Promise<string | null> {
    const p = this.proposal(reason, error);
    if (!this.fallback) return null;
    if (this.fallback.mode === "auto") return p.candidates[0] ?? null;
    const answer = await this.fallback.ask!(p);
    if (answer !== null && !p.candidates.includes(answer)) {
      throw new RangeError(`ask: returned ${JSON.stringify(answer)}, not one of ${p.candidates.join(", ")}`);
    }
    return answer;
  }

  hop(toModel: string, reason: HopReason): void {
    this.path.push({ fromModel: this.model, toModel, reason });
    this.model = toModel;
    this.failures = 0;
    this.overloaded = 0;
  }

  result<T>(value: T, usage: Usage): CallResult<T> {
    const path = [...this.path];
    return {
      value, model: this.model, path, attempts: this.attempts, usage, fellBack: path.length > 0,
      modelsTried: path.length ? [path[0]!.fromModel, ...path.map((h) => h.toModel)] : [this.model],
    };
  }
}
