"""Where the shared ledger keeps things in Redis. See lua/common.lua for the keys of one tag.

Every key of one scope x model starts with the same base, "<prefix>:{<n>:<scope>:<model>}:",
whose braces are a Cluster hash tag: a script touches one slot. The length prefix keeps
("a:b", "c") and ("a", "b:c") apart. Outside the tags there are only a few keys, read and
written by the sidecars directly and never inside a script: the reservation index
(reservation id -> base, so any sidecar can settle any reservation), the sweep index (base ->
when it next needs a sweep), the epoch and lost-data mark, and the wake channel.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "limiterd"

    def base(self, scope: str, model: str) -> str:
        return f"{self.prefix}:{{{len(scope)}:{scope}:{model}}}:"

    def parse(self, base: str) -> tuple[str, str] | None:
        """(scope, model) of a base, or None if it is not one of ours."""
        head = f"{self.prefix}:{{"
        if not base.startswith(head) or not base.endswith("}:"):
            return None
        n, sep, rest = base[len(head):-2].partition(":")
        if not sep or not n.isdigit() or len(rest) <= int(n) or rest[int(n)] != ":":
            return None
        return rest[:int(n)], rest[int(n) + 1:]

    def bucket(self, base: str) -> str:
        return base + "b"

    def overload_base(self, budget: str) -> str:
        """A model budget's overload mark (lua/overload.lua): a provider's overload is not a
        key's, so it is the budget's alone, across scopes, in a tag of its own."""
        return f"{self.prefix}:{{ov:{budget}}}:"

    def overload_mark(self, budget: str) -> str:
        return self.overload_base(budget) + "o"

    def reservation_index(self, reservation_id: str) -> str:
        return f"{self.prefix}:rid:{reservation_id}"

    @property
    def sweep_index(self) -> str:
        return f"{self.prefix}:tags"

    @property
    def epoch(self) -> str:
        """A random value set once: when it changes or vanishes, Redis lost its data."""
        return f"{self.prefix}:epoch"

    @property
    def lost_mark(self) -> str:
        """Set for one refill period after a loss: buckets created meanwhile start empty."""
        return f"{self.prefix}:lost"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:wake"
