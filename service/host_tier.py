"""Host-memory tier of the adapter cache: validated adapters' slot terms kept in RAM, LRU by bytes.

The device cache (`service.adapter_cache`) holds as many adapters as it has slots; one it evicts used to come
back through the store (a Redis round trip or a file read), the sha256 check and the full validation — 2–6 ms for
an OSoRA / LoRA-XS adapter and ~100 ms for a SORSA / LoRA one — every time its tenant returned. This tier keeps
what that work produced (`Adapter.terms`: host tensors, never written to afterwards: slot writes copy them), so
an evicted adapter is back in a slot after one copy (LoRAX's tiered weight cache: device, host, store).

Entries are keyed by id@sha256 only: the version is the content, so a re-uploaded adapter never meets its old
terms here. A key without a version (the API could not reach the store) finds the newest entry of its id, as it
finds any resident copy in the device cache. Loader threads put and the engine thread gets, so it has a lock.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from service.merges import key_sources
from svd_adapters.adapter import LayerTerms

_FIELDS = ("C", "o", "d", "A", "B")


def terms_bytes(terms: dict[str, LayerTerms]) -> int:
    """Bytes held by an adapter's slot terms."""
    return sum(t.numel() * t.element_size() for lt in terms.values() for f in _FIELDS
               if (t := getattr(lt.terms, f)) is not None)


@dataclass
class HostEntry:
    method: str
    terms: dict[str, LayerTerms]
    nbytes: int


class HostTier:
    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"the host adapter cache's capacity must be ≥ 0 bytes, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self._entries: OrderedDict[str, HostEntry] = OrderedDict()  # LRU order: oldest first
        self._lock = threading.Lock()
        self.used = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> HostEntry | None:
        """The entry of an id@sha256 key (refreshed as most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def newest(self, adapter_id: str) -> str | None:
        """The most recently used versioned key of `adapter_id` held here, or None."""
        with self._lock:
            return next((k for k in reversed(self._entries) if k.partition("@")[0] == adapter_id), None)

    def put(self, key: str, method: str, terms: dict[str, LayerTerms]) -> bool:
        """Keep an adapter's terms (a versioned key only), evicting the least recently used entries to make room;
        False when it is not kept (no version, or larger than the whole tier)."""
        if "@" not in key:
            return False
        nbytes = terms_bytes(terms)
        if nbytes > self.capacity:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.used -= old.nbytes
            while self._entries and self.used + nbytes > self.capacity:
                _, victim = self._entries.popitem(last=False)
                self.used -= victim.nbytes
                self.evictions += 1
            self._entries[key] = HostEntry(method, terms, nbytes)
            self.used += nbytes
            return True

    def drop(self, adapter_id: str) -> int:
        """Forget every version of an adapter (deleted upstream), and every merge of it; returns how many entries
        went."""
        with self._lock:
            keys = [k for k in self._entries if adapter_id in key_sources(k)]
            for k in keys:
                self.used -= self._entries.pop(k).nbytes
            return len(keys)

    def stats(self) -> dict:
        with self._lock:
            return {"capacity_bytes": self.capacity, "used_bytes": self.used, "entries": len(self._entries),
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
