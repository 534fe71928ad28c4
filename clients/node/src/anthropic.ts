// A drop-in for @anthropic-ai/sdk: `new Anthropic({ fetch: limitedFetch(limiter) })`.
//
// Every POST to /v1/messages is reserved first and reported after, with the usage from the
// JSON answer or from the SSE stream's usage events, the provider's rate-limit headers, and
// nothing used for a refused attempt. The SDK keeps its own types, errors and streaming events:
// error answers reach it as the provider sent them. Other requests pass straight through.
import {
  LimiterBusy, LimiterInvalidArgument, NO_USAGE, PartialResponseError, ProviderError, classifyHttp,
  connectionError, reportedHeaders, type ProviderMeta, type Usage,
} from "./errors.js";
import type { FallbackPolicy, Params } from "./fallback.js";
import type { Limiter, Reservation } from "./limiter.js";
import { RetryPolicy } from "./retry.js";
import { runCall, type Attempt, type CallEvent, type Estimate } from "./runner.js";
import { scopeForApiKey } from "./scope.js";
import type { WaitCallback } from "./wait.js";

export const PROVIDER = "anthropic";
const CHARS_PER_TOKEN = 3.5;

export type Fetch = (input: string | URL | Request, init?: RequestInit) => Promise<Response>;

export interface LimitedFetchOptions {
  /** The scope to charge; default: scopeForApiKey of the request's x-api-key (or bearer token). */
  scope?: string;
  salt?: string | Uint8Array;
  /** The fetch that reaches the provider (default: the global fetch). */
  fetch?: Fetch;
  /**
   * Retries inside the wrapper, each attempt reserved and reported. Default: none, and the
   * SDK's own retries (maxRetries) go through the wrapper one attempt at a time. Give a policy
   * (and/or a fallback) together with `maxRetries: 0` on the SDK so retries are not multiplied.
   */
  retry?: RetryPolicy;
  /** A chain of models: the wrapper rewrites the request's `model` when it falls back. */
  fallback?: FallbackPolicy;
  /** Input tokens to reserve for a request (default: characters / 3.5). */
  estimate?: Estimate;
  /** Sub-scope (a user id) per request. */
  user?: string | ((params: Params) => string);
  /** How long a call may queue in the limiter (default: the retry policy's deadline). */
  maxWaitMs?: number;
  onWait?: WaitCallback;
  onEvent?: (event: CallEvent) => void;
}

/** Anthropic's counting: cache writes count toward input, cache reads do not. */
export function usageOf(u: unknown): Usage {
  const x = (u ?? {}) as Record<string, unknown>;
  const n = (v: unknown): number => (typeof v === "number" && Number.isFinite(v) ? v : 0);
  return { inputTokens: n(x["input_tokens"]) + n(x["cache_creation_input_tokens"]), outputTokens: n(x["output_tokens"]) };
}

function metaOfResponse(resp: Response): ProviderMeta {
  return { httpStatus: resp.status, requestId: resp.headers.get("request-id") ?? "", headers: reportedHeaders(resp.headers) };
}

function scopeOf(headers: Headers, salt: string | Uint8Array | undefined, cache: Map<string, string>): string {
  const key = headers.get("x-api-key") ?? /^Bearer\s+(.+)$/i.exec(headers.get("authorization") ?? "")?.[1];
  if (!key) {
    throw new LimiterInvalidArgument(
      "scope: the request carries no x-api-key or bearer token; pass limitedFetch(limiter, { scope })");
  }
  let scope = cache.get(key);
  if (scope === undefined) {
    scope = scopeForApiKey(key, salt === undefined ? {} : { salt });
    cache.set(key, scope);
  }
  return scope;
}

/** The answer the SDK gets when the limiter cannot grant in time: a 429 it knows how to handle. */
function busyResponse(e: LimiterBusy): Response {
  const headers: Record<string, string> = { "content-type": "application/json", "x-limiterd": "busy" };
  if (e.retryAfterMs !== null) headers["retry-after-ms"] = String(e.retryAfterMs);
  return new Response(JSON.stringify({
    type: "error", error: { type: "rate_limit_error", message: `limiterd: ${e.message}` },
  }), { status: 429, headers });
}

function isMessagesCall(method: string, url: URL): boolean {
  return method === "POST" && /\/v1\/messages\/?$/.test(url.pathname);
}

