// One logical provider call: reserve, call, report, retry or fall back, until done. One
// attempt loop serves plain calls, streams and the fetch wrapper, so their rules cannot drift.
import {
  LimiterBusy, LimiterRejected, LocalCapacityRejected, PartialResponseError, ProviderError, type ProviderMeta, type Usage,
} from "./errors.js";
import { FallbackPolicy, Planner, type CallResult, type Decision, type HopReason, type Params } from "./fallback.js";
import type { Limiter, Reservation } from "./limiter.js";
import { RetryPolicy } from "./retry.js";
import type { WaitCallback } from "./wait.js";

/** A successful provider answer with its usage and what the provider said. */
export interface Attempt<T> {
  readonly value: T;
  readonly usage: Usage;
  readonly meta: ProviderMeta;
  /** The attempt took the reservation over (a stream still being read) and settles it. */
  readonly owned?: boolean;
}

export type Estimate = (params: Params) => number | Promise<number>;

/** What the app may hear about a call as it goes (log it, or show it to a user). */
export type CallEvent =
  | { readonly type: "retry"; readonly model: string; readonly delayMs: number; readonly error: Error }
  | { readonly type: "fallback"; readonly fromModel: string; readonly toModel: string; readonly reason: HopReason }
  | { readonly type: "give_up"; readonly model: string; readonly error: Error };

export interface CallOptions {
  scope: string;
  /** The provider request; needs `model` and `max_tokens`. */
  params: Params;
  /** Input tokens to reserve for a request (default: characters / 3.5). */
  estimate?: Estimate;
  retry?: RetryPolicy;
  fallback?: FallbackPolicy | null;
  user?: string;
  /** How long one Acquire may queue (default: the retry policy's deadline). */
  maxWaitMs?: number;
  onWait?: WaitCallback;
  onEvent?: (event: CallEvent) => void;
  signal?: AbortSignal;
}

const CHARS_PER_TOKEN = 3.5;

/** Cheap input estimate: length of the JSON of system + messages + tools / 3.5, rounded up. */
export function estimateChars(params: Params): number {
  const text = ["system", "messages", "tools"].map((k) => params[k]).filter((v) => v !== undefined && v !== null)
    .map((v) => JSON.stringify(v)).join("");
  return Math.ceil(text.length / CHARS_PER_TOKEN);
}

export function maxTokens(params: Params): number {
  const v = params["max_tokens"];
  if (!Number.isSafeInteger(v) || (v as number) < 0) {
    throw new RangeError("max_tokens: must be a non-negative integer");
  }
  return v as number;
}

/** Settle without ever costing the caller its answer (or its real error): a daemon that
 * refuses the Report (it lost the lease, say) is counted and logged; the lease settles alone. */
async function quietly(limiter: Limiter, r: Reservation, settle: () => Promise<unknown>): Promise<void> {
  try {
    await settle();
  } catch (e) {
    limiter.counters.settleFailures++;
    limiter.warn(`could not settle ${r.reservationId}: ${(e as Error).message}`);
  }
}

type Body<T> = (params: Params, r: Reservation) => AsyncGenerator<string, Attempt<T>>;

const cancelled = (): Error => new DOMException("the caller stopped reading", "AbortError");

/**
 * The attempt loop. Each attempt reserves on its own model and reports its own outcome (a
 * refused attempt reports nothing used); before any text reached the caller a failure is
 * retried or falls back, after it a failure reports what was used and throws
 * PartialResponseError.
 */
