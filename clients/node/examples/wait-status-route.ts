// A route handler that queues a Claude call in limiterd and streams, to the browser, where the
// call stands while it waits, then the answer, as server-sent events. It is a Web-standard
// (Request) => Response function, as a Next.js App Router route (`export const POST =
// waitStatusRoute(limiter)` in app/api/ask/route.ts), Hono or Deno use it.
//
//   event: queued   data: {"position":3,"estimatedWaitMs":12000,"queueDepth":5,...}
//   : ping          (a comment every pingMs, so proxies keep an idle stream open)
//   event: text     data: "Hello"
//   event: done     data: {"model":"claude-sonnet-4-5","usage":{...}}
//   event: error    data: {"message":"..."}
//
// In the browser: const es = new EventSource(...) or fetch + a reader; show `position` and
// `estimatedWaitMs` instead of a bare spinner.
import Anthropic from "@anthropic-ai/sdk";
import { limitedFetch, type Limiter, type WaitUpdate } from "limiterd-client";

export interface WaitRouteOptions {
  model?: string;
  maxTokens?: number;
  /** How long a call may queue in limiterd. */
  maxWaitMs?: number;
  /** Keepalive comment interval. */
  pingMs?: number;
  /** Where the SDK sends requests (tests point it at a fake provider). */
  baseURL?: string;
  apiKey?: string;
}

export function waitStatusRoute(limiter: Limiter, o: WaitRouteOptions = {}): (request: Request) => Promise<Response> {
  return async (request) => {
    const { prompt } = await request.json() as { prompt?: unknown };
    if (typeof prompt !== "string" || prompt === "") {
      return Response.json({ error: "prompt: a non-empty string is required" }, { status: 400 });
    }
    const encoder = new TextEncoder();
    const stop = new AbortController(); // the browser went away: leave the queue at once
    request.signal.addEventListener("abort", () => stop.abort(), { once: true });
    let ping: NodeJS.Timeout | undefined;

    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        const write = (chunk: string): void => {
          if (!stop.signal.aborted) controller.enqueue(encoder.encode(chunk));
        };
        const send = (event: string, data: unknown): void => write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
        ping = setInterval(() => write(": ping\n\n"), o.pingMs ?? 15_000);
        const sdk = new Anthropic({
          apiKey: o.apiKey ?? process.env["ANTHROPIC_API_KEY"], maxRetries: 0,
          ...(o.baseURL ? { baseURL: o.baseURL } : {}),
          fetch: limitedFetch(limiter, {
            maxWaitMs: o.maxWaitMs ?? 120_000,
            onWait: (u: WaitUpdate) => send("queued", u),
          }),
        });
        void (async () => {
          try {
            const stream = sdk.messages.stream({
              model: o.model ?? "claude-sonnet-4-5", max_tokens: o.maxTokens ?? 1024,
              messages: [{ role: "user", content: prompt }],
            }, { signal: stop.signal });
            stream.on("text", (text) => send("text", text));
            const final = await stream.finalMessage();
            send("done", { model: final.model, usage: final.usage });
          } catch (e) {
            send("error", { message: (e as Error).message });
          } finally {
            clearInterval(ping);
            if (!stop.signal.aborted) controller.close();
          }
        })();
      },
      cancel() {
        clearInterval(ping);
        stop.abort();
      },
    });
    return new Response(body, {
      headers: { "content-type": "text/event-stream", "cache-control": "no-cache", connection: "keep-alive" },
    });
  };
}
