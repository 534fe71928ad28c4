"""The provider's rate-limit headers, read at the API edge: the ledger takes numbers.

Anthropic answers with `anthropic-ratelimit-{requests,input-tokens,output-tokens}-{limit,
remaining}`; Report carries them in `provider.headers`. A missing, negative or non-numeric
value is unknown (None), never an error: headers are advice, not a request field.
"""

from __future__ import annotations

from collections.abc import Mapping

from limiterd.ledger.model import ProviderLimits

_DIMS = ("requests", "input-tokens", "output-tokens")  # in RATE_DIMS order


def provider_limits(headers: Mapping[str, str] | None) -> ProviderLimits | None:
    """What the headers say, per rate dimension; None when they say nothing."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    limits = tuple(_count(lowered.get(f"anthropic-ratelimit-{d}-limit")) for d in _DIMS)
    remaining = tuple(_count(lowered.get(f"anthropic-ratelimit-{d}-remaining")) for d in _DIMS)
    if all(v is None for v in (*limits, *remaining)):
        return None
    return ProviderLimits(limits, remaining)  # type: ignore[arg-type]


def _count(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None
