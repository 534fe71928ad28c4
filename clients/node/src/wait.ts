// Live wait status: what a caller queued at the daemon hears while it waits (AcquireStream).
import { ModelOverloadedHint, WaitTooLong, type LimiterBusy } from "./errors.js";

/** Where a waiting caller stands (a Queued event of AcquireStream). */
export interface WaitUpdate {
  /** 1 = next in line for the buckets it needs. */
  readonly position: number;
  /** From refill rates and the demand queued ahead of it. */
  readonly estimatedWaitMs: number;
  /** Callers waiting on those buckets. */
  readonly queueDepth: number;
  readonly waitedMs: number;
  /** The daemon saw many OVERLOADED outcomes on this model lately. */
  readonly modelOverloaded: boolean;
}

export type WaitCallback = (update: WaitUpdate) => void | Promise<void>;

/** When to give up a wait early: `budgetMs` against the live estimate, and the overload hint. */
export class WaitGate {
  constructor(readonly budgetMs: number | null = null, readonly overloadedHint = false) {
    if (budgetMs !== null && !(budgetMs >= 0)) throw new RangeError("waitBudgetMs: must be >= 0");
  }

  check(u: WaitUpdate, elapsedMs: number): LimiterBusy | null {
    if (this.overloadedHint && u.modelOverloaded) {
      return new ModelOverloadedHint("the daemon marks this model overloaded", null);
    }
    if (this.budgetMs !== null && u.estimatedWaitMs > this.budgetMs - elapsedMs) {
      return new WaitTooLong(
        `estimated wait ${(u.estimatedWaitMs / 1000).toFixed(1)}s exceeds the wait budget ` +
        `${(this.budgetMs / 1000).toFixed(1)}s`, Math.round(u.estimatedWaitMs));
    }
    return null;
  }

  checkGrant(modelOverloaded: boolean): LimiterBusy | null {
    return this.overloadedHint && modelOverloaded
      ? new ModelOverloadedHint("the daemon marks this model overloaded", null)
      : null;
  }
}
