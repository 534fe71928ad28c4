// What the limiter adds to one Claude call through the SDK: the same calls direct and through
// limitedFetch, against a real daemon and the fake provider on loopback, interleaved in rounds
// so both see the same machine. Figures are ratios within one run (`make node-bench`).
import Anthropic from "@anthropic-ai/sdk";
import { Limiter, limitedFetch } from "limiterd-client";
import { FakeProvider } from "../test/fake-provider.js";
import { startDaemon } from "../test/harness.js";

const ROUNDS = Number(process.env["ROUNDS"] ?? 5);
const PER_ROUND = Number(process.env["PER_ROUND"] ?? 60);

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))]!;
}

async function main(): Promise<void> {
  // JOURNAL=memory measures the client and the RPCs without SQLite's commits.
  const memory = process.env["JOURNAL"] === "memory";
  // Limits far above the load: the figure is the client's and the RPCs' cost, never a wait.
  const config = `[models."bench"]\nrequests_per_minute = 10000000\ninput_tokens_per_minute = 1000000000\n` +
    `output_tokens_per_minute = 1000000000\n`;
  const [d, provider] = await Promise.all([startDaemon({ config, ...(memory ? { db: ":memory:" } : {}) }),
    new FakeProvider().start()]);
  provider.fallback = { kind: "json", text: "ok" };
  const limiter = new Limiter({ target: d.target });
  const base = { apiKey: "sk-ant-bench", baseURL: provider.url, maxRetries: 0 };
  const direct = new Anthropic(base);
  const limited = new Anthropic({ ...base, fetch: limitedFetch(limiter) });
  const ask = { model: "bench", max_tokens: 100, messages: [{ role: "user" as const, content: "hi" }] };
  const times: Record<"direct" | "limited", number[]> = { direct: [], limited: [] };
  for (const c of [direct, limited]) await c.messages.create(ask); // warm both paths
  for (let round = 0; round < ROUNDS; round++) {
    for (const [name, client] of [["direct", direct], ["limited", limited]] as const) {
      for (let i = 0; i < PER_ROUND; i++) {
        const t0 = performance.now();
        await client.messages.create(ask);
        times[name].push(performance.now() - t0);
      }
    }
  }
  const row = (name: "direct" | "limited"): string =>
    `| ${name} | ${quantile(times[name], 0.5).toFixed(2)} | ${quantile(times[name], 0.99).toFixed(2)} |`;
  const p50 = quantile(times.limited, 0.5) / quantile(times.direct, 0.5);
  const p99 = quantile(times.limited, 0.99) / quantile(times.direct, 0.99);
  console.log(`${ROUNDS * PER_ROUND} sequential messages.create calls per path, ${ROUNDS} interleaved rounds, ` +
    `journal: ${memory ? "in memory" : "SQLite file"}\n`);
  console.log("| path | p50 ms | p99 ms |\n|---|---|---|");
  console.log(row("direct"));
  console.log(row("limited"));
  console.log(`\nlimited / direct: p50 x${p50.toFixed(2)}, p99 x${p99.toFixed(2)} ` +
    `(+${(quantile(times.limited, 0.5) - quantile(times.direct, 0.5)).toFixed(2)} ms at p50: Acquire + Report)`);
  await limiter.close();
  await Promise.all([d.stop(), provider.stop()]);
}

await main();
