"""Pinning: PUT /adapters/{id}/pin loads an adapter into a device slot now and keeps it there through any amount
of LRU traffic, until DELETE /adapters/{id}/pin or the adapter's deletion; at most half of a pool is pinned."""
from __future__ import annotations

import asyncio

import pytest

from _reliability import wait_until

pytestmark = pytest.mark.anyio


def resident(client, adapter_id: str) -> dict | None:
    """The device-cache entry of an adapter (any version) on the app's engine: {pinned, pool} or None."""
    for key, res in list(client.app.state.engine.cache.resident.items()):
        if key.partition("@")[0] == adapter_id:
            return {"pinned": res.pinned, "pool": res.pool}
    return None


async def test_a_pinned_adapter_is_loaded_at_once_and_survives_lru_traffic(serve, store, make_blob):
    async with serve(store, core_slots=5, lr_slots=3) as client:  # 4 core slots: 2 may be pinned
        for i in range(7):
            r = await client.post("/adapters", files={"file": ("a.safetensors", make_blob("osora", 2, seed=i))},
                                  data={"adapter_id": f"a{i}"})
            assert r.status_code == 201, r.text
        r = await client.put("/adapters/a0/pin")
        assert r.status_code == 200 and r.json() == {"adapter_id": "a0", "pinned": True}
        # loaded without any request asking for it
        await asyncio.to_thread(wait_until, lambda: resident(client, "a0") == {"pinned": True, "pool": "core"}, 10.0,
                                what="a0 pinned in a core slot")
        loads = client.app.state.engine.counters["adapter_loads"]
        for rounds in range(2):  # six other adapters through three free core slots: the LRU evicts all the time
            for i in range(1, 7):
                r = await client.post("/generate", json={"adapter_id": f"a{i}", "prompt": "hi", "max_tokens": 2})
                assert r.status_code == 200, r.text
        assert resident(client, "a0") == {"pinned": True, "pool": "core"}
        assert client.app.state.engine.cache.evictions > 0
        r = await client.post("/generate", json={"adapter_id": "a0", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and client.app.state.engine.counters["adapter_loads"] >= loads
        health = (await client.get("/health")).json()
        assert health["engine"]["adapters_pinned"] == 1
        assert "svdserve_adapters_pinned 1.0" in (await client.get("/metrics")).text

        # half of the 4 core slots: a second pin fits, a third is refused
        assert (await client.put("/adapters/a1/pin")).status_code == 200
        r = await client.put("/adapters/a2/pin")
        assert r.status_code == 409 and r.json()["error"]["code"] == "pin_limit", r.text
        assert "DELETE /adapters/{id}/pin" in r.json()["error"]["message"]
        assert (await client.put("/adapters/a1/pin")).status_code == 200  # pinning again is no new pin

        # unpinned: evictable again, and the LRU takes it
        r = await client.delete("/adapters/a0/pin")
        assert r.status_code == 200 and r.json()["pinned"] is False
        await asyncio.to_thread(wait_until, lambda: (resident(client, "a0") or {}).get("pinned") is False, 10.0,
                                what="a0 unpinned")
        for i in range(2, 7):
            await client.post("/generate", json={"adapter_id": f"a{i}", "prompt": "hi", "max_tokens": 2})
        assert resident(client, "a0") is None

        # deleting a pinned adapter drops its pin (and its slot)
        assert (await client.delete("/adapters/a1")).status_code == 204
        await asyncio.to_thread(wait_until, lambda: resident(client, "a1") is None, 10.0, what="a1 evicted")
        assert (await client.get("/health")).json()["engine"]["adapters_pinned"] == 0
        assert (await client.put("/adapters/a2/pin")).status_code == 200  # room again

        # unknown ids answer 404
        r = await client.put("/adapters/nope/pin")
        assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
