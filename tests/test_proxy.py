"""The routing proxy (deploy/proxy/proxy.py) against two fake svdserve replicas, all on real local sockets.

Real uvicorn servers (not httpx's ASGITransport, which buffers whole responses) so that streaming is proven
end to end: the fake replica holds back its second SSE event until the test has received the first one
through the proxy.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

ROOT = Path(__file__).resolve().parents[1]


def _load_proxy_module():
    spec = importlib.util.spec_from_file_location("svdserve_deploy_proxy", ROOT / "deploy" / "proxy" / "proxy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


proxy_mod = _load_proxy_module()


# --- servers on threads ---------------------------------------------------------------------------------------


@contextmanager
def serve(app):
    """Run an ASGI app under uvicorn on 127.0.0.1:<free port> in a thread; yields its base URL."""
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets created with it (else each response pays ~40 ms
    # of Nagle + delayed ACK); uvicorn's own --port path does this already.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


def dead_url() -> str:
    """A URL nothing listens on (a port just released)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


class FakeReplica:
    """Just enough of svdserve's API to see where requests land and what arrives there."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[dict] = []
        self.fail_503: str | None = None  # answer every request with 503 and this error code
        self.release = threading.Event()  # lets a held-back stream continue
        self.stream_closed = threading.Event()  # the held-back stream's generator ended (finished or cancelled)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (msg := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append({"method": scope["method"], "path": scope["path"], "query": scope["query_string"].decode(),
                          "headers": headers, "body": body})
        if self.fail_503:
            await self._json(send, 503, {"error": {"code": self.fail_503, "message": "nope"}}, [(b"retry-after", b"1")])
            return
        if scope["path"] == "/generate" and json.loads(body or b"{}").get("stream"):
            await self._stream(receive, send)
            return
        answer = {"served_by": self.name, "path": scope["path"], "body_sha256": hashlib.sha256(body).hexdigest(),
                  "body_len": len(body)}
        status = 204 if scope["method"] == "DELETE" else 200
        await self._json(send, status, None if status == 204 else answer, [(b"x-replica", self.name.encode())])

    async def _json(self, send, status, payload, extra=()):
        body = b"" if payload is None else json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _stream(self, receive, send):
        # Like Starlette's StreamingResponse (svdserve's SSE): a client disconnect ends the generator.
        gone = asyncio.ensure_future(receive())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        try:
            await send({"type": "http.response.body", "body": b'event: delta\ndata: {"text": "one"}\n\n',
                        "more_body": True})
            deadline = time.monotonic() + 5
            while not self.release.is_set():  # held back until the test saw event one through the proxy
                if gone.done():
                    return
                if time.monotonic() > deadline:
                    await send({"type": "http.response.body", "body": b"event: error\ndata: held too long\n\n"})
                    return
                await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": b'event: delta\ndata: {"text": "two"}\n\n',
                        "more_body": True})
            await send({"type": "http.response.body", "body": b'event: done\ndata: {}\n\n'})
        finally:
            gone.cancel()
            self.stream_closed.set()

    def reset(self) -> None:
        self.seen.clear()
        self.fail_503 = None
        self.release.clear()
        self.stream_closed.clear()


@pytest.fixture(scope="module")
def replicas():
    a, b = FakeReplica("a"), FakeReplica("b")
    with serve(a) as url_a, serve(b) as url_b:
        a.url, b.url = url_a, url_b
        yield a, b


@pytest.fixture
def fakes(replicas):
    for r in replicas:
        r.reset()
    return replicas


@contextmanager
def proxied(upstreams, **kwargs):
    """The proxy under uvicorn in front of `upstreams`; yields (httpx.Client on it, Proxy)."""
    kwargs.setdefault("connect_timeout_s", 1.0)
    kwargs.setdefault("read_timeout_s", 10.0)
    app = proxy_mod.Proxy(upstreams, **kwargs)
    with serve(app) as url, httpx.Client(base_url=url, timeout=5.0, trust_env=False) as client:
        yield client, app


def owner_name(replicas, adapter_id):
    by_url = {r.url: r.name for r in replicas}
    return by_url[proxy_mod.hrw_order([r.url for r in replicas], adapter_id)[0]]


IDS = [f"ad-{i:03d}" for i in range(40)]


# --- hashing (pure) -------------------------------------------------------------------------------------------


def test_hrw_is_stable_and_moves_only_a_removed_replicas_adapters():
    three = ["http://svdserve-1:8000", "http://svdserve-2:8000", "http://svdserve-3:8000"]
    ids = [f"tenant-{i}" for i in range(600)]
    owner3 = {k: proxy_mod.hrw_order(three, k)[0] for k in ids}
    assert owner3 == {k: proxy_mod.hrw_order(list(reversed(three)), k)[0] for k in ids}  # config order irrelevant
    counts = {u: sum(1 for o in owner3.values() if o == u) for u in three}
    assert all(150 < c < 250 for c in counts.values()), counts  # ~200 each
    owner2 = {k: proxy_mod.hrw_order(three[:2], k)[0] for k in ids}
    moved = [k for k in ids if owner2[k] != owner3[k]]
    assert moved and all(owner3[k] == three[2] for k in moved)  # only the removed replica's adapters move
    # ... and each moves to its own next choice, i.e. the fallback order is the post-removal order.
    assert all(owner2[k] == proxy_mod.hrw_order(three, k)[1] for k in moved)


def test_routing_keys():
    assert proxy_mod.body_routing_key(b'{"adapter_id": "x1", "prompt": "hi"}', "adapter_id") == "x1"
    assert proxy_mod.body_routing_key(b'{"adapter_id": null}', "adapter_id") is None
    assert proxy_mod.body_routing_key(b'{"model": 3}', "model") is None
    assert proxy_mod.body_routing_key(b"not json", "model") is None
    assert proxy_mod.body_routing_key(b'["x"]', "model") is None
    assert proxy_mod.path_routing_key("/adapters/x1") == "x1"
    assert proxy_mod.path_routing_key("/adapters/x1/pin") == "x1"
    assert proxy_mod.path_routing_key("/adapters") is None
    assert proxy_mod.path_routing_key("/adapters/") is None
    with pytest.raises(ValueError):
        proxy_mod.Router([])
    with pytest.raises(ValueError):
        proxy_mod.Router(["http://a:1", "http://a:1/"])


# --- through the proxy ----------------------------------------------------------------------------------------


def test_same_adapter_same_replica_on_every_route_and_ids_spread(fakes):
    a, b = fakes
    with proxied([a.url, b.url]) as (client, _):
        served = {}
        for adapter_id in IDS[:24]:
            want = owner_name(fakes, adapter_id)
            for _ in range(2):
                r = client.post("/generate", json={"adapter_id": adapter_id, "prompt": "hi"})
                assert r.status_code == 200 and r.json()["served_by"] == want, (adapter_id, r.text)
            r = client.post("/v1/chat/completions", json={"model": adapter_id, "messages": []})
            assert r.json()["served_by"] == want
            r = client.post("/v1/completions", json={"model": adapter_id, "prompt": "x"})
            assert r.json()["served_by"] == want
            r = client.get(f"/adapters/{adapter_id}")
            assert r.json()["served_by"] == want
            assert r.headers["x-svdserve-upstream"] == (a.url if want == "a" else b.url)
            served[adapter_id] = want
        assert set(served.values()) == {"a", "b"}  # both replicas own some of the 24 ids
        r = client.get(f"/proxy/route/{IDS[0]}")
        assert r.json()["order"][0] == (a.url if served[IDS[0]] == "a" else b.url)


def test_requests_without_an_adapter_or_a_prompt_go_round_robin(fakes):
    a, b = fakes
    with proxied([a.url, b.url], spread_ids=["SmolLM2-135M-Instruct"]) as (client, _):
        for call in (
            lambda: client.get("/adapters"),
            lambda: client.get("/health"),
            lambda: client.get("/v1/models"),
            lambda: client.post("/generate", json={"adapter_id": None, "messages": []}),
            lambda: client.post("/v1/chat/completions", json={"model": "SmolLM2-135M-Instruct", "messages": []}),
        ):
            assert {call().json()["served_by"] for _ in range(2)} == {"a", "b"}


def test_prefix_routing_key_is_what_the_prefix_cache_can_reuse():
    key = proxy_mod.prefix_routing_key
    system = "You are a support bot for ACME. " * 12  # over PREFIX_ROUTE_CHARS
    chat = lambda *turns: json.dumps({"model": "base", "messages": [{"role": "system", "content": system}, *turns]}).encode()  # noqa: E731
    alice = [(b"authorization", b"Bearer sk-alice")]
    first = key(chat({"role": "user", "content": "hi"}), alice)
    assert first.startswith("prefix:") and "sk-alice" not in first
    # a chat's next turn, and another user question after the same system prompt: the same key
    assert key(chat({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "more"}), alice) == first
    assert key(chat({"role": "user", "content": "something else"}), alice) == first
    # another tenant, or another cache_salt: a prefix cache would not share it, so neither does the route
    assert key(chat({"role": "user", "content": "hi"}), [(b"authorization", b"Bearer sk-bob")]) != first
    assert key(chat({"role": "user", "content": "hi"}), [(b"x-api-key", b"sk-alice")]) != first
    salted = json.loads(chat({"role": "user", "content": "hi"}))
    salted["cache_salt"] = "s1"
    assert key(json.dumps(salted).encode(), alice) != first
    # prompts: their first PREFIX_ROUTE_CHARS characters; a batch by its first prompt; token ids too
    n = proxy_mod.PREFIX_ROUTE_CHARS
    p = lambda prompt: json.dumps({"adapter_id": None, "prompt": prompt}).encode()  # noqa: E731
    assert key(p("x" * n + "tail one"), []) == key(p("x" * n + "tail two"), []) != key(p("y" + "x" * n), [])
    assert key(p(["x" * n, "other"]), []) == key(p("x" * n), [])
    assert key(p([[1, 2, 3], [4]]), []) == key(p([1, 2, 3]), []) != key(p([1, 2, 4]), [])
    for body in (b"not json", b"[1]", p(""), p(None), json.dumps({"messages": []}).encode(), p([])):
        assert key(body, alice) is None


def test_base_model_requests_follow_their_prompt_prefix(fakes):
    """The same system prompt from the same tenant lands on one replica on every route (its prefix-cache hits),
    while different prompts spread over both."""
    a, b = fakes
    with proxied([a.url, b.url], spread_ids=["SmolLM2-135M-Instruct"]) as (client, _):
        served = {}
        for i in range(16):
            system = f"System prompt number {i}: answer briefly."
            auth = {"Authorization": f"Bearer tenant-{i % 3}"}
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": "q"}]
            where = {client.post("/v1/chat/completions", headers=auth,
                                 json={"model": "SmolLM2-135M-Instruct", "messages": msgs + extra}).json()["served_by"]
                     for extra in ([], [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}])}
            where |= {client.post("/generate", headers=auth, json={"adapter_id": None, "messages": msgs}).json()["served_by"],
                      client.post("/generate", headers=auth, json={"adapter_id": None, "prompt": system}).json()["served_by"]}
            assert len(where) == 1, (i, where)
            served[i] = where.pop()
        assert set(served.values()) == {"a", "b"}


def test_merge_requests_follow_their_merge(fakes):
    """Every request for one merge (any prompt, /generate or /v1 with the base model's name) reaches one replica —
    the one holding it merged — while different merges spread over both."""
    a, b = fakes
    key = proxy_mod.merge_routing_key
    merged = {"ids": ["x", "y"], "weights": [1.0, 0.5]}
    k = key(json.dumps({"prompt": "a", "merged_adapters": merged}).encode())
    assert k.startswith("merge:")
    assert key(json.dumps({"merged_adapters": dict(reversed(merged.items())), "prompt": "b"}).encode()) == k
    assert key(json.dumps({"merged_adapters": {**merged, "weights": [1.0, 0.6]}}).encode()) != k
    for body in (b"not json", b"[1]", b'{"merged_adapters": null}', b'{"merged_adapters": {"ids": []}}'):
        assert key(body) is None
    with proxied([a.url, b.url], spread_ids=["SmolLM2-135M-Instruct"]) as (client, _):
        served = {}
        for i in range(16):
            m = {"ids": [f"ad-{i}", "shared"], "merge_strategy": "linear"}
            where = {client.post("/generate", json={"prompt": f"p{j}", "merged_adapters": m}).json()["served_by"]
                     for j in range(3)}
            where.add(client.post("/v1/chat/completions", json={"model": "SmolLM2-135M-Instruct", "messages": [],
                                                                "merged_adapters": m}).json()["served_by"])
            assert len(where) == 1, (i, where)
            served[i] = where.pop()
        assert set(served.values()) == {"a", "b"}


def test_bounded_load_passes_over_a_busy_owner(fakes):
    """Consistent hashing with bounded loads: with two streams of one adapter still running on its owner, the
    owner holds 2 of 2 requests in flight, over ⌈1.25 · 3 / 2⌉ = 2, so the third goes to the other replica; once
    they finish, the owner takes the adapter again. With the load factor 0 the hash alone decides."""
    a, b = fakes
    adapter_id = IDS[5]
    owner, other = (a, b) if owner_name(fakes, adapter_id) == "a" else (b, a)
    for factor, third in ((1.25, other), (0, owner)):
        owner.reset()
        other.reset()
        with proxied([a.url, b.url], load_factor=factor) as (client, app):
            with client.stream("POST", "/generate", json={"adapter_id": adapter_id, "stream": True}) as s1, \
                    client.stream("POST", "/generate", json={"adapter_id": adapter_id, "stream": True}) as s2:
                c1, c2 = s1.iter_raw(), s2.iter_raw()  # kept: a dropped iterator closes its response
                assert b'"one"' in next(c1) and b'"one"' in next(c2)
                assert s1.headers["x-svdserve-upstream"] == s2.headers["x-svdserve-upstream"] == owner.url
                health = {u["url"]: u["in_flight"] for u in client.get("/proxy/health").json()["upstreams"]}
                assert health == {owner.url: 2, other.url: 0}
                r = client.post("/generate", json={"adapter_id": adapter_id, "prompt": "hi"})
                assert r.json()["served_by"] == third.name
                owner.release.set()
                assert b"event: done" in b"".join(c1) and b"event: done" in b"".join(c2)
            # every finished request released its replica (the proxy's bookkeeping may trail the last byte a little)
            deadline = time.monotonic() + 5
            while app.router.in_flight != {a.url: 0, b.url: 0} and time.monotonic() < deadline:
                time.sleep(0.01)
            assert app.router.in_flight == {a.url: 0, b.url: 0}
            assert client.post("/generate", json={"adapter_id": adapter_id, "prompt": "hi"}).json()["served_by"] == owner.name
    with pytest.raises(ValueError, match="must be ≥ 1"):
        proxy_mod.Router(["http://a:1"], load_factor=0.5)


def test_streaming_passes_through_event_by_event(fakes):
    a, b = fakes
    adapter_id = IDS[0]
    owner = a if owner_name(fakes, adapter_id) == "a" else b
    with proxied([a.url, b.url]) as (client, _):
        with client.stream("POST", "/generate", json={"adapter_id": adapter_id, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            chunks = r.iter_raw()
            first = next(chunks)  # would block (and time out) if the proxy buffered: the replica waits on us
            assert b'"one"' in first and b'"two"' not in first
            owner.release.set()
            rest = b"".join(chunks)
        assert b'"two"' in rest and b"event: done" in rest and b"held too long" not in rest


def test_client_disconnect_mid_stream_closes_the_upstream_request(fakes):
    a, b = fakes
    adapter_id = IDS[1]
    owner = a if owner_name(fakes, adapter_id) == "a" else b
    with proxied([a.url, b.url]) as (client, _):
        with client.stream("POST", "/generate", json={"adapter_id": adapter_id, "stream": True}) as r:
            assert b'"one"' in next(r.iter_raw())
        # the client hung up without releasing the replica: its generator must end (cancelled), long before the 5 s
        assert owner.stream_closed.wait(3)


def test_fallback_to_the_next_replica_when_the_owner_is_down(fakes):
    a, _ = fakes
    down = dead_url()
    upstreams = [a.url, down]
    owned_by_down = [k for k in IDS if proxy_mod.hrw_order(upstreams, k)[0] == down]
    assert owned_by_down
    with proxied(upstreams, cooldown_s=60) as (client, app):
        for adapter_id in owned_by_down[:3]:
            r = client.post("/generate", json={"adapter_id": adapter_id, "prompt": "hi"})
            assert r.status_code == 200 and r.json()["served_by"] == "a"
        with client.stream("POST", "/generate", json={"adapter_id": owned_by_down[0], "stream": True}) as r:
            chunks = r.iter_raw()
            assert b'"one"' in next(chunks)
            a.release.set()
            assert b"event: done" in b"".join(chunks)
        # an upload (streamed request body) too, with its bytes intact
        blob = bytes(range(256)) * 4096  # 1 MiB
        r = client.post("/adapters", files={"file": ("x.safetensors", blob)}, data={"adapter_id": "up-1"})
        assert r.status_code == 200 and r.json()["served_by"] == "a"
        assert r.json()["body_len"] > len(blob) and app.router.candidates(None)[-1] == down  # cooling down: last
        assert client.get("/proxy/health").json()["upstreams"][1]["cooling_down_s"] > 0


def test_all_replicas_down_is_a_502_in_the_service_error_shape():
    with proxied([dead_url(), dead_url()]) as (client, _):
        r = client.post("/generate", json={"adapter_id": "x", "prompt": "hi"})
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_unavailable"


def test_503_not_ready_tries_the_next_replica_other_503s_pass_through(fakes):
    a, b = fakes
    adapter_id = next(k for k in IDS if owner_name(fakes, k) == "a")
    with proxied([a.url, b.url]) as (client, _):
        a.fail_503 = "shutting_down"  # draining: refused before any work, safe to resend
        r = client.post("/generate", json={"adapter_id": adapter_id, "prompt": "hi"})
        assert r.status_code == 200 and r.json()["served_by"] == "b"
        a.fail_503 = "store_unavailable"  # the answer itself: passed on, not retried
        r = client.post("/generate", json={"adapter_id": adapter_id, "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
        assert r.headers["retry-after"] == "1"
        assert len(b.seen) == 1


def test_headers_query_and_body_forwarded(fakes):
    a, b = fakes
    with proxied([a.url, b.url]) as (client, _):
        body = {"adapter_id": IDS[2], "prompt": "héllo", "max_tokens": 3}
        r = client.post("/generate?trace=1", json=body,
                        headers={"Authorization": "Bearer sk-svd-0123456789abcdef_secret", "X-Request-Id": "r-1"})
        owner = a if r.json()["served_by"] == "a" else b
        seen = owner.seen[-1]
        assert seen["headers"]["authorization"] == "Bearer sk-svd-0123456789abcdef_secret"
        assert seen["headers"]["x-request-id"] == "r-1"
        assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert seen["headers"]["host"] == owner.url.removeprefix("http://")  # the replica's, not the proxy's
        assert seen["query"] == "trace=1"
        assert json.loads(seen["body"]) == body
        assert r.headers["x-replica"] == owner.name  # response headers come back too


def test_delete_goes_to_the_owner_then_evicts_everywhere(fakes):
    a, b = fakes
    adapter_id = IDS[3]
    with proxied([a.url, b.url]) as (client, _):
        r = client.delete(f"/adapters/{adapter_id}", headers={"Authorization": "Bearer k"})
        assert r.status_code == 204
        assert r.headers["x-svdserve-upstream"] == (a.url if owner_name(fakes, adapter_id) == "a" else b.url)
    for replica in (a, b):
        assert [(s["method"], s["path"], s["headers"].get("authorization")) for s in replica.seen] == [
            ("DELETE", f"/adapters/{adapter_id}", "Bearer k")
        ]


def test_body_over_the_routing_limit_is_413(fakes):
    a, b = fakes
    with proxied([a.url, b.url], max_body_bytes=1000) as (client, _):
        r = client.post("/generate", json={"adapter_id": "x", "prompt": "y" * 2000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert not a.seen and not b.seen
