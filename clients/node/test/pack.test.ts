// `npm pack` makes a tarball that installs and imports as a user would: ESM, types, the proto
// subpath, nothing of the sources or tests.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { NODE_DIR, REPO } from "./harness.js";

const run = promisify(execFile);
const npm = process.platform === "win32" ? "npm.cmd" : "npm";

test("npm pack produces an installable tarball with types", { timeout: 180_000 }, async () => {
  const out = mkdtempSync(join(tmpdir(), "limiterd-pack-"));
  // dist/ is already built by `npm test`; --ignore-scripts skips a second build.
  const { stdout } = await run(npm, ["pack", "--ignore-scripts", "--json", "--pack-destination", out], { cwd: NODE_DIR });
  const [info] = JSON.parse(stdout) as Array<{ filename: string; files: Array<{ path: string }> }>;
  const files = info!.files.map((f) => f.path);
  for (const f of ["package.json", "README.md", "dist/index.js", "dist/index.d.ts", "dist/gen/index.js",
    "dist/gen/index.d.ts", "dist/anthropic.d.ts"]) {
    assert.ok(files.includes(f), `${f} is in the tarball`);
  }
  assert.ok(!files.some((f) => f.startsWith("src/") || f.startsWith("test/") || f.endsWith(".map")), files.join(" "));

  const app = mkdtempSync(join(tmpdir(), "limiterd-app-"));
  writeFileSync(join(app, "package.json"), JSON.stringify({ name: "app", private: true, type: "module" }));
  // --offline: the dependencies come from the cache `npm ci` filled; a test never goes online.
  await run(npm, ["install", "--offline", "--no-audit", "--no-fund", "--loglevel=error", join(out, info!.filename)], { cwd: app });
  assert.ok(existsSync(join(app, "node_modules/limiterd-client/dist/index.d.ts")));
  const vectors = JSON.parse(readFileSync(join(REPO, "tests/data/scope_vectors.json"), "utf8")) as {
    cases: Array<{ key: string; salt?: string; salt_hex?: string; scope: string }>;
  };
  const plain = vectors.cases.find((c) => c.salt === undefined && c.salt_hex === undefined)!;
  writeFileSync(join(app, "main.mjs"), `
    import { Limiter, limitedFetch, RetryPolicy, FallbackPolicy, scopeForApiKey } from "limiterd-client";
    import { Limiter as LimiterService } from "limiterd-client/proto";
    const limiter = new Limiter({ target: "127.0.0.1:1" });
    console.log(JSON.stringify({
      scope: scopeForApiKey(${JSON.stringify(plain.key)}),
      fetch: typeof limitedFetch(limiter),
      retry: RetryPolicy.analysis().maxAttempts,
      fallback: new FallbackPolicy({ chain: ["a", "b"] }).chain.length,
      service: LimiterService.typeName,
    }));
    await limiter.close();
  `);
  const result = await run(process.execPath, ["main.mjs"], { cwd: app });
  assert.deepEqual(JSON.parse(result.stdout), {
    scope: plain.scope, fetch: "function", retry: 9, fallback: 2, service: "limiter.v1.Limiter",
  });
});
