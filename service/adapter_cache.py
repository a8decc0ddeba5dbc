"""Device adapter cache: which adapter sits in which pool slot, with LRU eviction and pinning.

Two pools (see svd_adapters.batched_linear): "core" slots for OSoRA / LoRA-XS and "lr" slots for
SORSA / LoRA (a merge goes where its terms fit: `svd_adapters.adapter.slot_pool`). Slot 0 of each is the zero
adapter and never handed out. Only the engine thread touches this object, so it needs no lock.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Resident:
    adapter_id: str
    method: str
    pool: str
    slot: int
    refcount: int = 0  # running requests using the slot: never evicted while > 0
    pinned: bool = False
    loaded_at: float = field(default_factory=time.monotonic)


class AdapterCache:
    def __init__(self, core_slots: int, lr_slots: int):
        self.capacity = {"core": core_slots - 1, "lr": lr_slots - 1}
        self.free = {"core": list(range(core_slots - 1, 0, -1)), "lr": list(range(lr_slots - 1, 0, -1))}
        self.resident: OrderedDict[str, Resident] = OrderedDict()  # LRU order: oldest first
        self.hits = self.misses = self.evictions = 0

    def get(self, adapter_id: str) -> Resident | None:
        res = self.resident.get(adapter_id)
        if res is not None:
            self.resident.move_to_end(adapter_id)
        return res

    def acquire(self, adapter_id: str) -> Resident | None:
        """Take a reference on a resident adapter (counts a hit), or None (a miss) if it is not loaded."""
        res = self.get(adapter_id)
        if res is None:
            self.misses += 1
            return None
        self.hits += 1
        res.refcount += 1
        return res

    def release(self, adapter_id: str) -> None:
        res = self.resident.get(adapter_id)
        if res is not None and res.refcount > 0:
            res.refcount -= 1

    def can_place(self, pool: str) -> bool:
        return bool(self.free[pool]) or any(self._evictable(r, pool) for r in self.resident.values())

    def place(self, adapter_id: str, method: str, pool: str) -> tuple[Resident, str | None]:
        """Assign a slot of `pool` (free, else the least recently used unreferenced one). Returns (entry, evicted id)."""
        evicted = None
        if self.free[pool]:
            slot = self.free[pool].pop()
        else:
            victim = next((r for r in self.resident.values() if self._evictable(r, pool)), None)
            if victim is None:
                raise RuntimeError(f"no free {pool} slot: every slot is in use by running requests")
            del self.resident[victim.adapter_id]
            slot, evicted = victim.slot, victim.adapter_id
            self.evictions += 1
        res = Resident(adapter_id, method, pool, slot)
        self.resident[adapter_id] = res
        return res, evicted

    def remove(self, adapter_id: str) -> bool:
        """Forget an adapter (deleted upstream). Its slot is freed once no running request uses it."""
        res = self.resident.get(adapter_id)
        if res is None or res.refcount > 0:
            return False
        del self.resident[adapter_id]
        self.free[res.pool].append(res.slot)
        return True

    def pin(self, adapter_id: str, pinned: bool = True) -> bool:
        res = self.resident.get(adapter_id)
        if res is None:
            return False
        res.pinned = pinned
        return True

    @staticmethod
    def _evictable(res: Resident, pool: str) -> bool:
        return res.pool == pool and res.refcount == 0 and not res.pinned
