"""The HTTP API on the shared Redis store: same contract as on disk, replicas share adapters, Redis down → 503.

Needs a real Redis (SVDSERVE_TEST_REDIS_URL, default redis://127.0.0.1:6379/0). Every test uses its own key
prefix and deletes only its own keys (never FLUSHDB).
"""
from __future__ import annotations

import socket

import pytest

from adapters_store.redis_store import RedisStore
from _reliability import REDIS_URL, assert_error, redis_key_prefix

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

PROMPT = "Hello there"


@pytest.fixture
def redis_space():
    with redis_key_prefix("svdserve-test-api") as space:
        yield space


@pytest.fixture
def redis_client(redis_space):
    return redis_space[0]


@pytest.fixture
def prefix(redis_space):
    return redis_space[1]


@pytest.fixture
def store(prefix):
    s = RedisStore(REDIS_URL, prefix=prefix)
    yield s
    s.close()


@pytest.fixture
def dead_store():
    """A RedisStore pointing at a port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="svdserve-test-api:dead:", socket_connect_timeout=0.5, socket_timeout=0.5)
    yield s
    s.close()


def keys(client, prefix: str) -> set[str]:
    return {k.decode() for k in client.scan_iter(match=prefix + "*")}




async def upload(client, blob: bytes, adapter_id: str | None = None):
    data = {"adapter_id": adapter_id} if adapter_id is not None else {}
    return await client.post("/adapters", files={"file": ("adapter.safetensors", blob)}, data=data)


async def test_adapter_lifecycle_on_redis(serve, store, prefix, redis_client, make_blob):
    blob = make_blob("sorsa", rank=4)
    async with serve(store) as client:
        resp = await upload(client, blob, "r1")
        assert resp.status_code == 201, resp.text
        assert resp.json()["size_bytes"] == len(blob)
        assert keys(redis_client, prefix) == {f"{prefix}adapter:r1:blob", f"{prefix}adapter:r1:meta", f"{prefix}adapters"}
        assert redis_client.get(f"{prefix}adapter:r1:blob") == blob  # durable in Redis before 201

        assert_error(await upload(client, make_blob("osora"), "r1"), 409, "adapter_exists")
        assert store.get_blob("r1") == blob

        listing = (await client.get("/adapters")).json()
        assert [a["adapter_id"] for a in listing["adapters"]] == ["r1"] and listing["adapters"][0]["method"] == "sorsa"
        assert (await client.get("/adapters/r1")).json()["rank"] == 4

        gen = await client.post("/generate", json={"adapter_id": "r1", "prompt": PROMPT, "max_tokens": 6})
        assert gen.status_code == 200, gen.text

        health = (await client.get("/health")).json()
        assert health["status"] == "ok" and health["store"]["backend"] == "redis" and health["store"]["ok"]
        assert health["adapters_cached"] == 1

        assert (await client.delete("/adapters/r1")).status_code == 204
        assert keys(redis_client, prefix) == set()
        assert_error(await client.post("/generate", json={"adapter_id": "r1", "prompt": PROMPT, "max_tokens": 4}), 404, "adapter_not_found")


async def test_bad_uploads_write_nothing_to_redis(serve, store, prefix, redis_client, make_blob):
    good = make_blob("loraxs")
    n = int.from_bytes(good[:8], "little")
    async with serve(store) as client:
        assert_error(await upload(client, good[: 8 + n + 10], "cut"), 400, "truncated")
        assert_error(await upload(client, b"\x80\x04\x95junk", "pkl"), 400, "not_safetensors")
        assert_error(await upload(client, make_blob("osora", rank=12), "wide"), 400, "not_servable")
        assert keys(redis_client, prefix) == set()
        assert (await client.get("/adapters")).json()["count"] == 0


async def test_replicas_share_adapters_through_redis(serve, prefix, make_blob):
    """An adapter uploaded to one replica is listed and served by another one using the same Redis."""
    a_store, b_store = RedisStore(REDIS_URL, prefix=prefix), RedisStore(REDIS_URL, prefix=prefix)
    try:
        async with serve(a_store) as a, serve(b_store) as b:
            assert (await upload(a, make_blob("lora", rank=8), "shared")).status_code == 201
            assert [x["adapter_id"] for x in (await b.get("/adapters")).json()["adapters"]] == ["shared"]
            body = {"adapter_id": "shared", "prompt": PROMPT, "max_tokens": 6}
            ra, rb = await a.post("/generate", json=body), await b.post("/generate", json=body)
            assert ra.status_code == rb.status_code == 200
            assert ra.json()["text"] == rb.json()["text"]  # same bytes, same factors, same greedy answer
            assert_error(await b.post("/adapters", files={"file": ("x", make_blob("osora"))}, data={"adapter_id": "shared"}), 409, "adapter_exists")
    finally:
        a_store.close()
        b_store.close()


async def test_redis_down_is_503_and_the_base_still_serves(serve, dead_store, make_blob):
    async with serve(dead_store) as client:
        err = assert_error(await upload(client, make_blob("osora"), "x"), 503, "store_unavailable", "unavailable")
        assert "redis" in err["message"].lower()
        resp = await client.get("/adapters")
        assert_error(resp, 503, "store_unavailable")
        assert int(resp.headers["retry-after"]) >= 1
        assert_error(await client.get("/adapters/x"), 503, "store_unavailable")
        assert_error(await client.delete("/adapters/x"), 503, "store_unavailable")

        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "degraded" and health.json()["store"]["ok"] is False

        base = await client.post("/generate", json={"adapter_id": None, "prompt": PROMPT, "max_tokens": 4})
        assert base.status_code == 200, base.text
        cold = await client.post("/generate", json={"adapter_id": "x", "prompt": PROMPT, "max_tokens": 4})
        assert_error(cold, 503, "adapter_unavailable", "unreachable")


async def test_reupload_never_serves_the_old_weights_on_another_replica(serve, prefix, make_blob):
    """Replica B caches adapter 'x'; it is deleted and re-uploaded (other weights) through replica A.
    B's device cache is keyed by the stored version, so B serves the new weights, not its cached copy."""
    a_store, b_store = RedisStore(REDIS_URL, prefix=prefix), RedisStore(REDIS_URL, prefix=prefix)
    old, new = make_blob("osora", rank=4, seed=1, scale=0.5), make_blob("osora", rank=4, seed=2, scale=0.5)
    body = {"adapter_id": "x", "prompt": PROMPT, "max_tokens": 12}
    try:
        async with serve(a_store) as a, serve(b_store) as b:
            assert (await upload(a, old, "x")).status_code == 201
            old_text = (await b.post("/generate", json=body)).json()["text"]  # B now has the old weights cached
            assert (await a.delete("/adapters/x")).status_code == 204
            assert (await upload(a, new, "x")).status_code == 201
            new_on_a = (await a.post("/generate", json=body)).json()["text"]
            new_on_b = (await b.post("/generate", json=body)).json()["text"]
            assert new_on_a != old_text  # the two versions really answer differently
            assert new_on_b == new_on_a
    finally:
        a_store.close()
        b_store.close()


