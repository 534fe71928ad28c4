"""The gateway's pure parts: the SSE usage tap, header rules, request checks, its config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limiterd.gateway.call import Call
from limiterd.gateway.config import (
    GatewayConfig,
    GatewayConfigError,
    ModelPolicy,
    load_gateway_config,
    parse_gateway_config,
)
from limiterd.gateway.wire import SseTap, api_key, forward_headers, json_usage
from limiterd_client import Usage


def sse(*events: tuple[str, dict[str, object]], sep: str = "\n") -> bytes:
    return "".join(f"event: {n}{sep}data: {json.dumps(d)}{sep}{sep}"
                   for n, d in events).encode()


STREAM = sse(
    ("message_start", {"type": "message_start", "message": {"usage": {
        "input_tokens": 100, "cache_creation_input_tokens": 20,
        "cache_read_input_tokens": 500, "output_tokens": 1}}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "thinking_delta", "thinking": "hmm, é"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "text_delta", "text": "Hello there"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 2,
                             "delta": {"type": "input_json_delta", "partial_json": '{"a":'}}),
    ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 42}}),
    ("message_stop", {"type": "message_stop"}),
)


def tap_of(chunks: list[bytes]) -> SseTap:
    tap = SseTap()
    for c in chunks:
        tap.feed(c)
    return tap


def test_tap_reads_the_usage_by_anthropics_rules() -> None:
    tap = tap_of([STREAM])
    assert tap.finished and tap.error is None and tap.events == 7
    assert tap.usage(estimated_input=9) == Usage(120, 42)  # cache reads are not input
    assert tap.delivered_chars == len("hmm, é") + len("Hello there") + len('{"a":')


@settings(derandomize=True, max_examples=200)  # the same verdict every run
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_tap_sees_the_same_whatever_the_chunking(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in zip(points, points[1:], strict=False)]
    whole = tap_of([STREAM])
    split = tap_of(chunks)
    assert (split.usage(9), split.delivered_chars, split.events, split.finished) == \
        (whole.usage(9), whole.delivered_chars, whole.events, whole.finished)


def test_tap_takes_crlf_framing_too() -> None:
    assert tap_of([sse(*[("message_stop", {"type": "message_stop"})], sep="\r\n")]).finished


def test_a_stream_cut_short_is_estimated_from_what_was_delivered() -> None:
    cut = STREAM[:STREAM.index(b"event: message_delta")]
    tap = tap_of([cut])
    assert not tap.finished
    # input from message_start; output from 22 delivered characters / 3.5
    assert tap.usage(estimated_input=9) == Usage(120, 7)
    assert tap_of([]).usage(estimated_input=9) == Usage(9, 0)


def test_tap_notes_an_error_event() -> None:
    tap = tap_of([sse(("error", {"type": "error", "error": {"type": "overloaded_error",
                                                             "message": "Overloaded"}}))])
    assert tap.error is not None and tap.error.kind == "overloaded_error"


def test_json_usage() -> None:
    assert json_usage(b'{"usage": {"input_tokens": 3, "output_tokens": 4}}') == Usage(3, 4)
    assert json_usage(b"not json") is None
    assert json_usage(b'{"type": "error"}') is None


def test_headers_forwarded_and_the_key_found() -> None:
    given_ = [("Host", "x"), ("Connection", "keep-alive"), ("X-Api-Key", "k"),
              ("x-limiterd-user", "u"), ("anthropic-beta", "a"), ("anthropic-beta", "b"),
              ("Content-Length", "10"), ("Transfer-Encoding", "chunked")]
    assert forward_headers(given_) == [("X-Api-Key", "k"), ("anthropic-beta", "a"),
                                       ("anthropic-beta", "b")]
    assert ("Content-Length", "10") in forward_headers(given_, same_body=True)
    assert api_key({"x-api-key": " k1 "}) == "k1"
    assert api_key({"authorization": "Bearer t2"}) == "t2"
    assert api_key({"authorization": "Basic t2"}) == ""


def test_fallback_rewrite_caps_max_tokens_only_above_a_thinking_budget() -> None:
    body = {"model": "big", "max_tokens": 4000, "messages": [],
            "thinking": {"type": "enabled", "budget_tokens": 2000}}
    call = Call(json.dumps(body).encode(), body, "big", 4000, False, "s", ())
    small = call.for_model("small", 3000)
    assert (small.model, small.max_tokens) == ("small", 3000)
    assert json.loads(small.raw) == {**body, "model": "small", "max_tokens": 3000}
    assert call.for_model("small", 1000).max_tokens == 4000  # would not fit the budget
    assert call.for_model("small", None).max_tokens == 4000


def test_config_file() -> None:
    cfg = parse_gateway_config("""
[gateway]
max_wait_s = 5
estimate = "count_tokens"

[models."a"]
retries = 2
fallback = ["b"]

[models."b"]
max_tokens = 100
""", "g.toml")
    assert cfg.max_wait_s == 5 and cfg.estimate == "count_tokens"
    assert cfg.policy("a") == ModelPolicy(retries=2, fallback=("b",))
    assert cfg.policy("zzz") == ModelPolicy()


@pytest.mark.parametrize(("text", "message"), [
    ("[gateway]\nmax_wait = 5\n", "g.toml: gateway.max_wait: unknown key"),
    ("[gateway]\nmax_wait_s = -1\n", "g.toml: gateway.max_wait_s: must be a number >= 0"),
    ('[gateway]\nestimate = "exact"\n', "gateway.estimate: must be one of chars, count_tokens"),
    ('[models."a"]\nretries = 1.5\n', "models.a.retries: must be an integer >= 0"),
    ('[models."a"]\nfallback = ["a"]\n', "models.a.fallback: must not name the model itself"),
    ('[models."a"]\nretry = 1\n', "models.a.retry: unknown key"),
    ("[upstream]\n", "g.toml: upstream: unknown section"),
    ("[gateway\n", "g.toml: not valid TOML"),
])
def test_config_mistakes_name_the_key(text: str, message: str) -> None:
    with pytest.raises(GatewayConfigError, match=message.replace(".", r"\.")):
        parse_gateway_config(text, "g.toml")


def test_flags_are_checked_too(tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError, match="upstream: must be an http"):
        load_gateway_config(None, GatewayConfig(upstream="api.anthropic.com"))
    with pytest.raises(GatewayConfigError, match="cannot read"):
        load_gateway_config(str(tmp_path / "missing.toml"), GatewayConfig())
