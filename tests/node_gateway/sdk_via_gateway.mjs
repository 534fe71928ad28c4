// The official SDK with only its base URL changed: one create, one stream, one refusal.
// Prints one JSON line for tests/test_gateway_node.py to check.
import Anthropic from "@anthropic-ai/sdk";

const [baseURL, model] = process.argv.slice(2);
const client = new Anthropic({ apiKey: "sk-node", baseURL, maxRetries: 0 });
const messages = [{ role: "user", content: "Hello from Node" }];

const created = await client.messages.create({ model, max_tokens: 50, messages });
const stream = client.messages.stream({
  model, max_tokens: 300, messages, thinking: { type: "enabled", budget_tokens: 200 },
});
const events = [];
for await (const event of stream) events.push(event.type);
const final = await stream.finalMessage();
let refused = null;
try {
  await client.messages.create({ model: "not-a-model", max_tokens: 5, messages });
} catch (err) {
  refused = { status: err.status, type: err.error?.error?.type };
}
console.log(JSON.stringify({
  text: created.content[0].text,
  events,
  blocks: final.content.map((b) => b.type),
  toolInput: final.content.find((b) => b.type === "tool_use")?.input,
  refused,
}));
