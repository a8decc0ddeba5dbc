"""Store faults at API level (issue #5).

Redis: a private redis-server on a free port is stopped while requests run. Adapters already in the engine's
device cache keep serving; cold ones get 503 adapter_unavailable; uploads get 503 store_unavailable; after
Redis restarts on the same port everything works again. With AOF (appendfsync always), every upload answered
201 is still there after Redis is SIGKILLed and restarted: an upload is never acknowledged and lost.
Disk: a real server process SIGKILLed while it takes uploads leaves no corrupt adapter visible, and every 201
survives.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading

import httpx
import pytest

from _reliability import RedisServer, ServiceProcess, assert_error, tiny_factors_dir, upload_files
from adapters_store.disk import DiskStore
from adapters_store.redis_store import RedisStore
from adapters_store.validate import load_adapter

pytestmark = pytest.mark.anyio
__all__ = ["tiny_factors_dir"]  # a fixture

PROMPT = "Hello there"


def gen_body(adapter_id: str | None, max_tokens: int = 4) -> dict:
    return {"adapter_id": adapter_id, "prompt": PROMPT, "max_tokens": max_tokens}


def redis_store(url: str, prefix: str = "faults:") -> RedisStore:
    return RedisStore(url, prefix=prefix, socket_connect_timeout=0.5, socket_timeout=1.0)


async def test_redis_outage_cached_adapters_serve_cold_ones_503_and_all_recover(serve, make_blob, tmp_path):
    redis_srv = RedisServer(tmp_path / "redis", aof=False).start()
    store = redis_store(redis_srv.url)
    try:
        async with serve(store, core_slots=8, lr_slots=4) as client:
            hot = {"hot-osora": make_blob("osora", seed=1), "hot-sorsa": make_blob("sorsa", seed=2)}
            for adapter_id, blob in {**hot, "cold": make_blob("loraxs", seed=3)}.items():
                assert (await client.post("/adapters", **upload_files(blob, adapter_id))).status_code == 201
            expected = {}
            for adapter_id in hot:  # warm the device cache, and note each one's greedy answer
                resp = await client.post("/generate", json=gen_body(adapter_id))
                assert resp.status_code == 200, resp.text
                expected[adapter_id] = resp.json()["text"]

            # requests keep running while Redis goes away under them
            stop = asyncio.Event()
            outcomes: list[tuple[str, int, str]] = []

            async def hammer(adapter_id: str) -> None:
                while not stop.is_set():
                    resp = await client.post("/generate", json=gen_body(adapter_id))
                    outcomes.append((adapter_id, resp.status_code, resp.json().get("text", "")))

            workers = [asyncio.ensure_future(hammer(a)) for a in hot for _ in range(2)]
            await asyncio.sleep(0.2)
            await asyncio.to_thread(redis_srv.stop, signal.SIGTERM)
            during = len(outcomes)

            # cached adapters keep serving, with the same answers
            for adapter_id in hot:
                resp = await client.post("/generate", json=gen_body(adapter_id))
                assert resp.status_code == 200, resp.text
                assert resp.json()["text"] == expected[adapter_id]
            # the base model too
            assert (await client.post("/generate", json=gen_body(None))).status_code == 200
            # a cold adapter cannot be fetched: 503 with a clear message and Retry-After
            cold = await client.post("/generate", json=gen_body("cold"))
            assert_error(cold, 503, "adapter_unavailable", "cold", "not cached on this replica", "unreachable", "retry")
            assert int(cold.headers["retry-after"]) >= 1
            # streaming: the same error before any text, with its status
            assert_error(await client.post("/generate", json={**gen_body("cold"), "stream": True}), 503, "adapter_unavailable")
            # uploads, listing and reads fail cleanly
            up = await client.post("/adapters", **upload_files(make_blob("osora", seed=9), "during-outage"))
            assert_error(up, 503, "store_unavailable", "redis", "unavailable")
            assert int(up.headers["retry-after"]) >= 1
            assert_error(await client.get("/adapters"), 503, "store_unavailable")
            assert_error(await client.get("/adapters/cold"), 503, "store_unavailable")
            health = (await client.get("/health")).json()
            assert health["status"] == "degraded" and health["store"]["ok"] is False

            await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*workers)
            assert len(outcomes) > during  # requests really ran during the outage
            assert all(status == 200 and text == expected[a] for a, status, text in outcomes), [
                o for o in outcomes if o[1] != 200 or o[2] != expected[o[0]]
            ][:3]

            # Redis back on the same port (without persistence it came back empty): the service reconnects
            await asyncio.to_thread(redis_srv.start)
            health = (await client.get("/health")).json()
            assert health["status"] == "ok" and health["store"]["ok"] is True
            assert (await client.get("/adapters")).json()["count"] == 0  # no persistence: Redis lost them
            assert_error(await client.post("/generate", json=gen_body("cold")), 404, "adapter_not_found")
            assert (await client.post("/adapters", **upload_files(make_blob("loraxs", seed=3), "cold"))).status_code == 201
            resp = await client.post("/generate", json=gen_body("cold"))
            assert resp.status_code == 200, resp.text
            assert (await client.post("/adapters", **upload_files(make_blob("osora", seed=9), "during-outage"))).status_code == 201
    finally:
        store.close()
        redis_srv.stop(signal.SIGKILL)


async def test_redis_with_aof_never_loses_an_acknowledged_upload(serve, make_blob, tmp_path):
    """Uploads run from 6 clients; Redis (appendfsync always) is SIGKILLed among them, then restarted from its AOF:
    every 201 is there, byte for byte, and serves; every failure was a clean 503."""
    redis_srv = RedisServer(tmp_path / "redis-aof", aof=True).start()
    store = redis_store(redis_srv.url)
    blobs = {f"ad-{i:03d}": make_blob(("osora", "loraxs", "sorsa", "lora")[i % 4], rank=2 + i % 3, seed=i) for i in range(160)}
    acked: set[str] = set()
    failed: dict[str, int] = {}
    killed_at_ack = 12
    try:
        async with serve(store, core_slots=8, lr_slots=4) as client:
            ids = iter(blobs)
            killed = asyncio.Event()

            async def uploader() -> None:
                for adapter_id in ids:
                    resp = await client.post("/adapters", **upload_files(blobs[adapter_id], adapter_id))
                    if resp.status_code == 201:
                        acked.add(adapter_id)
                    else:
                        assert_error(resp, 503, "store_unavailable")
                        failed[adapter_id] = resp.status_code
                    if len(acked) >= killed_at_ack and not killed.is_set():
                        killed.set()
                        redis_srv.stop(signal.SIGKILL)  # at once, from inside the upload loop
                    if killed.is_set() and len(failed) >= 10:
                        return

            await asyncio.gather(*(uploader() for _ in range(6)))
            assert killed.is_set() and len(acked) >= killed_at_ack and len(failed) >= 10

            await asyncio.to_thread(redis_srv.start)
            listing = (await client.get("/adapters")).json()
            listed = {a["adapter_id"] for a in listing["adapters"]}
            assert acked <= listed, f"acknowledged but lost: {sorted(acked - listed)}"
            assert listed <= acked | set(failed)  # nothing from nowhere (a 503'd upload may have landed)
            for adapter_id in listed:  # whole, byte for byte
                assert store.get_blob(adapter_id) == blobs[adapter_id]
            # cold after the restart: fetched from the recovered Redis and served
            for adapter_id in sorted(acked)[:4]:
                resp = await client.post("/generate", json=gen_body(adapter_id))
                assert resp.status_code == 200, resp.text
    finally:
        store.close()
        redis_srv.stop(signal.SIGKILL)
    assert "AOF" in redis_srv.log() or "append only" in redis_srv.log().lower()


def test_disk_store_server_sigkilled_mid_upload_leaves_no_corrupt_adapter(
    tmp_path, make_blob, tiny_factors, tiny_factors_dir, serve
):
    """A real server process takes uploads from 4 clients and is SIGKILLed among them (the store fsyncs, so the
    kill lands mid-write often): afterwards every visible adapter is whole and valid, every 201 is visible, and
    the reopened store has no leftovers."""
    store_dir = tmp_path / "store"
    svc = ServiceProcess(tmp_path / "home", "--store", str(store_dir), factors_dir=tiny_factors_dir).start()
    blobs = {f"d-{i:03d}": make_blob(("sorsa", "lora", "osora", "loraxs")[i % 4], rank=8, seed=i) for i in range(400)}
    acked: set[str] = set()
    lock = threading.Lock()
    ids = iter(blobs)
    kill_after = 15

    def uploader() -> None:
        with httpx.Client(base_url=svc.url, timeout=30) as client:
            for adapter_id in ids:
                try:
                    resp = client.post("/adapters", **upload_files(blobs[adapter_id], adapter_id))
                except httpx.HTTPError:
                    return  # the server is gone
                if resp.status_code == 201:
                    with lock:
                        acked.add(adapter_id)
                        if len(acked) == kill_after:
                            svc.send(signal.SIGKILL)

    try:
        threads = [threading.Thread(target=uploader) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert svc.wait(timeout=10) == -signal.SIGKILL
    finally:
        svc.kill()
    assert len(acked) >= kill_after

    leftovers = [n for n in os.listdir(store_dir / "adapters") if n.startswith(".tmp-")]
    reopened = DiskStore(store_dir)  # opening cleans up what the killed writer left
    try:
        records = {r.adapter_id: r for r in reopened.list()}
        assert acked <= set(records), f"acknowledged but lost: {sorted(acked - set(records))}"
        for adapter_id, record in records.items():
            blob = reopened.get_blob(adapter_id)
            assert blob == blobs[adapter_id] and hashlib.sha256(blob).hexdigest() == record.sha256
            load_adapter(blob, tiny_factors)  # and valid for serving
        names = sorted(os.listdir(store_dir / "adapters"))
        expected = sorted(f"{a}{suffix}" for a, r in records.items() for suffix in (".json", f".{r.sha256}.safetensors"))
        assert names == expected, f"leftovers after reopen (before: {leftovers})"

        async def still_serves() -> None:  # a new server on the same directory serves what survived
            async with serve(reopened) as client:
                for adapter_id in sorted(acked)[-3:]:
                    resp = await client.post("/generate", json=gen_body(adapter_id))
                    assert resp.status_code == 200, resp.text

        asyncio.run(still_serves())
    finally:
        reopened.close()
