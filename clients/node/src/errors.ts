// Errors: the limiter's own, and one structured type for every provider failure.

/** Statuses worth another attempt (the same set as the Python client). */
export const RETRYABLE_STATUSES: ReadonlySet<number> = new Set([408, 409, 429, 500, 502, 503, 504, 529]);
// A 429 that means "you are out of money", not "slow down": retrying cannot help.
const SPEND_LIMIT = /billing|credit|spend[ _-]?limit|usage[ _-]?limit|insufficient_quota/i;

/** Base class of every error the limiter client raises about the daemon. */
export class LimiterError extends Error {
  override name = "LimiterError";
}

/** The daemon is down or its persistence is failing, and the policy is fail-closed. */
export class LimiterUnavailable extends LimiterError {
  override name = "LimiterUnavailable";
}

/** The daemon could not grant in time (RESOURCE_EXHAUSTED); retry after `retryAfterMs`. */
export class LimiterBusy extends LimiterError {
  override name = "LimiterBusy";
  constructor(message: string, readonly retryAfterMs: number | null) {
    super(message);
  }
}

/** The daemon's live estimate exceeds the caller's wait budget: it gave up its place at once. */
export class WaitTooLong extends LimiterBusy {
  override name = "WaitTooLong";
}

/** The daemon marks the model overloaded and the caller asked to fall back on that hint. */
export class ModelOverloadedHint extends LimiterBusy {
  override name = "ModelOverloadedHint";
}

/** No bucket could ever hold the request (FAILED_PRECONDITION): waiting cannot help. */
export class LimiterRejected extends LimiterError {
  override name = "LimiterRejected";
}

/** Too big for the local safe capacity used while the daemon is away (no model can help). */
export class LocalCapacityRejected extends LimiterRejected {
  override name = "LocalCapacityRejected";
}

/** The daemon (or this client) rejected a field; the message names it. */
export class LimiterInvalidArgument extends LimiterError {
  override name = "LimiterInvalidArgument";
}

/** The daemon does not know the reservation id (NOT_FOUND). */
export class ReservationNotFound extends LimiterError {
  override name = "ReservationNotFound";
}

export interface Usage {
  readonly inputTokens: number;
  readonly outputTokens: number;
}

export const NO_USAGE: Usage = Object.freeze({ inputTokens: 0, outputTokens: 0 });

export interface ProviderErrorFields {
  provider: string;
  /** HTTP status; null for connection errors; 200 for an error event inside a stream. */
  status: number | null;
  /** The provider's error type, e.g. "overloaded_error", "connection_error". */
  code: string | null;
  message: string;
  retryable: boolean;
  retryAfterMs?: number | null;
  requestId?: string | null;
  errorCode?: string | null;
  headers?: Record<string, string>;
  /** Best-known usage of the failed call, when any was consumed. */
  usage?: Usage | null;
  timeout?: boolean;
}

/** One failed provider call, classified (the fields of the Python client's ProviderError). */
export class ProviderError extends Error {
  override name = "ProviderError";
  readonly provider: string;
  readonly status: number | null;
  readonly code: string | null;
  readonly retryable: boolean;
  readonly retryAfterMs: number | null;
  readonly requestId: string | null;
  readonly errorCode: string | null;
  readonly headers: Readonly<Record<string, string>>;
  usage: Usage | null;
  readonly timeout: boolean;

  constructor(f: ProviderErrorFields, options?: { cause?: unknown }) {
    super(f.message, options);
    this.provider = f.provider;
    this.status = f.status;
    this.code = f.code;
    this.retryable = f.retryable;
    this.retryAfterMs = f.retryAfterMs ?? null;
    this.requestId = f.requestId ?? null;
    this.errorCode = f.errorCode ?? null;
    this.headers = { ...(f.headers ?? {}) };
    this.usage = f.usage ?? null;
    this.timeout = f.timeout ?? false;
  }

  get rateLimited(): boolean {
    return this.status === 429;
  }

  get overloaded(): boolean {
    return this.status === 529 || this.code === "overloaded_error";
  }
}

/** A stream failed after text had reached the caller; it is not retried. */
export class PartialResponseError extends Error {
  override name = "PartialResponseError";
  constructor(readonly text: string, readonly usage: Usage, override readonly cause: ProviderError) {
    super(`stream failed after ${text.length} characters: ${cause.message}`, { cause });
  }
}

export type HeaderSource = Headers | Record<string, string> | Iterable<[string, string]> | null | undefined;

