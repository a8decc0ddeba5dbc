"""Limits (issue #5): request body size, prompt length, max_tokens, the request timeout, a full queue, and a
client that disconnects mid-stream (its batch row is freed)."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from _reliability import UvicornThread, assert_error, wait_until
from adapters_store.disk import DiskStore

pytestmark = pytest.mark.anyio

LONG = {"prompt": "hello world", "raw": True, "max_tokens": 1000}  # ~1000 decode steps: well over 0.25 s on any CPU


# --- request size --------------------------------------------------------------------------------------


async def test_generate_body_over_the_limit_is_413(serve, store):
    limit = 16 * 1024
    async with serve(store, max_request_bytes=limit) as client:
        big = {"prompt": "x" * (limit + 1), "max_tokens": 4}
        assert_error(await client.post("/generate", json=big), 413, "too_large", f"{limit:,} bytes", "this body is")

        # chunked, without Content-Length: cut off while streaming in
        raw = json.dumps({"prompt": "y" * (4 * limit), "max_tokens": 4}).encode()

        async def chunks():
            for i in range(0, len(raw), 4096):
                yield raw[i : i + 4096]

        resp = await client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in {k.lower() for k in resp.request.headers}
        assert_error(resp, 413, "too_large", f"{limit:,} bytes")

        # under the limit it is served; uploads keep their own (larger) limit
        assert (await client.post("/generate", json={"prompt": "x" * 100, "raw": True, "max_tokens": 2})).status_code == 200


# --- prompt and max_tokens -----------------------------------------------------------------------------


async def test_prompt_over_the_context_is_400_with_a_message(serve, store):
    async with serve(store, max_seq_len=128) as client:
        err = assert_error(await client.post("/generate", json={"prompt": "x" * 128, "raw": True, "max_tokens": 1}),
                           400, "invalid_request", "prompt is 128 tokens", "context limit of 128", "at most 127")
        assert "shorten the prompt" in err["message"]
        # prompt fits but prompt + max_tokens does not
        assert_error(await client.post("/generate", json={"prompt": "x" * 100, "raw": True, "max_tokens": 40}),
                     400, "invalid_request", "100 tokens", "max_tokens (40)", "context limit")
        # the longest prompt that fits, with one token to generate
        ok = await client.post("/generate", json={"prompt": "x" * 127, "raw": True, "max_tokens": 1})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["prompt_tokens"] == 127


@pytest.mark.parametrize("max_tokens, hint", [(129, "max_seq_len"), (1 << 20, "max_tokens"), (0, "max_tokens"), (-5, "max_tokens")])
async def test_max_tokens_out_of_range_is_422(max_tokens, hint, serve, store):
    async with serve(store, max_seq_len=128) as client:
        assert_error(await client.post("/generate", json={"prompt": "hi", "max_tokens": max_tokens}), 422, "validation_error", hint)


# --- request timeout -----------------------------------------------------------------------------------


def engine_of(client):
    return client.app.state.engine


async def test_a_generation_past_the_request_timeout_ends_with_504_and_leaves_the_batch(serve, store):
    async with serve(store, max_seq_len=1024, request_timeout=0.25) as client:
        engine = engine_of(client)
        t0 = time.monotonic()
        resp = await client.post("/generate", json=LONG)
        took = time.monotonic() - t0
        err = assert_error(resp, 504, "request_timeout", "request timeout of 0.25 s", "max_tokens")
        assert took < 5, took  # ended at the timeout, not after 1000 tokens
        wait_until(lambda: engine.stats()["active"] == 0, 5, what="the timed-out row to leave the batch")
        stats = engine.stats()
        assert stats["waiting"] == 0 and stats["timed_out"] == 1
        assert stats["completion_tokens"] < 1000, err

        # streaming: text first, then an 'error' event with the same code
        async with client.stream("POST", "/generate", json={**LONG, "stream": True}) as resp:
            assert resp.status_code == 200
            raw = (await resp.aread()).decode()
        events = [block.split("\n") for block in raw.strip().split("\n\n")]
        kinds = [e[0].removeprefix("event: ") for e in events]
        assert kinds[0] == "delta" and kinds[-1] == "error", kinds[-3:]
        body = json.loads(events[-1][1].removeprefix("data: "))
        assert body["error"]["code"] == "request_timeout"
        wait_until(lambda: engine.stats()["active"] == 0, 5, what="the timed-out row to leave the batch")

        # a short request still works
        assert (await client.post("/generate", json={"prompt": "hi", "max_tokens": 3})).status_code == 200


async def test_a_request_that_waits_past_the_timeout_gets_504_too(serve, tmp_path, make_blob):
    """Its adapter is slow to come from the store: the request times out while waiting, with a message that says so;
    requests for other adapters (and the base) are served meanwhile."""
    store = SlowStore(tmp_path / "slow")
    store.put_blob_directly("slow-one", make_blob("osora", seed=3))
    try:
        # 1 s: long enough that the base request is served within it even on a loaded 2-core machine (at 0.3 s it
        # was once not, and answered 504 too); the slow adapter's request waits forever without the timeout.
        async with serve(store, request_timeout=1.0) as client:
            slow, base = await asyncio.gather(
                client.post("/generate", json={"adapter_id": "slow-one", "prompt": "hi", "max_tokens": 3}),
                client.post("/generate", json={"prompt": "hi", "max_tokens": 3}),
            )
            assert_error(slow, 504, "request_timeout", "waited", "request timeout of 1 s", "adapter store is slow")
            assert base.status_code == 200, base.text
            engine = engine_of(client)
            wait_until(lambda: engine.stats()["active"] == 0, 5, what="the base request's row to be retired")
            assert engine.stats()["timed_out"] == 1 and engine.stats()["waiting"] == 0
    finally:
        store.release.set()
        store.close()


class SlowStore(DiskStore):
    """A disk store whose get_blob hangs until released (a store that stopped answering, but not failing)."""

    def __init__(self, root):
        import threading

        super().__init__(root)
        self.release = threading.Event()

    def put_blob_directly(self, adapter_id: str, blob: bytes) -> None:
        from adapters_store.format import adapter_from_bytes_unchecked
        from adapters_store.records import record_for

        self.put(record_for(adapter_from_bytes_unchecked(blob), blob, adapter_id), blob)

    def get_blob(self, adapter_id: str, expect_sha256: str | None = None) -> bytes | None:
        self.release.wait(timeout=10)
        return super().get_blob(adapter_id, expect_sha256)


# --- a full queue --------------------------------------------------------------------------------------


async def test_a_full_queue_is_429_with_retry_after_and_the_rest_is_served(serve, store):
    """max_batch 1, max_waiting 1: one request runs, one waits, the other four are refused at once."""
    async with serve(store, max_seq_len=1024, max_batch=1, max_waiting=1) as client:
        engine = engine_of(client)
        running = asyncio.ensure_future(client.post("/generate", json=LONG))
        await asyncio.to_thread(wait_until, lambda: engine.stats()["active"] == 1, 10)
        body = {"prompt": "hello", "raw": True, "max_tokens": 20}
        answers = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(5)))
        assert (await running).status_code == 200
        codes = sorted(r.status_code for r in answers)
        assert codes == [200, 429, 429, 429, 429], codes
        for r in answers:
            if r.status_code == 429:
                assert_error(r, 429, "queue_full", "already waiting", "max_waiting", "retry in")
                assert 1 <= int(r.headers["retry-after"]) <= 30
        stats = engine.stats()
        assert stats["rejected_queue_full"] == 4 and stats["waiting"] == 0


def test_retry_after_follows_the_finish_rate(tiny_base, tiny_factors, tmp_path):
    """Retry-After estimates how long the waiting queue takes to drain at the recent finish rate (1–30 s)."""
    from service.engine import Engine, EngineConfig

    store = DiskStore(tmp_path / "s")
    engine = Engine(tiny_base, tiny_factors, store, EngineConfig(max_batch=1, max_waiting=4))
    store.close()  # never started: the store is not used
    assert engine.retry_after() == 1.0  # nothing finished yet: the minimum
    now = time.monotonic()
    engine._finished_at.extend([now - 10 + i for i in range(10)])  # one request finished per second
    engine._waiting.extend([object()] * 4)  # type: ignore[arg-type]
    assert 3.0 <= engine.retry_after() <= 5.0  # 4 waiting at ~1/s
    engine._waiting.extend([object()] * 100)  # type: ignore[arg-type]
    assert engine.retry_after() == 30.0  # capped


# --- client disconnects over real HTTP -----------------------------------------------------------------


@pytest.fixture
def http_server(tiny_base, tiny_factors, store):
    from service.app import create_app
    from service.config import Settings

    settings = Settings(base="tiny", store=str(store.root), device="cpu", max_batch=4, max_rank=8, max_seq_len=1024,
                        core_slots=4, lr_slots=2, max_waiting=16, shutdown_timeout=5.0)
    app = create_app(settings, base=tiny_base, factors=tiny_factors, store=store)
    with UvicornThread(app) as server:
        yield server


async def test_client_disconnect_mid_stream_frees_its_batch_slot(http_server):
    engine = http_server.app.state.engine
    before = engine.stats()
    async with httpx.AsyncClient(base_url=http_server.url, timeout=30) as client:
        async with client.stream("POST", "/generate", json={**LONG, "stream": True}) as resp:
            assert resp.status_code == 200
            lines = resp.aiter_lines()
            while not (await lines.__anext__()).startswith("event: delta"):
                pass
            assert engine.stats()["active"] == 1
        # leaving the block closes the connection mid-stream
    wait_until(lambda: engine.stats()["active"] == 0, 10, what="the disconnected stream's row to be freed")
    after = engine.stats()
    assert after["finished"] == before["finished"]  # cancelled, not decoded to the end
    assert after["completion_tokens"] - before["completion_tokens"] < 1000


async def test_client_disconnect_while_waiting_for_a_plain_answer(http_server):
    engine = http_server.app.state.engine
    before = engine.stats()
    async with httpx.AsyncClient(base_url=http_server.url, timeout=30) as client:
        task = asyncio.ensure_future(client.post("/generate", json=LONG))
        await asyncio.to_thread(wait_until, lambda: engine.stats()["active"] == 1, 10)
        task.cancel()  # closes the connection while the server is generating
        with pytest.raises(asyncio.CancelledError):
            await task
    wait_until(lambda: engine.stats()["active"] == 0, 10, what="the disconnected request's row to be freed")
    after = engine.stats()
    assert after["finished"] == before["finished"] and after["completion_tokens"] - before["completion_tokens"] < 1000
    # the server is fine afterwards
    async with httpx.AsyncClient(base_url=http_server.url, timeout=30) as client:
        assert (await client.post("/generate", json={"prompt": "hi", "max_tokens": 3})).status_code == 200