/** A fetch for `new Anthropic({ fetch })` that puts every Messages call behind `limiter`. */
export function limitedFetch(limiter: Limiter, options: LimitedFetchOptions = {}): Fetch {
  const base: Fetch = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
  const scopes = new Map<string, string>();
  const retry = options.retry ?? RetryPolicy.none();
  return async (input, init) => {
    const req = input instanceof Request ? input : null;
    const url = new URL(req ? req.url : String(input));
    const method = (init?.method ?? req?.method ?? "GET").toUpperCase();
    const body = init?.body;
    if (!isMessagesCall(method, url) || typeof body !== "string") return base(input, init);
    let params: Params;
    try {
      params = JSON.parse(body) as Params;
    } catch {
      return base(input, init); // not ours to judge: the provider answers a bad body
    }
    const headers = new Headers(init?.headers ?? req?.headers);
    const scope = options.scope ?? scopeOf(headers, options.salt, scopes);
    const signal = init?.signal ?? undefined;
    const refused = new WeakMap<ProviderError, Response>();

    const attempt = async (p: Params, r: Reservation): Promise<Attempt<Response>> => {
      let resp: Response;
      try {
        resp = await base(url, { ...init, method, headers, body: JSON.stringify(p) });
      } catch (e) {
        if (signal?.aborted) throw e;
        throw connectionError(PROVIDER, `${(e as Error).message}`, { cause: e });
      }
      if (!resp.ok) {
        const text = await resp.text();
        let error: Record<string, unknown> = {};
        try {
          error = ((JSON.parse(text) as Record<string, unknown>)["error"] ?? {}) as Record<string, unknown>;
        } catch { /* not JSON: the status says enough */ }
        const err = classifyHttp({
          provider: PROVIDER, status: resp.status, headers: resp.headers,
          code: typeof error["type"] === "string" ? error["type"] : null,
          message: typeof error["message"] === "string" ? error["message"] : "",
        });
        // Kept so that, when the policy gives up, the SDK raises its own error from it.
        refused.set(err, new Response(text, { status: resp.status, statusText: resp.statusText, headers: resp.headers }));
        throw err;
      }
      const meta = metaOfResponse(resp);
      if ((resp.headers.get("content-type") ?? "").includes("text/event-stream") && resp.body) {
        return { value: tapStream(resp, r, meta, limiter), usage: NO_USAGE, meta, owned: true };
      }
      const text = await resp.text();
      let usage = NO_USAGE;
      try {
        usage = usageOf((JSON.parse(text) as Record<string, unknown>)["usage"]);
      } catch { /* no usage: report zero rather than fail the answer */ }
      return { value: new Response(text, { status: resp.status, statusText: resp.statusText, headers: resp.headers }), usage, meta };
    };

    try {
      const user = typeof options.user === "function" ? options.user(params) : options.user;
      const result = await runCall(limiter, {
        scope, params, retry, fallback: options.fallback ?? null,
        ...(options.estimate ? { estimate: options.estimate } : {}),
        ...(user !== undefined ? { user } : {}),
        ...(options.maxWaitMs !== undefined ? { maxWaitMs: options.maxWaitMs } : {}),
        ...(options.onWait ? { onWait: options.onWait } : {}),
        ...(options.onEvent ? { onEvent: options.onEvent } : {}),
        ...(signal ? { signal } : {}),
      }, attempt);
      return result.value;
    } catch (e) {
      if (e instanceof ProviderError && refused.has(e)) return refused.get(e)!;
      if (e instanceof LimiterBusy) return busyResponse(e);
      throw e;
    }
  };
}

/** Usage as a Messages stream tells it: message_start, then cumulative message_delta counts. */
export class SseUsage {
  input = 0;
  output = 0;
  chars = 0;
  /** The text deltas so far (what a reader of the stream has seen). */
  text = "";
  started = false;
  stopped = false;
  error: { type: string | null; message: string } | null = null;
  private buffer = "";
  private event = "";
  private data: string[] = [];
  private readonly decoder = new TextDecoder();

  constructor(private readonly estimatedInput: number) {}

