// The cross-language scope vector: the Python suite checks the same file.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { DEFAULT_SALT, scopeForApiKey } from "limiterd-client";
import { REPO } from "./harness.js";

interface Case { key: string; salt?: string; salt_hex?: string; scope: string }
const doc = JSON.parse(readFileSync(join(REPO, "tests/data/scope_vectors.json"), "utf8")) as {
  default_salt: string; cases: Case[];
};

test("the default salt is Python's", () => {
  assert.equal(DEFAULT_SALT, doc.default_salt);
});

test("every vector gives the same scope as Python's scope_for_api_key", () => {
  assert.ok(doc.cases.length >= 8);
  for (const c of doc.cases) {
    const salt = c.salt_hex !== undefined ? Buffer.from(c.salt_hex, "hex") : c.salt;
    assert.equal(scopeForApiKey(c.key, salt === undefined ? {} : { salt }), c.scope, JSON.stringify(c.key));
  }
});

test("an empty key is refused", () => {
  assert.throws(() => scopeForApiKey(""), /key: must be a non-empty API key/);
});
