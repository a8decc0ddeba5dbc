"""Request-time adapter merges: what a request's `merged_adapters` resolves to, and how the caches key it.

A merge is served like any adapter: loaded once (its sources fetched and merged on a loader thread), kept in a
device slot and the host tier, and reused by every request asking for the same merge. Its cache key names its
sources and digests everything that decides its weights — each source's version (sha256), the weights and the
strategy — so a re-uploaded source or other weights never meet an old merge, and a deleted source's merges are
dropped with it (`key_sources`). Adapter ids never contain ':', ',' or '@', so these keys meet no adapter's.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from svd_adapters.merge import MergeOptions

PREFIX = "merge:"


@dataclass(frozen=True)
class MergeSpec:
    sources: tuple[tuple[str, str], ...]  # (adapter id, version sha256), in the request's order
    weights: tuple[float, ...]
    options: MergeOptions

    @property
    def digest(self) -> str:
        canon = json.dumps({"sources": self.sources, "weights": self.weights, "strategy": self.options.strategy,
                            "density": self.options.density, "sign": self.options.majority_sign_method},
                           separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    @property
    def label(self) -> str:
        """What responses name the merge by: merge:<id>,<id>,…"""
        return PREFIX + ",".join(adapter_id for adapter_id, _ in self.sources)

    @property
    def cache_key(self) -> str:
        return f"{self.label}@{self.digest}"

    @property
    def seed(self) -> int:
        """DARE's drop seed: the same merge drops the same entries on every replica."""
        return int(self.digest[:15], 16)


def key_id(cache_key: str) -> str:
    """The id part of a device-cache key (`id`, `id@sha256`, or a merge's `merge:a,b@digest`)."""
    return cache_key.partition("@")[0]


def key_sources(cache_key: str) -> tuple[str, ...]:
    """The stored adapters a cache key's contents come from: its own id, or a merge's sources."""
    name = key_id(cache_key)
    return tuple(name[len(PREFIX):].split(",")) if name.startswith(PREFIX) else (name,)