  feed(bytes: Uint8Array): void {
    this.buffer += this.decoder.decode(bytes, { stream: true });
    let nl: number;
    while ((nl = this.buffer.search(/\r\n|\n|\r/)) >= 0) {
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + (this.buffer.startsWith("\r\n", nl) ? 2 : 1));
      this.line(line);
    }
  }

  private line(line: string): void {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
  }

  private dispatch(): void {
    const event = this.event;
    const data = this.data.join("\n");
    this.event = "";
    this.data = [];
    if (!data) return;
    let d: Record<string, unknown>;
    try {
      d = JSON.parse(data) as Record<string, unknown>;
    } catch {
      return;
    }
    const type = (d["type"] as string | undefined) ?? event;
    if (type === "message_start") {
      const u = usageOf((d["message"] as Record<string, unknown> | undefined)?.["usage"]);
      this.started = true;
      this.input = u.inputTokens;
      this.output = Math.max(this.output, u.outputTokens);
    } else if (type === "message_delta") {
      const raw = (d["usage"] ?? {}) as Record<string, unknown>;
      const u = usageOf(raw);
      if (u.outputTokens) this.output = u.outputTokens;
      if ("input_tokens" in raw && u.inputTokens) this.input = u.inputTokens;
    } else if (type === "content_block_delta") {
      const delta = (d["delta"] ?? {}) as Record<string, unknown>;
      for (const k of ["text", "partial_json", "thinking"]) {
        if (typeof delta[k] === "string") this.chars += (delta[k] as string).length;
      }
      if (typeof delta["text"] === "string") this.text += delta["text"];
    } else if (type === "message_stop") {
      this.stopped = true;
    } else if (type === "error") {
      const e = (d["error"] ?? {}) as Record<string, unknown>;
      this.error = { type: typeof e["type"] === "string" ? e["type"] : null, message: String(e["message"] ?? "stream error") };
    }
  }

  /** The provider's count once it has given one; for a cut stream, an estimate of what was delivered. */
  usage(): Usage {
    return {
      inputTokens: this.input || this.estimatedInput,
      outputTokens: this.stopped ? this.output : Math.max(this.output, Math.ceil(this.chars / CHARS_PER_TOKEN)),
    };
  }
}

/** The stream handed to the SDK: the provider's bytes unchanged, read for usage on the way,
 * and the reservation settled once when it ends, fails or is cancelled. */
function tapStream(resp: Response, r: Reservation, meta: ProviderMeta, limiter: Limiter): Response {
  const reader = resp.body!.getReader();
  const sse = new SseUsage(r.inputTokens);
  let done = false;
  const settle = async (how: "ended" | "failed" | "cancelled", cause?: unknown): Promise<void> => {
    if (done) return;
    done = true;
    const usage = sse.usage();
    try {
      if (sse.error) {
        const err = classifyHttp({ provider: PROVIDER, status: 200, headers: resp.headers, code: sse.error.type, message: sse.error.message });
        err.usage = usage;
        await r.reportError(err);
      } else if (how === "ended" && sse.stopped) {
        await r.report({ ...usage, provider: meta });
      } else if (how === "cancelled") {
        await r.report({ ...usage, outcome: "CANCELLED", provider: meta });
      } else {
        await r.reportError(connectionError(PROVIDER,
          how === "failed" ? `stream failed: ${(cause as Error)?.message}` : "stream ended before message_stop", { usage }));
      }
    } catch (e) {
      limiter.counters.settleFailures++;
      limiter.warn(`could not settle ${r.reservationId}: ${(e as Error).message}`);
    }
  };
  const body = new ReadableStream<Uint8Array>({
    async pull(controller) {
      let chunk: Awaited<ReturnType<typeof reader.read>>;
      try {
        chunk = await reader.read();
      } catch (e) {
        const usage = sse.usage();
        const cause = connectionError(PROVIDER, `stream failed: ${(e as Error).message}`, { usage, cause: e });
        controller.error(sse.chars > 0 ? new PartialResponseError(sse.text, usage, cause) : cause);
        await settle("failed", e);
        return;
      }
      if (chunk.done) {
        controller.close();
        await settle("ended");
        return;
      }
      sse.feed(chunk.value);
      controller.enqueue(chunk.value);
    },
    async cancel(reason) {
      await reader.cancel(reason).catch(() => undefined);
      await settle("cancelled");
    },
  });
  return new Response(body, { status: resp.status, statusText: resp.statusText, headers: resp.headers });
}
