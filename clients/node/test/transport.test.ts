// How the client reaches the daemon: TLS and mutual TLS, a unix socket, and a lost answer
// retried with the same request id.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { Limiter, LimiterUnavailable } from "limiterd-client";
import { limiterFor, openLeases, startDaemon, uniqueScope } from "./harness.js";

function hasOpenssl(): boolean {
  try {
    execFileSync("openssl", ["version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

/** A CA, a server certificate for 127.0.0.1 and a client certificate, with the openssl CLI. */
function makeCerts(): Record<"ca" | "serverCert" | "serverKey" | "clientCert" | "clientKey", string> {
  const d = mkdtempSync(join(tmpdir(), "limiterd-tls-"));
  const run = (...args: string[]): void => { execFileSync("openssl", args, { cwd: d, stdio: "ignore" }); };
  run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
    "-subj", "/CN=limiterd node test CA");
  writeFileSync(join(d, "san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
  for (const name of ["server", "client"]) {
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${name}`);
    run("x509", "-req", "-in", `${name}.csr`, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
      "-out", `${name}.pem`, "-days", "2", "-extfile", "san.ext");
  }
  return { ca: join(d, "ca.pem"), serverCert: join(d, "server.pem"), serverKey: join(d, "server.key"),
    clientCert: join(d, "client.pem"), clientKey: join(d, "client.key") };
}

test("TLS and mutual TLS", { skip: !hasOpenssl() && "needs the openssl command" }, async () => {
  const c = makeCerts();
  const tls = { ca: readFileSync(c.ca), cert: readFileSync(c.clientCert), key: readFileSync(c.clientKey) };
  const d = await startDaemon({
    args: ["--tls-cert", c.serverCert, "--tls-key", c.serverKey, "--tls-client-ca", c.ca], probe: { tls },
  });
  try {
    const secure = limiterFor(d, { tls });
    const r = await secure.reserve({ scope: uniqueScope("tls"), model: "claude-test", inputTokens: 1, maxOutputTokens: 1 });
    assert.equal((await r.release())!.state, "RELEASED");
    await secure.close();
    // Without the client certificate, or in plaintext, the daemon cannot be used.
    for (const opts of [{ tls: { ca: tls.ca } }, {}]) {
      const refused = limiterFor(d, { ...opts, transportAttempts: 1, rpcTimeoutMs: 1000 });
      await assert.rejects(refused.reserve({ scope: "s", model: "claude-test", inputTokens: 1, maxOutputTokens: 1 }),
        LimiterUnavailable);
      await refused.close();
    }
  } finally {
    await d.stop();
  }
});

test("a unix socket target", async () => {
  const sock = join(mkdtempSync(join(tmpdir(), "limiterd-sock-")), "limiterd.sock");
  const d = await startDaemon({ listen: `unix:${sock}` });
  try {
    const limiter = new Limiter({ target: `unix:${sock}` });
    await limiter.waitReady({ timeoutMs: 5000 });
    const r = await limiter.reserve({ scope: "s", model: "claude-test", inputTokens: 1, maxOutputTokens: 1 });
    assert.equal((await r.report({ inputTokens: 1, outputTokens: 1 }))!.state, "REPORTED");
    await limiter.close();
  } finally {
    await d.stop();
  }
});

test("a lost Acquire answer is retried with the same request id: one reservation", async () => {
  const d = await startDaemon();
  try {
    let lost = 0;
    // The daemon applies the first Acquire; its answer is then lost on the way back.
    const loseFirstAnswer: Interceptor = (next) => async (req) => {
      const res = await next(req);
      if (req.method.name === "Acquire" && lost++ === 0) throw new ConnectError("answer lost", Code.Unavailable);
      return res;
    };
    const limiter = limiterFor(d, { interceptors: [loseFirstAnswer] });
    const scope = uniqueScope("lost");
    const r = await limiter.reserve({ scope, model: "claude-test", inputTokens: 1, maxOutputTokens: 1 });
    assert.equal(lost, 2);
    assert.equal(limiter.counters.acquireRetries, 1);
    assert.equal(r.grant!.replayed, true, "the retry got the first grant back");
    assert.equal(await openLeases(d, scope), 1, "not two reservations");
    await r.release();
    await limiter.close();
  } finally {
    await d.stop();
  }
});