async def test_a_merge_follows_its_sources_across_replicas(serve, prefix, make_blob):
    """Replica B serves (and caches) a merge of 'x' and 'y'; 'x' is re-uploaded with other weights through
    replica A. A merge is keyed by its sources' versions, so B's next request merges the new 'x', as A does."""
    a_store, b_store = RedisStore(REDIS_URL, prefix=prefix), RedisStore(REDIS_URL, prefix=prefix)
    body = {"prompt": PROMPT, "max_tokens": 6, "logprobs": 0,
            "merged_adapters": {"ids": ["x", "y"], "weights": [1.0, 0.5]}}

    def scored(resp) -> list[float]:
        assert resp.status_code == 200, resp.text
        return [e["logprob"] for e in resp.json()["logprobs"]]

    try:
        async with serve(a_store) as a, serve(b_store) as b:
            assert (await upload(a, make_blob("osora", rank=4, seed=1, scale=0.5), "x")).status_code == 201
            assert (await upload(a, make_blob("lora", rank=4, seed=2), "y")).status_code == 201
            old_on_b = scored(await b.post("/generate", json=body))
            assert (await a.delete("/adapters/x")).status_code == 204
            assert (await upload(a, make_blob("osora", rank=4, seed=3, scale=0.5), "x")).status_code == 201
            new_on_a = scored(await a.post("/generate", json=body))
            new_on_b = scored(await b.post("/generate", json=body))
            assert new_on_a != old_on_b
            assert max(abs(p - q) for p, q in zip(new_on_a, new_on_b)) <= 1e-4 and len(new_on_a) == len(new_on_b)
    finally:
        a_store.close()
        b_store.close()
