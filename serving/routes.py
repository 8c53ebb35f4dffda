"""The gateway's live routing: which served model each alias points at, the canary share, and how many
requests each served model has in flight (so a deploy can drain the old adapter before unloading it).

The event loop runs one coroutine at a time, so replacing the alias map is atomic: a request resolves its
target once, before it goes upstream, and keeps that target to the end even if the alias moves meanwhile.
"""

from __future__ import annotations

import collections
import random

CHAMPION, CHALLENGER = "champion", "challenger"


class RouteConflict(Exception):
    """A compare-and-set switch found the alias pointing somewhere else than the caller expected."""


class RouteTable:
    def __init__(self, aliases: dict[str, str], *, canary_share: float = 0.0, seed: int | None = None) -> None:
        self.aliases = dict(aliases)
        self.canary_share = canary_share
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.switches = 0
        self._rng = random.Random(seed)

    def resolve(self, alias: str) -> str | None:
        """The served model for ``alias`` (``None`` if it is not an alias); canary traffic goes from a champion
        (``champion``, ``NAME@champion``) to its challenger."""
        aliases = self.aliases
        if self.canary_share > 0 and alias.endswith(CHAMPION) and alias.rpartition("@")[2] == CHAMPION:
            challenger = aliases.get(alias[: -len(CHAMPION)] + CHALLENGER)
            if challenger is not None and self._rng.random() < self.canary_share:
                return challenger
        return aliases.get(alias)

    def switch(self, alias: str, target: str, *, expect: str | None = None) -> str | None:
        """Point ``alias`` at ``target`` in one step; with ``expect``, only if it still points there."""
        previous = self.aliases.get(alias)
        if expect is not None and previous != expect:
            raise RouteConflict(f"alias {alias!r} points at {previous!r}, not {expect!r}")
        self.aliases = {**self.aliases, alias: target}
        self.switches += 1
        return previous

    def replace(self, aliases: dict[str, str]) -> None:
        """Make ``aliases`` the whole map in one step (a registry refresh); each changed alias counts as a switch."""
        old = self.aliases
        self.switches += sum(old.get(alias) != target for alias, target in aliases.items())
        self.aliases = dict(aliases)

    def set_canary(self, share: float) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"canary share {share} is not between 0 and 1")
        self.canary_share = share

    def enter(self, target: str) -> None:
        """A request for ``target`` starts (:meth:`leave` when it ends; ``Gateway.slot`` does both)."""
        self.in_flight[target] += 1

    def leave(self, target: str) -> None:
        counts = self.in_flight
        counts[target] -= 1
        if not counts[target]:
            del counts[target]

    def snapshot(self) -> dict[str, object]:
        return {
            "aliases": dict(self.aliases),
            "canary_share": self.canary_share,
            "in_flight": dict(self.in_flight),
            "switches": self.switches,
        }