export async function* attemptLoop<T>(limiter: Limiter, o: CallOptions, body: Body<T>): AsyncGenerator<string, CallResult<T>> {
  const retry = o.retry ?? RetryPolicy.interactive();
  const model = o.params["model"];
  if (typeof model !== "string" || !model) throw new RangeError("model: required");
  const planner = new Planner(model, retry, o.fallback ?? null);
  const estimate = o.estimate ?? estimateChars;
  for (;;) {
    const p = planner.paramsFor(o.params);
    const inputTokens = Math.ceil(await estimate(p));
    const gate = planner.waitGate();
    planner.attempts++;
    let err: Error;
    let decision: Decision;
    let next: string | null = null;
    try {
      const r = await limiter.reserve({
        scope: o.scope, model: planner.model, inputTokens, maxOutputTokens: maxTokens(p),
        maxWaitMs: planner.acquireWaitMs(o.maxWaitMs ?? retry.maxElapsedMs), user: o.user ?? "",
        ...(o.onWait ? { onWait: o.onWait } : {}), ...(o.signal ? { signal: o.signal } : {}),
        waitBudgetMs: gate.waitBudgetMs, overloadedHint: gate.overloadedHint,
        marksSent: true, // markCalled() below, just before body() sends
      });
      r.markCalled();
      let delivered = "";
      let finished = false;
      const gen = body(p, r);
      try {
        let step = await gen.next();
        while (!step.done) {
          delivered += step.value;
          yield step.value;
          step = await gen.next();
        }
        const done = step.value;
        finished = true;
        if (!done.owned) {
          await quietly(limiter, r, () => r.report({
            inputTokens: done.usage.inputTokens, outputTokens: done.usage.outputTokens, provider: done.meta,
          }));
        }
        return planner.result(done.value, done.usage);
      } catch (e) {
        finished = true;
        if (!(e instanceof ProviderError)) {
          await r.settle(e, true);
          throw e;
        }
        if (delivered) {
          const used = e.usage ?? r.recordedUsage ?? { inputTokens, outputTokens: Math.ceil(delivered.length / CHARS_PER_TOKEN) };
          e.usage = used;
          await quietly(limiter, r, () => r.reportError(e));
          throw new PartialResponseError(delivered, used, e);
        }
        err = e;
        decision = planner.onError(e);
        if (decision.hopReason) next = await planner.choose(decision.hopReason, e);
        await quietly(limiter, r, () => r.reportError(e, { fellBack: next !== null }));
      } finally {
        if (!finished) { // the consumer stopped reading: close the provider stream, settle
          await gen.return(undefined as never).catch(() => undefined);
          await r.settle(cancelled(), true);
        }
      }
    } catch (e) {
      if (e instanceof LimiterBusy) {
        err = e;
        decision = planner.onBusy(e);
      } else if (e instanceof LimiterRejected && !(e instanceof LocalCapacityRejected)) {
        err = e;
        decision = planner.onRejected();
      } else {
        throw e;
      }
      if (decision.hopReason) next = await planner.choose(decision.hopReason, e);
    }
    if (next !== null) {
      o.onEvent?.({ type: "fallback", fromModel: planner.model, toModel: next, reason: decision.hopReason! });
      planner.hop(next, decision.hopReason!);
      limiter.counters.fallbacks++;
    } else if (decision.delayMs !== null && !(err instanceof LimiterRejected)) {
      o.onEvent?.({ type: "retry", model: planner.model, delayMs: decision.delayMs, error: err });
      await retry.sleep(decision.delayMs);
    } else {
      o.onEvent?.({ type: "give_up", model: planner.model, error: err });
      if (err instanceof LimiterRejected && planner.path.length > 0) {
        throw new LimiterRejected(`${err.message} (models tried: ${planner.result(null, { inputTokens: 0, outputTokens: 0 }).modelsTried.join(", ")})`, { cause: err });
      }
      throw err;
    }
  }
}

/** A plain call: `attempt` makes one provider call and throws ProviderError on failure. */
export async function runCall<T>(limiter: Limiter, o: CallOptions,
  attempt: (params: Params, r: Reservation) => Promise<Attempt<T>>): Promise<CallResult<T>> {
  // eslint-disable-next-line require-yield
  const loop = attemptLoop(limiter, o, async function* (p, r) { return await attempt(p, r); });
  for (;;) {
    const step = await loop.next();
    if (step.done) return step.value;
  }
}

/** One open provider stream. `texts()` throws ProviderError on failure. */
export interface StreamHandle<T> {
  texts(): AsyncIterable<string>;
  /** Best known so far (estimated for a cut-off stream). */
  usage(): Usage;
  meta(): ProviderMeta;
  final(): Promise<T>;
  close(): Promise<void>;
}

/** `for await (const text of streamCall(...))` yields text; `.result` holds the CallResult after. */
export class StreamCall<T> implements AsyncIterable<string> {
  result: CallResult<T> | null = null;
  text = "";

  constructor(private readonly limiter: Limiter, private readonly o: CallOptions,
    private readonly open: (params: Params, r: Reservation) => Promise<StreamHandle<T>>) {}

  async *[Symbol.asyncIterator](): AsyncGenerator<string, void> {
    const open = this.open;
    const loop = attemptLoop<T>(this.limiter, this.o, async function* (p, r) {
      const h = await open(p, r);
      try {
        for await (const t of h.texts()) {
          r.recordUsage(h.usage());
          yield t;
        }
        const value = await h.final();
        return { value, usage: h.usage(), meta: h.meta() };
      } finally {
        await h.close();
      }
    });
    for (;;) {
      const step = await loop.next();
      if (step.done) {
        this.result = step.value;
        return;
      }
      this.text += step.value;
      yield step.value;
    }
  }
}

export function streamCall<T>(limiter: Limiter, o: CallOptions,
  open: (params: Params, r: Reservation) => Promise<StreamHandle<T>>): StreamCall<T> {
  return new StreamCall(limiter, o, open);
}
