"""The key's limits in the goodput benchmark, shared by the provider, the apps and limiterd.

Scaled down so that 18 agents contend for them within a one-minute run."""

from __future__ import annotations

from limiterd.config.loader import parse_config
from limiterd.config.model import Config

MODEL = "claude-sonnet-4-5"
KEY_LIMITS = {"rpm": 120, "itpm": 60_000, "otpm": 12_000}


def limiter_config(limits: dict[str, int]) -> Config:
    return parse_config(f"""
[models."{MODEL}"]
requests_per_minute = {limits["rpm"]}
input_tokens_per_minute = {limits["itpm"]}
output_tokens_per_minute = {limits["otpm"]}
""", "<goodput>")


def limiter_toml(limits: dict[str, int]) -> str:
    return (f'[models."{MODEL}"]\nrequests_per_minute = {limits["rpm"]}\n'
            f'input_tokens_per_minute = {limits["itpm"]}\n'
            f'output_tokens_per_minute = {limits["otpm"]}\n')
