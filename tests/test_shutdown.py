"""Graceful shutdown (issue #5).

SIGTERM to a real `python -m service --base tiny`: requests in flight (running, waiting, streaming) complete,
new ones get 503 shutting_down, the process exits 0. When the drain times out, what is left is answered 503
shutting_down instead of being cut off or left waiting, and Engine.shutdown itself fails whatever it leaves.
"""
from __future__ import annotations

import asyncio
import json
import signal
import threading

import httpx
import pytest

from _reliability import ServiceProcess, UvicornThread, assert_error, free_port, tiny_factors_dir, wait_until
from adapters_store.disk import DiskStore
from service.engine import Engine, EngineConfig, EngineShuttingDown, SamplingParams

LONG = {"prompt": "hello world", "raw": True, "max_tokens": 1000}
__all__ = ["tiny_factors_dir"]  # a fixture


async def _engine_stats(client: httpx.AsyncClient) -> dict | None:
    resp = await client.get("/health")
    return resp.json()["engine"] if resp.status_code == 200 else None


def test_sigterm_lets_in_flight_requests_finish_refuses_new_ones_and_exits_0(tmp_path, tiny_factors_dir):
    svc = ServiceProcess(tmp_path / "home", "--store", str(tmp_path / "store"), "--max-batch", "2",
                         "--max-seq-len", "1024", "--shutdown-timeout", "60", factors_dir=tiny_factors_dir).start()
    body = {**LONG, "max_tokens": 500}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=svc.url, timeout=120) as client:
            async def stream() -> str:
                async with client.stream("POST", "/generate", json={**body, "stream": True}) as resp:
                    assert resp.status_code == 200
                    return (await resp.aread()).decode()

            plain = [asyncio.ensure_future(client.post("/generate", json=body)) for _ in range(3)]
            streamed = asyncio.ensure_future(stream())
            for _ in range(500):  # until two rows run and the rest wait: all four are in flight
                stats = await _engine_stats(client)
                if stats and stats["active"] == 2 and stats["waiting"] >= 1:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"requests never got in flight: {stats}")

            svc.send(signal.SIGTERM)
            for _ in range(500):  # the drain starts within a tick (0.1 s): /health says so
                health = await client.get("/health")
                if health.status_code == 503:
                    break
                await asyncio.sleep(0.01)
            assert_error(health, 503, "shutting_down")
            refused = await client.post("/generate", json={"prompt": "hi", "max_tokens": 3})
            assert_error(refused, 503, "shutting_down", "retry on another replica")
            assert int(refused.headers["retry-after"]) >= 1

            for resp in await asyncio.gather(*plain):
                assert resp.status_code == 200, resp.text
                assert resp.json()["finish_reason"] == "length" and resp.json()["usage"]["completion_tokens"] == 500
            events = (await streamed).strip().split("\n\n")
            assert events[-1].startswith("event: done"), events[-1][:200]
            assert json.loads(events[-1].split("data: ", 1)[1])["usage"]["completion_tokens"] == 500

    try:
        asyncio.run(scenario())
        rc = svc.wait(timeout=60)
    finally:
        svc.kill()
    log = svc.log()
    assert rc == 0, log[-3000:]
    assert "draining" in log and "Application shutdown complete" in log, log[-3000:]


class GracefulThread(UvicornThread):
    """service.graceful.GracefulServer in a thread; `terminate()` does what its SIGTERM handler does."""

    def __init__(self, app, drain_timeout: float) -> None:
        from service.graceful import GracefulServer, server_config

        self.port, self.app = free_port(), app
        config = server_config(app, host="127.0.0.1", port=self.port, drain_timeout=5, log_level="warning")
        self.server = GracefulServer(config, app, drain_timeout)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def terminate(self) -> None:
        self.server.handle_exit(signal.SIGTERM, None)


