"""Reading usage from Anthropic's answers as they pass: the JSON body of a plain call, and a
tap on a server-sent event stream. Shared by the drop-in httpx transport and the gateway.

The tap reads a copy of the bytes as they pass (the stream itself is never held back): it
splits server-sent events, and from `message_start` / `message_delta` takes the usage, from
the deltas the amount of text delivered (the estimate when a stream ends early), and notes an
`error` event.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import Usage

CHARS_PER_TOKEN = 3.5


def usage_of(usage: Mapping[str, Any] | None) -> Usage:
    """Anthropic's counting rule: cache writes count as input, cache reads do not."""
    if not usage:
        return Usage()
    return Usage(int(usage.get("input_tokens") or 0)
                 + int(usage.get("cache_creation_input_tokens") or 0),
                 int(usage.get("output_tokens") or 0))


def json_usage(body: bytes) -> Usage | None:
    """The usage of a non-streamed Messages answer; None when the body has none."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("usage"), dict):
        return None
    return usage_of(doc["usage"])


@dataclass(frozen=True)
class StreamError:
    kind: str
    message: str


class SseTap:
    """Watches an event stream go by. `feed` each chunk as it is forwarded."""

    _DELTA_TEXT = ("text", "thinking", "partial_json")

    def __init__(self) -> None:
        self._buf = b""
        self.input_tokens = 0
        self.output_tokens = 0
        self.delivered_chars = 0
        self.saw_start = False
        self.finished = False  # message_stop seen: the provider's counts are final
        self.error: StreamError | None = None
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        while True:
            cut, sep = _event_end(self._buf)
            if cut < 0:
                return
            raw, self._buf = self._buf[:cut], self._buf[cut + sep:]
            self._event(raw)

    def _event(self, raw: bytes) -> None:
        name, data = b"", []
        for line in raw.splitlines():
            if line.startswith(b"event:"):
                name = line[6:].strip()
            elif line.startswith(b"data:"):
                data.append(line[5:].strip())
        if not data:
            return
        self.events += 1
        if name not in (b"message_start", b"message_delta", b"content_block_delta",
                        b"message_stop", b"error"):
            return
        try:
            doc = json.loads(b"\n".join(data))
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        if name == b"content_block_delta":
            delta = doc.get("delta") or {}
            for key in self._DELTA_TEXT:
                value = delta.get(key)
                if isinstance(value, str):
                    self.delivered_chars += len(value)
        elif name == b"message_start":
            self.saw_start = True
            self._usage((doc.get("message") or {}).get("usage"))
        elif name == b"message_delta":
            self._usage(doc.get("usage"))
        elif name == b"message_stop":
            self.finished = True
        else:
            err = doc.get("error") or {}
            self.error = StreamError(str(err.get("type", "api_error")),
                                     str(err.get("message", "")))

    def _usage(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            return
        seen = usage_of(raw)
        if "input_tokens" in raw or "cache_creation_input_tokens" in raw:
            self.input_tokens = max(self.input_tokens, seen.input_tokens)
        self.output_tokens = max(self.output_tokens, seen.output_tokens)

    def usage(self, estimated_input: int) -> Usage:
        """The provider's counts once the stream finished; before that, the best guess:
        what it said so far, or the estimate for input and the delivered text for output."""
        if self.finished:
            return Usage(self.input_tokens, self.output_tokens)
        return Usage(self.input_tokens or estimated_input,
                     max(self.output_tokens,
                         math.ceil(self.delivered_chars / CHARS_PER_TOKEN)))


def _event_end(buf: bytes) -> tuple[int, int]:
    """Where the first complete event ends, and the length of the blank line after it."""
    best, size = -1, 0
    for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        i = buf.find(sep)
        if i >= 0 and (best < 0 or i < best):
            best, size = i, len(sep)
    return best, size
