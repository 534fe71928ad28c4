// limiterd's Node client: reserve/report around LLM provider calls, retries, fallback, and a
// fetch wrapper that puts @anthropic-ai/sdk behind the limiter.
export { scopeForApiKey, DEFAULT_SALT } from "./scope.js";
export {
  LimiterError, LimiterUnavailable, LimiterBusy, LimiterRejected, LimiterInvalidArgument,
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