def test_drain_timeout_answers_what_is_left_with_503(tiny_base, tiny_factors, tmp_path):
    """max_batch 1 and five long requests, a 0.5 s drain: the ones left then get 503 shutting_down, every client
    gets an answer (no cut connection), and the server stops."""
    from service.app import create_app
    from service.config import Settings

    store = DiskStore(tmp_path / "store")
    settings = Settings(base="tiny", store=str(store.root), device="cpu", max_batch=1, max_rank=8, max_seq_len=1024,
                        core_slots=4, lr_slots=2, max_waiting=16, shutdown_timeout=0.5)
    app = create_app(settings, base=tiny_base, factors=tiny_factors, store=store)
    server = GracefulThread(app, drain_timeout=0.5)

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            tasks = [asyncio.ensure_future(client.post("/generate", json=LONG)) for _ in range(5)]
            engine = app.state.engine
            await asyncio.to_thread(wait_until, lambda: engine.stats()["active"] == 1 and engine.stats()["waiting"] == 4, 30)
            server.terminate()
            return await asyncio.gather(*tasks)

    try:
        with server:
            answers = asyncio.run(scenario())
            server.thread.join(timeout=30)
            assert not server.thread.is_alive(), "the server did not stop after the drain timeout"
    finally:
        store.close()
    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 3, statuses
    for r in answers:
        if r.status_code == 503:
            assert_error(r, 503, "shutting_down", "shut down before this request finished")


def test_engine_shutdown_fails_what_the_drain_leaves(tiny_base, tiny_factors, tmp_path):
    """The engine-level gap: after a drain timeout, running and waiting requests get EngineShuttingDown."""
    store = DiskStore(tmp_path / "store")
    engine = Engine(tiny_base, tiny_factors, store, EngineConfig(max_batch=1, max_rank=8, max_seq_len=1024, core_slots=4,
                                                                 lr_slots=2, max_waiting=8))
    engine.start()
    prompt = engine.encode_prompt("hello world", raw=True)

    async def scenario():
        tasks = [asyncio.ensure_future(engine.generate(prompt, None, SamplingParams(max_tokens=1000))) for _ in range(3)]
        await asyncio.to_thread(wait_until, lambda: engine.stats()["active"] == 1 and engine.stats()["waiting"] == 2, 30)
        await asyncio.to_thread(engine.shutdown, True, 0.05)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
        with pytest.raises(EngineShuttingDown, match="shutting down"):
            await engine.generate(prompt, None, SamplingParams(max_tokens=2))
        return results

    try:
        results = asyncio.run(scenario())
    finally:
        engine.shutdown(drain=False)
        store.close()
    assert all(isinstance(r, EngineShuttingDown) for r in results), results
    assert "0.05 s drain timeout" in str(results[0])
    stats = engine.stats()
    assert stats["failed_at_shutdown"] == 3 and stats["active"] == 0 and stats["waiting"] == 0


def test_an_idle_keep_alive_connection_outlives_a_client_pools_expiry(tiny_base, tiny_factors, tmp_path):
    """A connection left idle for longer than httpx's pool keeps it (5 s, what deploy/proxy reuses replicas'
    connections within) still takes a request: the server must not be the side that closes idle connections,
    or a request sent as it closes one fails with no answer (seen as ReadError in bench/load_correctness.py)."""
    import http.client
    import time

    from service.app import create_app
    from service.config import Settings

    store = DiskStore(tmp_path / "store")
    settings = Settings(base="tiny", store=str(store.root), device="cpu", max_batch=1, max_rank=8, max_seq_len=64,
                        core_slots=2, lr_slots=2)
    server = GracefulThread(create_app(settings, base=tiny_base, factors=tiny_factors, store=store), drain_timeout=1)
    try:
        with server:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            for pause in (0, 6.5):
                time.sleep(pause)
                conn.request("GET", "/health")
                r = conn.getresponse()
                assert r.status == 200 and r.getheader("connection", "").lower() != "close", (pause, r.status)
                r.read()
            conn.close()
    finally:
        store.close()