export function lowerHeaders(headers: HeaderSource): Record<string, string> {
  const out: Record<string, string> = {};
  if (!headers) return out;
  const entries: Iterable<[string, string]> = headers instanceof Headers
    ? headers.entries()
    : Symbol.iterator in (headers as object)
      ? (headers as Iterable<[string, string]>)
      : Object.entries(headers as Record<string, string>);
  for (const [k, v] of entries) out[k.toLowerCase()] = v;
  return out;
}

/** `retry-after-ms`, else `retry-after` as seconds or an HTTP date; `nowMs` is unix ms. */
export function parseRetryAfterMs(headers: HeaderSource, nowMs: number = Date.now()): number | null {
  const h = lowerHeaders(headers);
  const rawMs = h["retry-after-ms"];
  if (rawMs !== undefined && rawMs.trim() !== "" && Number.isFinite(Number(rawMs))) {
    return Math.max(0, Math.round(Number(rawMs)));
  }
  const raw = h["retry-after"];
  if (raw === undefined || raw.trim() === "") return null;
  if (Number.isFinite(Number(raw))) return Math.max(0, Math.round(Number(raw) * 1000));
  // Only a full HTTP date with a zone counts (as Python's parsedate_to_datetime + tzinfo).
  if (!/\b(GMT|UTC|[+-]\d{4})\s*$/i.test(raw)) return null;
  const when = Date.parse(raw);
  return Number.isNaN(when) ? null : Math.max(0, Math.round(when - nowMs));
}

function shouldRetryHeader(h: Record<string, string>): boolean | null {
  const v = (h["x-should-retry"] ?? "").trim().toLowerCase();
  return v === "true" ? true : v === "false" ? false : null;
}

export interface HttpFailure {
  provider: string;
  status: number;
  headers?: HeaderSource;
  code?: string | null;
  errorCode?: string | null;
  message?: string;
  requestId?: string | null;
  nowMs?: number;
}

/** Classify an HTTP error answer (or an error event inside a 200 stream). */
export function classifyHttp(f: HttpFailure): ProviderError {
  const h = lowerHeaders(f.headers);
  let status = f.status;
  // An overload delivered inside a 200 stream is still an overload.
  if (f.code === "overloaded_error" && status < 400) status = 529;
  let retryable = RETRYABLE_STATUSES.has(status);
  const text = [f.code, f.errorCode, f.message].filter(Boolean).join(" ");
  if (status === 429 && SPEND_LIMIT.test(text)) retryable = false;
  retryable = shouldRetryHeader(h) ?? retryable;
  return new ProviderError({
    provider: f.provider,
    status,
    code: f.code ?? null,
    message: f.message || `HTTP ${f.status}`,
    retryable,
    retryAfterMs: parseRetryAfterMs(h, f.nowMs ?? Date.now()),
    requestId: f.requestId || h["request-id"] || null,
    errorCode: f.errorCode ?? null,
    headers: h,
    timeout: status === 408 || status === 504,
  });
}

/** A reset, refused or timed-out connection: always retryable. */
export function connectionError(provider: string, message: string,
  options: { timeout?: boolean; usage?: Usage | null; cause?: unknown } = {}): ProviderError {
  return new ProviderError({
    provider, status: null, code: options.timeout ? "timeout" : "connection_error", message,
    retryable: true, timeout: options.timeout ?? false, usage: options.usage ?? null,
  }, { cause: options.cause });
}

/** What the provider said about an attempt; sent to the daemon in ReportRequest.provider. */
export interface ProviderMeta {
  readonly httpStatus?: number;
  readonly errorType?: string;
  readonly errorCode?: string;
  readonly requestId?: string;
  readonly headers?: Readonly<Record<string, string>>;
  readonly fellBack?: boolean;
}

export function metaOf(err: ProviderError, fellBack = false): ProviderMeta {
  return {
    httpStatus: err.status ?? 0, errorType: err.code ?? "", errorCode: err.errorCode ?? "",
    requestId: err.requestId ?? "", headers: reportedHeaders(err.headers), fellBack,
  };
}

/** The headers worth sending to the daemon: rate-limit state, retry hints, request id. */
export function reportedHeaders(headers: HeaderSource): Record<string, string> {
  const keep = new Set(["retry-after", "retry-after-ms", "x-should-retry", "request-id"]);
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(lowerHeaders(headers))) {
    if (keep.has(k) || k.startsWith("anthropic-ratelimit-")) out[k] = v;
  }
  return out;
}
