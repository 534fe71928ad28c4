// The only module that touches the generated stubs: typed values in, typed values out.
import { ConnectError, Code, createClient, type Client } from "@connectrpc/connect";
import {
  Limiter as LimiterService, Outcome as PbOutcome, ReservationState,
  type AcquireResponse, type Settlement as PbSettlement,
} from "./gen/limiter/v1/limiter_pb.js";
import { Health, HealthCheckResponse_ServingStatus } from "./gen/grpc/health/v1/health_pb.js";
import {
  LimiterBusy, LimiterError, LimiterInvalidArgument, LimiterRejected, LimiterUnavailable,
  ReservationNotFound, type ProviderMeta,
} from "./errors.js";
import type { Channel } from "./transport.js";
import type { WaitUpdate } from "./wait.js";

export type Outcome = "OK" | "RATE_LIMITED" | "OVERLOADED" | "ERROR" | "CANCELLED";

export interface AcquireArgs {
  scope: string;
  model: string;
  user: string;
  inputTokens: number;
  maxOutputTokens: number;
  maxWaitMs: number;
  leaseMs: number;
  requestId: string;
  /** The caller will mark its send (MarkSent) when the grant asks. */
  marksSent: boolean;
}

/** A grant as the daemon made it. */
export interface DaemonGrant {
  readonly reservationId: string;
  readonly leaseExpiresAtMs: number;
  readonly grantedAtMs: number;
  readonly waitedMs: number;
  readonly reservedInputTokens: number;
  readonly reservedOutputTokens: number;
  readonly replayed: boolean;
  readonly modelOverloaded: boolean;
  /** The daemon holds a bucket's refill until this call's MarkSent. */
  readonly markSentWanted: boolean;
}

/** How a reservation ended and what it gave back to (or took from) its buckets. */
export interface Settlement {
  readonly reservationId: string;
  readonly state: "OPEN" | "REPORTED" | "RELEASED" | "EXPIRED" | "UNSPECIFIED";
  readonly settledAtMs: number;
  readonly refundedRequests: number;
  readonly refundedInputTokens: number;
  readonly refundedOutputTokens: number;
  readonly overrunInputTokens: number;
  readonly overrunOutputTokens: number;
  /** The daemon had answered the same call before; nothing changed. */
  readonly replayed: boolean;
}

export interface ReportArgs {
  reservationId: string;
  inputTokens: number;
  outputTokens: number;
  outcome: Outcome;
  retryAfterMs: number;
  provider: ProviderMeta | null;
}

export type AcquireEvent = { queued: WaitUpdate } | { granted: DaemonGrant };

/** A lost answer to these may still have been applied: retry with the same request. A
 * draining daemon answers CANCELLED to the calls it cuts short: that is the daemon going away. */
export function isTransient(err: unknown): boolean {
  const code = ConnectError.from(err).code;
  return code === Code.Unavailable || code === Code.DeadlineExceeded || code === Code.Canceled;
}

/** gRPC status -> the client's error types; the message names the status and the field. */
export function mapError(err: unknown): LimiterError {
  if (err instanceof LimiterError) return err;
  const e = ConnectError.from(err);
  const details = e.rawMessage;
  switch (e.code) {
    case Code.ResourceExhausted: {
      const raw = e.metadata.get("retry-after-ms");
      const ms = raw !== null && /^\d+$/.test(raw.trim()) ? Number(raw) : null;
      return new LimiterBusy(details || "limiter could not grant in time", ms);
    }
    case Code.FailedPrecondition:
      return new LimiterRejected(details || "no bucket can ever hold this request");
    case Code.InvalidArgument:
      return new LimiterInvalidArgument(details || "invalid argument");
    case Code.NotFound:
      return new ReservationNotFound(details || "unknown reservation");
    case Code.Unavailable:
    case Code.DeadlineExceeded:
    case Code.Canceled:
      return new LimiterUnavailable(`limiter unavailable (${Code[e.code]}): ${details}`, { cause: e });
    default:
      return new LimiterError(`limiter error ${Code[e.code]}: ${details}`, { cause: e });
  }
}

const big = (n: number): bigint => BigInt(Math.trunc(n));
// grpc-timeout takes whole units of at most 8 digits.
const ms = (t: number): number => Math.min(99_999_999, Math.max(1, Math.ceil(t)));

