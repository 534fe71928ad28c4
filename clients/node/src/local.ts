// What to do while the daemon cannot be reached, and the local safe-capacity buckets.

/** Throw LimiterUnavailable (the default): no call goes out unmetered. */
export interface FailClosed { readonly kind: "fail-closed" }
/** Let every call through unmetered; each one is counted and logged (rate-limited). */
export interface FailOpen { readonly kind: "fail-open" }
/**
 * Enforce a small local budget per process and model until the daemon answers again:
 * `requestsPerMinute` calls and `tokensPerMinute` input+output tokens.
 */
export interface SafeCapacity {
  readonly kind: "safe-capacity";
  readonly requestsPerMinute: number;
  readonly tokensPerMinute: number;
}
export type UnavailablePolicy = FailClosed | FailOpen | SafeCapacity;

export const failClosed = (): FailClosed => Object.freeze({ kind: "fail-closed" });
export const failOpen = (): FailOpen => Object.freeze({ kind: "fail-open" });
export function safeCapacity(requestsPerMinute: number, tokensPerMinute: number): SafeCapacity {
  if (!Number.isInteger(requestsPerMinute) || requestsPerMinute < 1) {
    throw new RangeError("requestsPerMinute: must be an integer >= 1");
  }
  if (!Number.isInteger(tokensPerMinute) || tokensPerMinute < 1) {
    throw new RangeError("tokensPerMinute: must be an integer >= 1");
  }
  return Object.freeze({ kind: "safe-capacity", requestsPerMinute, tokensPerMinute });
}

/** Two token buckets (requests, tokens), refilled continuously, full at start. */
export class LocalBucket {
  private r: number;
  private t: number;
  private at: number;

  constructor(private readonly policy: SafeCapacity, private readonly clock: () => number) {
    this.r = policy.requestsPerMinute;
    this.t = policy.tokensPerMinute;
    this.at = clock();
  }

  private refill(): void {
    const now = this.clock();
    const dtMin = Math.max(0, now - this.at) / 60_000;
    this.at = now;
    this.r = Math.min(this.policy.requestsPerMinute, this.r + dtMin * this.policy.requestsPerMinute);
    this.t = Math.min(this.policy.tokensPerMinute, this.t + dtMin * this.policy.tokensPerMinute);
  }

  /** Take 1 request and `tokens`: 0 when granted, else ms until it could be (Infinity: never). */
  tryTake(tokens: number): number {
    if (tokens > this.policy.tokensPerMinute) return Infinity;
    this.refill();
    if (this.r >= 1 && this.t >= tokens) {
      this.r -= 1;
      this.t -= tokens;
      return 0;
    }
    const needR = Math.max(0, 1 - this.r) * 60_000 / this.policy.requestsPerMinute;
    const needT = Math.max(0, tokens - this.t) * 60_000 / this.policy.tokensPerMinute;
    return Math.max(needR, needT);
  }

  giveBack(tokens: number): void {
    if (tokens <= 0) return;
    this.refill();
    this.t = Math.min(this.policy.tokensPerMinute, this.t + tokens);
  }

  levels(): { requests: number; tokens: number } {
    this.refill();
    return { requests: this.r, tokens: this.t };
  }
}
