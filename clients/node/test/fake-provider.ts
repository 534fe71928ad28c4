// A fake Anthropic Messages API on loopback: the outside world, scripted per request.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";

export type Script =
  | { kind: "json"; text?: string; input?: number; output?: number; delayMs?: number; headers?: Record<string, string>;
      /** Answer only once this settles (a test decides when the provider call ends). */
      until?: Promise<unknown> }
  | { kind: "sse"; texts?: string[]; input?: number; output?: number; toolUse?: boolean;
      /** Stop after this many text deltas: "cut" drops the connection, "error" sends an error event. */
      failAfter?: { deltas: number; how: "cut" | "error"; errorType?: string } }
  | { kind: "status"; status: number; type: string; message?: string; headers?: Record<string, string> };

export interface Seen {
  readonly path: string;
  readonly headers: IncomingMessage["headers"];
  readonly body: Record<string, unknown>;
}

export const RATE_LIMIT_HEADERS = {
  "anthropic-ratelimit-requests-limit": "50",
  "anthropic-ratelimit-requests-remaining": "0",
  "anthropic-ratelimit-input-tokens-limit": "30000",
  "anthropic-ratelimit-input-tokens-remaining": "1200",
};

export class FakeProvider {
  readonly seen: Seen[] = [];
  private readonly scripts: Script[] = [];
  private server!: Server;
  url = "";
  /** Used when no script is queued. */
  fallback: Script = { kind: "json" };

  async start(): Promise<this> {
    this.server = createServer((req, res) => void this.handle(req, res));
    await new Promise<void>((ok) => this.server.listen(0, "127.0.0.1", ok));
    this.url = `http://127.0.0.1:${(this.server.address() as { port: number }).port}`;
    return this;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise((ok) => this.server.close(ok));
  }

  /** Answer the next requests with these, in order. */
  queue(...scripts: Script[]): this {
    this.scripts.push(...scripts);
    return this;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    let raw = "";
    for await (const chunk of req) raw += chunk;
    const body = raw ? JSON.parse(raw) as Record<string, unknown> : {};
    this.seen.push({ path: req.url ?? "", headers: req.headers, body });
    let script = this.scripts.shift() ?? this.fallback;
    if (script.kind === "json" && body["stream"] === true) { // a streamed request gets the same answer as SSE
      script = { kind: "sse", texts: [script.text ?? "streamed"], input: script.input, output: script.output };
    }
    const model = String(body["model"] ?? "claude-test");
    const id = `msg_${this.seen.length}`;
    const common = { "request-id": `req_${this.seen.length}`, ...RATE_LIMIT_HEADERS };
    if (script.kind === "status") {
      res.writeHead(script.status, { "content-type": "application/json", ...common, ...(script.headers ?? {}) });
      res.end(JSON.stringify({ type: "error", error: { type: script.type, message: script.message ?? script.type } }));
      return;
    }
    if (script.kind === "json") {
      if (script.delayMs) await new Promise((ok) => setTimeout(ok, script.delayMs));
      if (script.until) await script.until;
      res.writeHead(200, { "content-type": "application/json", ...common, ...(script.headers ?? {}) });
      res.end(JSON.stringify({
        id, type: "message", role: "assistant", model,
        content: [{ type: "text", text: script.text ?? `answer from ${model}` }],
        stop_reason: "end_turn", stop_sequence: null,
        usage: { input_tokens: script.input ?? 11, output_tokens: script.output ?? 7 },
      }));
      return;
    }
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache", ...common });
    const send = (event: string, data: unknown): void => {
      res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
    };
    const texts = script.texts ?? ["Hello", ", ", "world"];
    send("message_start", { type: "message_start", message: {
      id, type: "message", role: "assistant", model, content: [], stop_reason: null, stop_sequence: null,
      usage: { input_tokens: script.input ?? 11, output_tokens: 1 },
    } });
    send("content_block_start", { type: "content_block_start", index: 0, content_block: { type: "text", text: "" } });
    for (const [i, text] of texts.entries()) {
      if (script.failAfter && i === script.failAfter.deltas) {
        await new Promise((ok) => setTimeout(ok, 10));
        if (script.failAfter.how === "cut") {
          res.socket?.destroy();
          return;
        }
        const type = script.failAfter.errorType ?? "overloaded_error";
        send("error", { type: "error", error: { type, message: type } });
        res.end();
        return;
      }
      send("content_block_delta", { type: "content_block_delta", index: 0, delta: { type: "text_delta", text } });
    }
    send("content_block_stop", { type: "content_block_stop", index: 0 });
    if (script.toolUse) {
      send("content_block_start", { type: "content_block_start", index: 1,
        content_block: { type: "tool_use", id: "toolu_1", name: "get_weather", input: {} } });
      send("content_block_delta", { type: "content_block_delta", index: 1,
        delta: { type: "input_json_delta", partial_json: '{"city": "Paris"}' } });
      send("content_block_stop", { type: "content_block_stop", index: 1 });
    }
    send("message_delta", { type: "message_delta", delta: { stop_reason: script.toolUse ? "tool_use" : "end_turn",
      stop_sequence: null }, usage: { output_tokens: script.output ?? 7 } });
    send("message_stop", { type: "message_stop" });
    res.end();
  }
}
