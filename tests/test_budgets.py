"""One budget per model class (issue 10, item 1): every model string a config rule matches
draws on that rule's one bucket, as the provider counts a class's limit across its versions
and aliases. Through a real daemon on the built-in defaults, and the config that names them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from limiterd.config.loader import ConfigError, load_config, parse_config
from limiterd.config.model import Budget, Limits
from limiterd.server import running_server
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc

Code = grpc.StatusCode
SCOPE = "0123abcd" * 8

# The model strings that each got a full 30,000-token budget before (issue 10).
SONNET_CLASS = (
    "claude-sonnet-4-5",
    "claude-sonnet-4-5-20250929",
    "claude-sonnet-4-20250514",
    "claude-sonnet-4-5-preview",
    "claude-sonnet-4-5-my-alias",
)


@pytest.fixture
async def stubs() -> AsyncIterator[tuple[pb_grpc.LimiterStub, pb_grpc.AdminStub]]:
    async with running_server(config=load_config(None)) as srv:  # the built-in defaults
        async with grpc.aio.insecure_channel(srv.target) as ch:
            yield pb_grpc.LimiterStub(ch), pb_grpc.AdminStub(ch)


def big(model: str) -> pb.AcquireRequest:
    return pb.AcquireRequest(scope=SCOPE, model=model, input_tokens=29_000,
                             max_output_tokens=1, max_wait_ms=0)


async def test_versions_and_aliases_share_one_budget(
    stubs: tuple[pb_grpc.LimiterStub, pb_grpc.AdminStub],
) -> None:
    limiter, admin = stubs
    first = await limiter.Acquire(big(SONNET_CLASS[0]))
    assert first.reserved_input_tokens == 29_000
    for model in SONNET_CLASS[1:]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await limiter.Acquire(big(model))
        assert e.value.code() == Code.RESOURCE_EXHAUSTED, model
    # A trailing space, or a glob, is a mistake or a try for a budget of its own: refused.
    for model in ("claude-sonnet-4-5 ", "claude-sonnet-4*", "claude sonnet", "claude-[s]"):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await limiter.Acquire(big(model))
        assert e.value.code() == Code.INVALID_ARGUMENT, model
        assert e.value.details().startswith("model: "), e.value.details()
    # The class's budget is shown by its name; another class keeps its own.
    haiku = await limiter.Acquire(big("claude-haiku-4-5"))
    assert haiku.reserved_input_tokens == 29_000
    buckets = (await admin.GetBuckets(pb.GetBucketsRequest())).buckets
    assert sorted(b.model for b in buckets) == ["claude-haiku-4*", "claude-sonnet-4*"]
    sonnet = next(b for b in buckets if b.model == "claude-sonnet-4*")
    level = {d.name: d.level for d in sonnet.dimensions}["input_tokens"]
    # 30,000 - 29,000, less the refill allowance charged to a take from full (0.1 s at 500
    # a second), plus a moment's refill
    assert 950 <= level < 1_100
    # A filter by a model id shows the budget it spends.
    shown = (await admin.GetBuckets(pb.GetBucketsRequest(model="claude-sonnet-4-5-x"))).buckets
    assert [b.model for b in shown] == ["claude-sonnet-4*"]


async def test_a_pause_holds_the_whole_class(
    stubs: tuple[pb_grpc.LimiterStub, pb_grpc.AdminStub],
) -> None:
    limiter, _ = stubs
    g = await limiter.Acquire(pb.AcquireRequest(scope=SCOPE, model="claude-sonnet-4-5",
                                                input_tokens=10, max_output_tokens=10))
    await limiter.Report(pb.ReportRequest(reservation_id=g.reservation_id,
                                          outcome=pb.RATE_LIMITED, retry_after_ms=60_000))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await limiter.Acquire(pb.AcquireRequest(scope=SCOPE, model="claude-sonnet-4-20250514",
                                                input_tokens=10, max_output_tokens=10))
    assert e.value.code() == Code.RESOURCE_EXHAUSTED


A = "a" * 64  # a configured scope (a key's hash)
GROUPED = f"""
[models."claude-sonnet-4*"]
group = "sonnet"
input_tokens_per_minute = 30000
[models."claude-3-7-sonnet*"]
group = "sonnet"
input_tokens_per_minute = 30000
[models."claude-haiku-4*"]
input_tokens_per_minute = 50000
[[scopes]]
scope = "{A}"
alias = "a"
[scopes.models."claude-3-7-sonnet*"]
input_tokens_per_minute = 90000
[scopes.models."claude-haiku-4-5-x"]
max_concurrent = 2
"""


def test_a_group_names_one_budget_for_several_rules() -> None:
    cfg = parse_config(GROUPED, "g.toml")
    sonnet = Budget("sonnet", Limits(input_tokens_per_minute=30_000))
    assert cfg.budget_for("b", "claude-sonnet-4-5") == sonnet
    assert cfg.budget_for("b", "claude-3-7-sonnet-latest") == sonnet
    assert cfg.budget_for("b", "claude-haiku-4-5") == Budget(
        "claude-haiku-4*", Limits(input_tokens_per_minute=50_000))
    # A scope's rule overrides the group its pattern falls under, for every member.
    raised = Budget("sonnet", Limits(input_tokens_per_minute=90_000))
    assert cfg.budget_for(A, "claude-3-7-sonnet-latest") == raised
    assert cfg.budget_for(A, "claude-sonnet-4-5") == raised
    # A narrower scope rule carves out a budget of its own, on top of the default's fields.
    assert cfg.budget_for(A, "claude-haiku-4-5-x") == Budget(
        "claude-haiku-4-5-x", Limits(input_tokens_per_minute=50_000, max_concurrent=2))
    assert cfg.budget_limits(A, "sonnet") == raised.limits
    assert cfg.budget_for("b", "gpt-4o") is None


@pytest.mark.parametrize(
    ("toml", "problem"),
    [('[models.a]\ngroup = "x y"\n',
      'models.a.group: must be 1 to 64 characters of A-Z a-z 0-9 . _ -, got "x y"'),
     ('[models.a]\ngroup = 3\n',
      "models.a.group: must be 1 to 64 characters of A-Z a-z 0-9 . _ -, got 3"),
     ('[models.a]\ngroup = "g"\nrequests_per_minute = 1\n'
      '[models.b]\ngroup = "g"\nrequests_per_minute = 2\n',
      'models.b.group: rules in group "g" must have the same limits; "a" has different ones'),
     ('[models.a]\nrequests_per_minute = 1\n[models.b]\ngroup = "a"\nrequests_per_minute = 1\n',
      'models.b.group: "a" is also a model rule\'s pattern; pick another name')],
)
def test_bad_groups_are_named(tmp_path: Path, toml: str, problem: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == (f"{path}: {problem}",)
