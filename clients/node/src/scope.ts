// Scopes: what the daemon sees instead of an API key.
import { createHmac } from "node:crypto";

export const DEFAULT_SALT = "limiterd-scope-v1";

/**
 * HMAC-SHA256 (lower-case hex) of the API key keyed by `salt`, so the raw key never leaves
 * the process. Byte-identical to the Python client's `scope_for_api_key` (both suites check
 * tests/data/scope_vectors.json): every app that shares a daemon and a key, in either
 * language, lands in the same scope when it uses the same salt.
 */
export function scopeForApiKey(key: string, options: { salt?: string | Uint8Array } = {}): string {
  if (typeof key !== "string" || key.length === 0) {
    throw new TypeError("key: must be a non-empty API key");
  }
  const salt = options.salt ?? DEFAULT_SALT;
  // Strings are UTF-8 on both sides (Python's str.encode()).
  return createHmac("sha256", typeof salt === "string" ? Buffer.from(salt, "utf8") : salt)
    .update(Buffer.from(key, "utf8"))
    .digest("hex");
}
