#!/usr/bin/env node
// The smallest use of the API: one Acquire -> Report with the generated stubs alone
// (`limiterd-client/proto`), no policy. The library (`limiterd-client`) is the way in for apps.
//
//   node examples/acquire_report.mjs --target 127.0.0.1:50051 --scope S --model M \
//     --input-tokens 1000 --max-output-tokens 500
//
// Prints one JSON line {"acquire": AcquireResponse, "report": ReportResponse} (proto3 JSON,
// proto field names, int64 as decimal strings). On failure prints one line to stderr naming
// the call, the gRPC status and details (plus retry-after-ms on RESOURCE_EXHAUSTED) and exits
// 1; bad flags exit 2.
import { parseArgs } from "node:util";
import { create, toJson } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  AcquireResponseSchema, Limiter, Outcome, ReportRequestSchema, ReportResponseSchema,
} from "limiterd-client/proto";

const USAGE = `usage: node acquire_report.mjs --scope S --model M --input-tokens N \
--max-output-tokens N [--target HOST:PORT] [--user U] [--max-wait-ms N] [--request-id ID] \
[--actual-input-tokens N] [--actual-output-tokens N] [--outcome OK|RATE_LIMITED|OVERLOADED|\
ERROR|CANCELLED] [--timeout-ms N]`;
const JSON_OPTIONS = { useProtoFieldName: true, alwaysEmitImplicit: true };

class UsageError extends Error {}

function count(name, value) {
  if (!/^\d+$/.test(value)) {
    throw new UsageError(`--${name} must be a non-negative integer, got ${JSON.stringify(value)}`);
  }
  return BigInt(value);
}

function parseCli(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv, strict: true,
      options: {
        target: { type: "string", default: "127.0.0.1:50051" },
        scope: { type: "string" }, model: { type: "string" },
        user: { type: "string", default: "" },
        "input-tokens": { type: "string" }, "max-output-tokens": { type: "string" },
        "max-wait-ms": { type: "string", default: "0" },
        "request-id": { type: "string", default: "" },
        "actual-input-tokens": { type: "string" }, "actual-output-tokens": { type: "string" },
        outcome: { type: "string", default: "OK" },
        "timeout-ms": { type: "string", default: "30000" },
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
  for (const name of ["scope", "model", "input-tokens", "max-output-tokens"]) {
    if (!values[name]) throw new UsageError(`--${name} is required`);
  }
  const outcomes = ["OK", "RATE_LIMITED", "OVERLOADED", "ERROR", "CANCELLED"];
  if (!outcomes.includes(values.outcome)) {
    throw new UsageError(`--outcome must be one of ${outcomes.join(", ")}, got ${values.outcome}`);
  }
  const inputTokens = count("input-tokens", values["input-tokens"]);
  const maxOutputTokens = count("max-output-tokens", values["max-output-tokens"]);
  return {
    target: values.target,
    timeoutMs: Number(count("timeout-ms", values["timeout-ms"])),
    acquire: {
      scope: values.scope, model: values.model, user: values.user, inputTokens, maxOutputTokens,
      maxWaitMs: count("max-wait-ms", values["max-wait-ms"]), requestId: values["request-id"],
    },
    // Without usage figures, report that the call used what it reserved.
    report: {
      actualInputTokens: values["actual-input-tokens"] === undefined
        ? inputTokens : count("actual-input-tokens", values["actual-input-tokens"]),
      actualOutputTokens: values["actual-output-tokens"] === undefined
        ? maxOutputTokens : count("actual-output-tokens", values["actual-output-tokens"]),
      outcome: Outcome[values.outcome],
    },
  };
}

// One line: "Acquire failed: RESOURCE_EXHAUSTED: <details> (retry-after-ms=1200)".
function describe(method, err) {
  const e = ConnectError.from(err);
  const name = Code[e.code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
  let line = `${method} failed: ${name}: ${e.rawMessage || "(no details)"}`;
  if (e.code === Code.ResourceExhausted) {
    const ms = e.metadata.get("retry-after-ms");
    line += ms !== null ? ` (retry-after-ms=${ms})` : " (no retry-after-ms metadata)";
  }
  return line.replace(/\s*\n\s*/g, " ").trim();
}

async function main() {
  let opts;
  try {
    opts = parseCli(process.argv.slice(2));
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`error: ${err.message}\n${USAGE}\n`);
    return 2;
  }
  const client = createClient(Limiter, createGrpcTransport({ baseUrl: `http://${opts.target}` }));
  let method = "Acquire";
  try {
    const acquired = await client.acquire(opts.acquire, { timeoutMs: opts.timeoutMs });
    method = "Report";
    const reported = await client.report(
      create(ReportRequestSchema, { reservationId: acquired.reservationId, ...opts.report }),
      { timeoutMs: opts.timeoutMs });
    process.stdout.write(JSON.stringify({
      acquire: toJson(AcquireResponseSchema, acquired, JSON_OPTIONS),
      report: toJson(ReportResponseSchema, reported, JSON_OPTIONS),
    }) + "\n");
    return 0;
  } catch (err) {
    process.stderr.write(`error: ${describe(method, err)}\n`);
    return 1;
  }
}

process.exitCode = await main();
