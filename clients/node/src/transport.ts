// The channel to the daemon: target validation, TLS or plaintext, unix sockets.
import { connect as netConnect } from "node:net";
import type { Interceptor, Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { LimiterInvalidArgument } from "./errors.js";

export type Target =
  | { readonly kind: "tcp"; readonly host: string; readonly port: number }
  | { readonly kind: "unix"; readonly path: string };

export interface TlsOptions {
  /** PEM of the CA that signed the daemon's certificate (default: the system's roots). */
  ca?: string | Buffer;
  /** Client certificate and key, for a daemon that asks for mutual TLS. */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** The name the certificate must carry, when it differs from the target's host. */
  serverName?: string;
}

const HINT = 'give "host:port" (e.g. "127.0.0.1:50051") or "unix:/path/to.sock"';

/** Parse a daemon address the way grpc targets are written; a clear error otherwise. */
export function parseTarget(target: string): Target {
  if (typeof target !== "string" || target.trim() === "") {
    throw new LimiterInvalidArgument(`target: empty; ${HINT}`);
  }
  if (target.startsWith("unix:")) {
    const path = target.slice("unix:".length).replace(/^\/\/(?=\/)/, "");
    if (!path.startsWith("/") && !path.startsWith(".")) {
      throw new LimiterInvalidArgument(`target: ${JSON.stringify(target)}: a unix socket needs a path, ${HINT}`);
    }
    return { kind: "unix", path };
  }
  const url = /^([a-z][a-z0-9+.-]*):\/\/(.*)$/i.exec(target);
  if (url) {
    throw new LimiterInvalidArgument(
      `target: ${JSON.stringify(target)} is a URL; ${HINT} (here "${url[2]!.replace(/\/.*$/, "")}"), ` +
      "and pass tls for TLS");
  }
  const m = /^(\[[0-9a-fA-F:.]+\]|[^:\s/[\]]+):(\d+)$/.exec(target);
  if (!m) {
    throw new LimiterInvalidArgument(`target: ${JSON.stringify(target)} has no port; ${HINT}`);
  }
  const port = Number(m[2]);
  if (!(port >= 1 && port <= 65535)) {
    throw new LimiterInvalidArgument(`target: port ${m[2]} is out of range 1..65535`);
  }
  return { kind: "tcp", host: m[1]!, port };
}

export interface Channel {
  readonly transport: Transport;
  close(): void;
}

export function openChannel(target: Target, tls: boolean | TlsOptions | undefined,
  interceptors: Interceptor[] = []): Channel {
  const secure = tls !== undefined && tls !== false;
  const t: TlsOptions = typeof tls === "object" ? tls : {};
  const scheme = secure ? "https" : "http";
  const baseUrl = target.kind === "tcp"
    ? `${scheme}://${target.host}:${target.port}`
    : `${scheme}://localhost`;
  const nodeOptions = {
    ...(t.ca !== undefined ? { ca: t.ca } : {}),
    ...(t.cert !== undefined ? { cert: t.cert } : {}),
    ...(t.key !== undefined ? { key: t.key } : {}),
    ...(t.serverName !== undefined ? { servername: t.serverName } : {}),
    ...(target.kind === "unix" ? { createConnection: () => netConnect(target.path) } : {}),
  };
  // Our own session manager, so close() can end the connection; pings find a dead daemon.
  const sessionManager = new Http2SessionManager(baseUrl, {
    pingIntervalMs: 10_000, pingTimeoutMs: 5_000,
  }, nodeOptions);
  const transport = createGrpcTransport({ baseUrl, sessionManager, nodeOptions, interceptors });
  return { transport, close: () => sessionManager.abort() };
}
