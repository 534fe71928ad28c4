// Retry timing: exponential backoff with full jitter under a hard deadline.
import { setTimeout as delay } from "node:timers/promises";
import { ProviderError } from "./errors.js";

export interface RetryPolicyOptions {
  /** Every attempt on one model, the first included. */
  maxAttempts?: number;
  baseDelayMs?: number;
  maxDelayMs?: number;
  /** Hard deadline over the whole call: no sleep ends past it; a longer Retry-After gives up. */
  maxElapsedMs?: number;
  /** Monotonic ms, sleep and random are injectable so tests never wait. */
  clock?: () => number;
  sleep?: (ms: number) => Promise<void>;
  random?: () => number;
}

/** When to retry a failed provider call and how long to wait first. Immutable. */
export class RetryPolicy {
  readonly maxAttempts: number;
  readonly baseDelayMs: number;
  readonly maxDelayMs: number;
  readonly maxElapsedMs: number;
  readonly clock: () => number;
  readonly sleep: (ms: number) => Promise<void>;
  readonly random: () => number;

  constructor(o: RetryPolicyOptions = {}) {
    this.maxAttempts = o.maxAttempts ?? 3;
    this.baseDelayMs = o.baseDelayMs ?? 500;
    this.maxDelayMs = o.maxDelayMs ?? 8_000;
    this.maxElapsedMs = o.maxElapsedMs ?? 15_000;
    this.clock = o.clock ?? (() => performance.now());
    this.sleep = o.sleep ?? ((ms) => delay(ms));
    this.random = o.random ?? Math.random;
    if (!Number.isInteger(this.maxAttempts) || this.maxAttempts < 1) {
      throw new RangeError("maxAttempts: must be an integer >= 1");
    }
    if (!(this.baseDelayMs >= 0 && this.maxDelayMs >= this.baseDelayMs)) {
      throw new RangeError("baseDelayMs/maxDelayMs: need 0 <= baseDelayMs <= maxDelayMs");
    }
    if (!(this.maxElapsedMs > 0)) throw new RangeError("maxElapsedMs: must be > 0");
    Object.freeze(this);
  }

  /** A person is waiting: 2 retries within 15 s. */
  static interactive(overrides: RetryPolicyOptions = {}): RetryPolicy {
    return new RetryPolicy({ maxAttempts: 3, baseDelayMs: 500, maxDelayMs: 4_000, maxElapsedMs: 15_000, ...overrides });
  }

  /** Batch work: 8 retries within 10 min. */
  static analysis(overrides: RetryPolicyOptions = {}): RetryPolicy {
    return new RetryPolicy({ maxAttempts: 9, baseDelayMs: 2_000, maxDelayMs: 120_000, maxElapsedMs: 600_000, ...overrides });
  }

  static none(): RetryPolicy {
    return new RetryPolicy({ maxAttempts: 1 });
  }

  /** A copy with some options changed. */
  with(overrides: RetryPolicyOptions): RetryPolicy {
    return new RetryPolicy({ ...this, ...overrides });
  }

  /** Full jitter: uniform in [0, min(maxDelay, base * 2^(failures-1))). */
  backoff(failures: number): number {
    return this.random() * Math.min(this.maxDelayMs, this.baseDelayMs * 2 ** Math.max(0, failures - 1));
  }

  /** Ms to wait before the next attempt, or null to give up now (`failures` >= 1 so far). */
  delay(err: ProviderError, failures: number, elapsedMs: number): number | null {
    if (!err.retryable || failures >= this.maxAttempts) return null;
    return this.waitWithin(err.retryAfterMs, failures, elapsedMs);
  }

  /** The wait a Retry-After asks for (or the backoff), if it ends within the deadline. */
  waitWithin(retryAfterMs: number | null, failures: number, elapsedMs: number): number | null {
    const remaining = this.maxElapsedMs - elapsedMs;
    if (remaining <= 0) return null;
    if (retryAfterMs !== null) return retryAfterMs <= remaining ? retryAfterMs : null;
    return Math.min(this.backoff(failures), remaining);
  }

  /** Call `attempt` until it succeeds or the policy gives up (throwing the last error). */
  async run<T>(attempt: () => Promise<T>): Promise<T> {
    const start = this.clock();
    for (let failures = 1; ; failures++) {
      try {
        return await attempt();
      } catch (e) {
        if (!(e instanceof ProviderError)) throw e;
        const wait = this.delay(e, failures, this.clock() - start);
        if (wait === null) throw e;
        await this.sleep(wait);
      }
    }
  }
}
