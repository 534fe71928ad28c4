// limiterd's Node client: reserve/report around LLM provider calls, retries, fallback, and a
// fetch wrapper that puts @anthropic-ai/sdk behind the limiter.
export { scopeForApiKey, DEFAULT_SALT } from "./scope.js";
export {
  LimiterError, LimiterUnavailable, LimiterBusy, LimiterRejected, LocalCapacityRejected, LimiterInvalidArgument,
  ReservationNotFound, WaitTooLong, ModelOverloadedHint, ProviderError, PartialResponseError,
  classifyHttp, connectionError, parseRetryAfterMs, reportedHeaders, RETRYABLE_STATUSES,
  type Usage, type ProviderMeta, type ProviderErrorFields,
} from "./errors.js";
export {
  Limiter, Reservation, outcomeFor,
  type LimiterOptions, type ReserveRequest, type ReportArgs, type Grant, type GrantMode,
  type Counters, type Outcome, type Settlement, type Sleep, type Logger,
} from "./limiter.js";
export { failClosed, failOpen, safeCapacity, type UnavailablePolicy } from "./local.js";
export { parseTarget, type Target, type TlsOptions } from "./transport.js";
export type { WaitUpdate, WaitCallback } from "./wait.js";
export { RetryPolicy, type RetryPolicyOptions } from "./retry.js";
export {
  FallbackPolicy, Planner, DEFAULT_TRIGGERS,
  type FallbackPolicyOptions, type FallbackTriggers, type Hop, type HopProposal, type HopReason,
  type CallResult, type AskHook, type AdjustHook, type Params,
} from "./fallback.js";
export {
  runCall, streamCall, StreamCall, attemptLoop, estimateChars,
  type Attempt, type CallEvent, type CallOptions, type Estimate, type StreamHandle,
} from "./runner.js";
export { limitedFetch, usageOf, SseUsage, type Fetch, type LimitedFetchOptions } from "./anthropic.js";