function grantOf(r: AcquireResponse): DaemonGrant {
  return {
    reservationId: r.reservationId,
    leaseExpiresAtMs: Number(r.leaseExpiresAtMs),
    grantedAtMs: Number(r.grantedAtMs),
    waitedMs: Number(r.waitedMs),
    reservedInputTokens: Number(r.reservedInputTokens),
    reservedOutputTokens: Number(r.reservedOutputTokens),
    replayed: r.replayed,
    modelOverloaded: r.modelOverloaded,
    markSentWanted: r.markSentWanted,
  };
}

function settlementOf(s: PbSettlement | undefined, replayed: boolean): Settlement {
  return {
    reservationId: s?.reservationId ?? "",
    state: (s ? ReservationState[s.state] : "UNSPECIFIED") as Settlement["state"],
    settledAtMs: Number(s?.settledAtMs ?? 0n),
    refundedRequests: Number(s?.refundedRequests ?? 0n),
    refundedInputTokens: Number(s?.refundedInputTokens ?? 0n),
    refundedOutputTokens: Number(s?.refundedOutputTokens ?? 0n),
    overrunInputTokens: Number(s?.overrunInputTokens ?? 0n),
    overrunOutputTokens: Number(s?.overrunOutputTokens ?? 0n),
    replayed,
  };
}

function acquireRequest(a: AcquireArgs) {
  return {
    scope: a.scope, model: a.model, user: a.user, inputTokens: big(a.inputTokens),
    maxOutputTokens: big(a.maxOutputTokens), maxWaitMs: big(a.maxWaitMs),
    leaseMs: big(a.leaseMs), requestId: a.requestId, marksSent: a.marksSent,
  };
}

/** One call per RPC, errors left as Connect raised them (the limiter decides on retries). */
export class DaemonApi {
  private readonly limiter: Client<typeof LimiterService>;
  private readonly health: Client<typeof Health>;

  constructor(channel: Channel) {
    this.limiter = createClient(LimiterService, channel.transport);
    this.health = createClient(Health, channel.transport);
  }

  async acquire(a: AcquireArgs, timeoutMs: number): Promise<DaemonGrant> {
    return grantOf(await this.limiter.acquire(acquireRequest(a), { timeoutMs: ms(timeoutMs) }));
  }

  async *acquireStream(a: AcquireArgs, timeoutMs: number, signal: AbortSignal): AsyncGenerator<AcquireEvent> {
    for await (const ev of this.limiter.acquireStream(acquireRequest(a), { timeoutMs: ms(timeoutMs), signal })) {
      if (ev.event.case === "granted") {
        yield { granted: grantOf(ev.event.value) };
      } else if (ev.event.case === "queued") {
        const q = ev.event.value;
        yield {
          queued: {
            position: q.position, estimatedWaitMs: Number(q.estimatedWaitMs),
            queueDepth: q.queueDepth, waitedMs: Number(q.waitedMs),
            modelOverloaded: q.modelOverloaded,
          },
        };
      }
    }
  }

  async report(r: ReportArgs, timeoutMs: number): Promise<Settlement> {
    const p = r.provider;
    const resp = await this.limiter.report({
      reservationId: r.reservationId,
      actualInputTokens: big(r.inputTokens),
      actualOutputTokens: big(r.outputTokens),
      outcome: PbOutcome[r.outcome],
      retryAfterMs: big(r.retryAfterMs),
      ...(p ? {
        provider: {
          httpStatus: p.httpStatus ?? 0, errorType: p.errorType ?? "", errorCode: p.errorCode ?? "",
          requestId: p.requestId ?? "", headers: { ...(p.headers ?? {}) }, fellBack: p.fellBack ?? false,
        },
      } : {}),
    }, { timeoutMs: ms(timeoutMs) });
    return settlementOf(resp.settlement, resp.replayed);
  }

  async release(reservationId: string, timeoutMs: number): Promise<Settlement> {
    const resp = await this.limiter.release({ reservationId }, { timeoutMs: ms(timeoutMs) });
    return settlementOf(resp.settlement, resp.replayed);
  }

  async keepAlive(reservationId: string, leaseMs: number, timeoutMs: number): Promise<number> {
    const resp = await this.limiter.keepAlive({ reservationId, leaseMs: big(leaseMs) }, { timeoutMs: ms(timeoutMs) });
    return Number(resp.leaseExpiresAtMs);
  }

  async markSent(reservationId: string, timeoutMs: number): Promise<void> {
    await this.limiter.markSent({ reservationId }, { timeoutMs: ms(timeoutMs) });
  }

  async serving(timeoutMs: number): Promise<boolean> {
    const resp = await this.health.check({ service: "" }, { timeoutMs: ms(timeoutMs) });
    return resp.status === HealthCheckResponse_ServingStatus.SERVING;
  }
}
