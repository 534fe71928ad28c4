// Settlements the daemon did not take at once. Report and Release are idempotent on the
// daemon, so they are retried with backoff until they land or the lease is over (after which
// the daemon has settled the reservation as consumed and a late Report is refused).
import { isTransient } from "./daemon.js";
import type { Limiter, Settlement } from "./limiter.js";

export interface Pending {
  kind: "report" | "release";
  reservationId: string;
  /** Unix ms after which delivering is pointless (the lease's end); 0 = unknown. */
  deadlineMs: number;
  rpc: () => Promise<Settlement>;
}

const BASE_MS = 100;
const MAX_MS = 5_000;
// With an unknown lease end, give up after this long.
const UNKNOWN_DEADLINE_MS = 10 * 60_000;

export class Outbox {
  private readonly queue: Pending[] = [];
  private running: Promise<void> | null = null;
  private readonly waiters = new Set<() => void>();
  private stopped = false;

  constructor(private readonly limiter: Limiter, private readonly max: number) {}

  get size(): number {
    return this.queue.length;
  }

  add(p: Pending): void {
    if (this.stopped) {
      this.limiter.counters.settlementsDropped++;
      this.limiter.warn(`the ${p.kind} of ${p.reservationId} came after close(): not delivered`);
      return;
    }
    if (p.deadlineMs === 0) p.deadlineMs = Date.now() + UNKNOWN_DEADLINE_MS;
    this.queue.push(p);
    if (this.queue.length > this.max) {
      const dropped = this.queue.shift()!;
      this.limiter.counters.settlementsDropped++;
      this.limiter.warn(`settlement queue full: dropped the ${dropped.kind} of ${dropped.reservationId}`);
    }
    this.limiter.warn(`limiterd unreachable: the ${p.kind} of ${p.reservationId} will be delivered when it is back`);
    this.running ??= this.run().finally(() => {
      this.running = null;
      for (const w of this.waiters) w();
    });
  }

  private async run(): Promise<void> {
    let failures = 0;
    while (this.queue.length > 0 && !this.stopped) {
      const p = this.queue[0]!;
      if (Date.now() > p.deadlineMs) {
        this.queue.shift();
        this.limiter.counters.settlementsDropped++;
        this.limiter.warn(`gave up the ${p.kind} of ${p.reservationId}: its lease is over`);
        continue;
      }
      try {
        await p.rpc();
        this.queue.shift();
        this.limiter.counters.settlementsDelivered++;
        failures = 0;
      } catch (e) {
        if (!isTransient(e)) { // the daemon answered: retrying cannot change the answer
          this.queue.shift();
          this.limiter.counters.settlementsDropped++;
          this.limiter.warn(`the ${p.kind} of ${p.reservationId} was refused: ${(e as Error).message}`);
          continue;
        }
        failures++;
        const wait = Math.min(MAX_MS, BASE_MS * 2 ** Math.min(failures - 1, 10));
        await this.limiter.sleep(wait * (0.5 + Math.random() / 2));
      }
    }
  }

  /** The limiter is closed: what is still queued is given up (counted), the loop ends. */
  stop(): void {
    this.stopped = true;
    for (const p of this.queue.splice(0)) {
      this.limiter.counters.settlementsDropped++;
      this.limiter.warn(`closed before the ${p.kind} of ${p.reservationId} could be delivered`);
    }
  }

  /** Resolve true once the queue is empty, false after `timeoutMs`. */
  async flush(timeoutMs: number): Promise<boolean> {
    if (this.running === null) return this.queue.length === 0;
    let timer: NodeJS.Timeout | undefined;
    const done = await Promise.race([
      new Promise<boolean>((resolve) => this.waiters.add(() => resolve(true))),
      new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(false), timeoutMs); }),
    ]);
    clearTimeout(timer);
    return done && this.queue.length === 0;
  }
}
