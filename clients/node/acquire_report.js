#!/usr/bin/env node
// Acquire -> Report against a running limiterd, built from limiter.proto alone (no generated
// code), to show that any gRPC language can use the daemon.
//
//   node acquire_report.js --target 127.0.0.1:50051 --scope S --model M \
//     --input-tokens 1000 --max-output-tokens 500
//
// Prints one JSON line {"acquire": AcquireResponse, "report": ReportResponse} on success.
// On failure prints one line to stderr naming the call, the gRPC status code name and details
// (plus retry-after-ms when the daemon says RESOURCE_EXHAUSTED) and exits non-zero.
"use strict";

const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const DEFAULT_PROTO = path.resolve(__dirname, "../../proto/limiter/v1/limiter.proto");
const EXIT_USAGE = 2;
const EXIT_RPC = 1;

const USAGE = `usage: node acquire_report.js --scope S --model M --input-tokens N \
--max-output-tokens N [--target HOST:PORT] [--user U] [--max-wait-ms N] [--request-id ID] \
[--actual-input-tokens N] [--actual-output-tokens N] [--outcome OK|RATE_LIMITED|OVERLOADED|\
ERROR|CANCELLED] [--timeout-ms N] [--proto FILE]`;

class UsageError extends Error {}

// Integers stay strings: int64 fields take decimal strings without losing precision.
function nonNegativeInt(name, value) {
  if (!/^\d+$/.test(value)) {
    throw new UsageError(`--${name} must be a non-negative integer, got ${JSON.stringify(value)}`);
  }
  return value;
}

function parseCli(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      strict: true,
      options: {
        target: { type: "string", default: "127.0.0.1:50051" },
        scope: { type: "string" },
        model: { type: "string" },
        user: { type: "string", default: "" },
        "input-tokens": { type: "string" },
        "max-output-tokens": { type: "string" },
        "max-wait-ms": { type: "string", default: "0" },
        "request-id": { type: "string", default: "" },
        "actual-input-tokens": { type: "string" },
        "actual-output-tokens": { type: "string" },
        outcome: { type: "string", default: "OK" },
        "timeout-ms": { type: "string", default: "30000" },
        proto: { type: "string", default: DEFAULT_PROTO },
        help: { type: "boolean", short: "h", default: false },
      },
    }));
  } catch (err) {
    throw new UsageError(err.message);
  }
  if (values.help) {
    process.stdout.write(USAGE + "\n");
    process.exit(0);
  }
  for (const required of ["scope", "model", "input-tokens", "max-output-tokens"]) {
    if (values[required] === undefined || values[required] === "") {
      throw new UsageError(`--${required} is required`);
    }
  }
  const outcomes = ["OK", "RATE_LIMITED", "OVERLOADED", "ERROR", "CANCELLED"];
  if (!outcomes.includes(values.outcome)) {
    throw new UsageError(`--outcome must be one of ${outcomes.join(", ")}, got ${values.outcome}`);
  }
  const inputTokens = nonNegativeInt("input-tokens", values["input-tokens"]);
  const maxOutputTokens = nonNegativeInt("max-output-tokens", values["max-output-tokens"]);
  return {
    target: values.target,
    protoPath: values.proto,
    timeoutMs: Number(nonNegativeInt("timeout-ms", values["timeout-ms"])),
    acquire: {
      scope: values.scope,
      model: values.model,
      user: values.user,
      input_tokens: inputTokens,
      max_output_tokens: maxOutputTokens,
      max_wait_ms: nonNegativeInt("max-wait-ms", values["max-wait-ms"]),
      request_id: values["request-id"],
    },
    // Without usage figures, report that the call used what it reserved.
    report: {
      actual_input_tokens: nonNegativeInt(
        "actual-input-tokens", values["actual-input-tokens"] ?? inputTokens),
      actual_output_tokens: nonNegativeInt(
        "actual-output-tokens", values["actual-output-tokens"] ?? maxOutputTokens),
      outcome: values.outcome,
    },
  };
}

function loadLimiterService(protoPath) {
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: true, // field names as in the proto (snake_case), as in the proto3 JSON of grpcurl
    longs: String, // int64 as decimal strings, the proto3 JSON mapping
    enums: String, // enum values by name
    defaults: true, // print zero values too, so every field is present
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition);
  if (!pkg.limiter || !pkg.limiter.v1 || !pkg.limiter.v1.Limiter) {
    throw new Error(`${protoPath} does not define service limiter.v1.Limiter`);
  }
  return pkg.limiter.v1.Limiter;
}

function call(client, method, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutMs);
    client[method](request, { deadline }, (err, response) => {
      if (err) {
        err.rpcMethod = method;
        reject(err);
      } else {
        resolve(response);
      }
    });
  });
}

// One line: "Acquire failed: RESOURCE_EXHAUSTED: <details> (retry-after-ms=1200)".
function describeRpcError(err) {
  const codeName = grpc.status[err.code] ?? `code ${err.code}`;
  let line = `${err.rpcMethod} failed: ${codeName}: ${err.details || "(no details)"}`;
  if (err.code === grpc.status.RESOURCE_EXHAUSTED && err.metadata) {
    const retryAfter = err.metadata.get("retry-after-ms");
    line += retryAfter.length > 0
      ? ` (retry-after-ms=${retryAfter[0]})`
      : " (no retry-after-ms metadata)";
  }
  if (err.reservationId) {
    line += ` [reservation ${err.reservationId} stays open until its lease expires]`;
  }
  return line.replace(/\s*\n\s*/g, " ").trim();
}

async function main() {
  let opts;
  try {
    opts = parseCli(process.argv.slice(2));
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`error: ${err.message}\n${USAGE}\n`);
      return EXIT_USAGE;
    }
    throw err;
  }

  let Limiter;
  try {
    Limiter = loadLimiterService(opts.protoPath);
  } catch (err) {
    process.stderr.write(`error: cannot load ${opts.protoPath}: ${err.message.split("\n")[0]}\n`);
    return EXIT_USAGE;
  }

  const client = new Limiter(opts.target, grpc.credentials.createInsecure());
  try {
    const acquired = await call(client, "Acquire", opts.acquire, opts.timeoutMs);
    let reported;
    try {
      reported = await call(client, "Report", {
        reservation_id: acquired.reservation_id,
        ...opts.report,
      }, opts.timeoutMs);
    } catch (err) {
      err.reservationId = acquired.reservation_id;
      throw err;
    }
    process.stdout.write(JSON.stringify({ acquire: acquired, report: reported }) + "\n");
    return 0;
  } catch (err) {
    if (err.rpcMethod === undefined) throw err;
    process.stderr.write(`error: ${describeRpcError(err)}\n`);
    return EXIT_RPC;
  } finally {
    client.close();
  }
}

main().then(
  (code) => { process.exitCode = code; },
  (err) => {
    process.stderr.write(`error: ${err && err.message ? err.message.split("\n")[0] : err}\n`);
    process.exitCode = EXIT_RPC;
  },
);
