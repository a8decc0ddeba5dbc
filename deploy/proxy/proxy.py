"""svdserve proxy: sends each request to the svdserve replica that owns its adapter, for device-cache locality.

    python deploy/proxy/proxy.py --host 0.0.0.0 --port 8080 \
        --upstreams http://svdserve-1:8000,http://svdserve-2:8000       # or env SVDSERVE_UPSTREAMS

Routing
  * The adapter id is read from the JSON body's `adapter_id` (POST /generate), its `model` (POST /v1/completions,
    /v1/chat/completions), or the path (/adapters/{id}...). The replica is chosen by rendezvous (highest random
    weight) hashing of (upstream URL, adapter id): every proxy instance agrees without shared state, and adding or
    removing a replica moves only the adapters that replica gains or loses.
  * A request for a merge of adapters (`merged_adapters`) is keyed by the merge (its ids, weights and strategy), so
    the requests for one merge reach the replica that has it merged and cached.
  * Base-model generations (adapter_id null, or a `model` listed in SVDSERVE_PROXY_SPREAD_IDS, e.g. the base
    model's name) are keyed by what a replica's prefix cache can reuse for them: the caller's credentials (cached
    prefixes are per tenant), the request's cache_salt and the prompt's first 256 characters (or the first chat
    message's), so a shared system prompt and a chat's next turn find their cached keys and values.
  * Bounded load (SVDSERVE_PROXY_LOAD_FACTOR, 1.25): a replica already holding more than that factor times its
    share of this proxy's requests in flight is passed over for the next in order, so one hot adapter or system
    prompt cannot pile onto one replica while another idles (consistent hashing with bounded loads).
  * Other requests without an adapter id (uploads, lists, /v1/models, /health) go round-robin.
  * If the chosen replica cannot be connected to, or answers 503 not_ready / shutting_down (the request was refused,
    not run), the next replica in the same order is tried; replicas are stateless and share one Redis store. A
    replica that refused a connection is tried last for a few seconds (SVDSERVE_PROXY_COOLDOWN).
  * DELETE /adapters/{id} goes to the owner; after it succeeds, the other replicas get the same DELETE so each
    drops any device-cached copy (they answer 404 for the record, which is ignored).
  * Responses, server-sent events included, are passed through chunk by chunk, never buffered; a client that
    disconnects closes the upstream request, so the replica frees its batch row.

Other environment (all optional): SVDSERVE_PROXY_HOST (127.0.0.1), SVDSERVE_PROXY_PORT (8080),
SVDSERVE_PROXY_CONNECT_TIMEOUT (2 s), SVDSERVE_PROXY_READ_TIMEOUT (600 s between bytes; 0 = none),
SVDSERVE_PROXY_COOLDOWN (5 s), SVDSERVE_PROXY_MAX_BODY (bodies read for routing, default 16 MiB),
SVDSERVE_PROXY_SPREAD_IDS (comma-separated ids that mean the base model, e.g. its name),
SVDSERVE_PROXY_LOAD_FACTOR (1.25; 0 = route by hash alone).
Own endpoints: GET /proxy/health, GET /proxy/route/{adapter_id}. Needs only httpx and uvicorn (no torch).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpx

log = logging.getLogger("svdserve.proxy")

# POST routes whose JSON body names the adapter, and the field that does.
BODY_KEY_ROUTES = {"/generate": "adapter_id", "/v1/completions": "model", "/v1/chat/completions": "model"}
# Characters of a base-model prompt that key its route: a system prompt or few-shot preamble is shared within them.
PREFIX_ROUTE_CHARS = 256
# Headers that identify the caller (its tenant): prefix caches are per tenant, so they are part of a prefix's key.
CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")
# 503 codes that mean "refused before any work": safe to send the same request to the next replica.
RETRYABLE_503_CODES = {"not_ready", "shutting_down"}
# Per-connection headers (RFC 9110 §7.6.1) are not forwarded; content-length is set again where the body changes.
HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host",
}
UPSTREAM_HEADER = b"x-svdserve-upstream"


# --- routing --------------------------------------------------------------------------------------------------


def hrw_score(upstream: str, key: str) -> int:
    """Rendezvous weight of `upstream` for `key`: a stable 64-bit hash (never Python's per-process hash())."""
    digest = hashlib.blake2b(f"{upstream}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def hrw_order(upstreams: Iterable[str], key: str) -> list[str]:
    """Upstreams by descending weight for `key`: the first owns it, the rest are its fallbacks in order."""
    return sorted(upstreams, key=lambda u: (hrw_score(u, key), u), reverse=True)


def _json_object(body: bytes) -> dict | None:
    """A request body parsed as a JSON object, or None (not JSON, or not an object)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def body_routing_key(body: bytes, field: str) -> str | None:
    """The adapter id in a JSON request body, or None (not JSON, not an object, field missing/null/not a string)."""
    value = (_json_object(body) or {}).get(field)
    return value if isinstance(value, str) and value else None


def prefix_routing_key(body: bytes, headers: list[tuple[bytes, bytes]]) -> str | None:
    """The route key of a base-model generation: a digest of the caller's credentials, its cache_salt and the
    prompt's first PREFIX_ROUTE_CHARS characters (the first chat message's for chats: the system prompt), or None
    when the body has no prompt to key by. Credentials are hashed, never kept or logged."""
    data = _json_object(body)
    if data is None:
        return None
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        prompt = prompt[0]  # a batch of prompts (/v1/completions): its first
    messages = data.get("messages")
    if prompt is None and isinstance(messages, list) and messages and isinstance(messages[0], dict):
        prompt = messages[0].get("content")
    if isinstance(prompt, list) and prompt:  # token ids, or OpenAI's content parts
        prompt = json.dumps(prompt, separators=(",", ":"))
    if not isinstance(prompt, str) or not prompt:
        return None
    salt = data.get("cache_salt")
    h = hashlib.blake2b(digest_size=16)
    for name in CREDENTIAL_HEADERS:
        for k, v in headers:
            if k.lower() == name:
                h.update(name + b"\0" + v + b"\0")
    h.update(f"{salt if isinstance(salt, str) else ''}\0{prompt[:PREFIX_ROUTE_CHARS]}".encode())
    return "prefix:" + h.hexdigest()


def merge_routing_key(body: bytes) -> str | None:
    """The route key of a request for a merge of adapters: a digest of its `merged_adapters` (ids, weights,
    strategy: what decides the merged weights), or None when the body asks for none."""
    merged = (_json_object(body) or {}).get("merged_adapters")
    if not isinstance(merged, dict) or not merged.get("ids"):
        return None
    return "merge:" + hashlib.blake2b(json.dumps(merged, sort_keys=True).encode(), digest_size=16).hexdigest()


def path_routing_key(path: str) -> str | None:
    """`/adapters/{id}` and anything below it → id. (ASGI paths are already percent-decoded; ids hold no '/'.)"""
    parts = path.split("/")
    if len(parts) >= 3 and parts[0] == "" and parts[1] == "adapters" and parts[2]:
        return parts[2]
    return None


class Router:
    """Candidate order per request: HRW order for a key, round-robin without one; replicas over the load bound
    next; recently failed ones last."""

    def __init__(self, upstreams: list[str], cooldown_s: float = 5.0, spread_ids: Iterable[str] = (),
                 load_factor: float = 1.25) -> None:
        cleaned = [u.strip().rstrip("/") for u in upstreams if u.strip()]
        if not cleaned:
            raise ValueError("no upstreams configured (SVDSERVE_UPSTREAMS or --upstreams)")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError(f"duplicate upstreams in {cleaned}")
        for u in cleaned:
            url = httpx.URL(u)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError(f"upstream {u!r} is not an http(s)://host[:port] URL")
        if load_factor != 0 and load_factor < 1:
            raise ValueError(f"load factor {load_factor} must be ≥ 1 (1.25: a replica takes up to 25 % over its "
                             "share of requests in flight), or 0 to route by hash alone")
        self.upstreams = cleaned
        self.cooldown_s = cooldown_s
        self.spread_ids = {s for s in spread_ids if s}
        self.load_factor = load_factor
        self.in_flight = {u: 0 for u in cleaned}  # requests this proxy has sent to each replica and not finished
        self._down_until = {u: 0.0 for u in cleaned}
        self._rr = itertools.count()

    def key_for(self, key: str | None) -> str | None:
        return None if key in self.spread_ids else key

    def load_bound(self) -> int:
        """Requests in flight a replica may hold and still be chosen first: ⌈factor · (in flight + 1) / replicas⌉."""
        total = sum(self.in_flight.values())
        return math.ceil(self.load_factor * (total + 1) / len(self.upstreams))

    def candidates(self, key: str | None) -> list[str]:
        if key is not None:
            order = hrw_order(self.upstreams, key)
        else:
            i = next(self._rr) % len(self.upstreams)
            order = self.upstreams[i:] + self.upstreams[:i]
        if self.load_factor:  # stable: the key's own order among the replicas under the bound, then the others'
            bound = self.load_bound()
            order = [u for u in order if self.in_flight[u] < bound] + [u for u in order if self.in_flight[u] >= bound]
        now = time.monotonic()
        return [u for u in order if self._down_until[u] <= now] + [u for u in order if self._down_until[u] > now]

    def mark_down(self, upstream: str) -> None:
        self._down_until[upstream] = time.monotonic() + self.cooldown_s

    def mark_up(self, upstream: str) -> None:
        self._down_until[upstream] = 0.0

    def state(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"url": u, "cooling_down_s": round(max(0.0, self._down_until[u] - now), 3), "in_flight": self.in_flight[u]}
                for u in self.upstreams]


# --- the ASGI app ---------------------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _DisconnectWatch:
    """Once the request body is fully read, waits for http.disconnect and then calls `on_disconnect`."""

    def __init__(self, receive: Callable, on_disconnect: Callable[[], Any]) -> None:
        self.receive, self.on_disconnect = receive, on_disconnect
        self.fired = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.fired = True
        self.on_disconnect()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class _StreamedBody:
    """The client's request body, read from ASGI receive as httpx sends it upstream (uploads are not buffered).
    `started` tells whether it can still be sent to another upstream (nothing consumed yet)."""

    def __init__(self, receive: Callable, on_complete: Callable[[], Any]) -> None:
        self.receive, self.on_complete = receive, on_complete
        self.started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            if chunk := message.get("body", b""):
                yield chunk
            if not message.get("more_body", False):
                self.on_complete()
                return


async def _read_body(receive: Callable, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _error(status: int, code: str, message: str, extra_headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, list, bytes]:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    return status, headers, body


async def _send_whole(send: Callable, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Proxy:
    """ASGI app. `client` may be given (tests); otherwise one is made at startup and closed at shutdown."""

    def __init__(
        self,
        upstreams: list[str],
        *,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float | None = 600.0,
        cooldown_s: float = 5.0,
        max_body_bytes: int = 16 << 20,
        spread_ids: Iterable[str] = (),
        load_factor: float = 1.25,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.router = Router(upstreams, cooldown_s=cooldown_s, spread_ids=spread_ids, load_factor=load_factor)
        self.max_body_bytes = max_body_bytes
        self.timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=60.0, pool=30.0)
        self._client = client

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            transport = httpx.AsyncHTTPTransport(
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                # Headers and body go out in separate writes: without NODELAY, Nagle + delayed ACK can add ~40 ms.
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            )
            self._client = httpx.AsyncClient(
                transport=transport,
                timeout=self.timeout,
                trust_env=False,  # never route replica traffic through an HTTP(S)_PROXY from the environment
                follow_redirects=False,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    _ = self.client
                    log.info("proxy for %s", ", ".join(self.router.upstreams))
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # no websockets in this API
        path = scope["path"]
        if path == "/proxy/health" or path.startswith("/proxy/route/"):
            await self._own_endpoint(scope, path, send)
            return
        await self._proxy(scope, receive, send)

    async def _own_endpoint(self, scope: dict, path: str, send: Callable) -> None:
        if path == "/proxy/health":
            payload: dict[str, Any] = {"status": "ok", "upstreams": self.router.state()}
        else:
            key = path.removeprefix("/proxy/route/")
            payload = {"adapter_id": key, "order": self.router.candidates(self.router.key_for(key))}
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await _send_whole(send, 200, headers, body)

    async def _proxy(self, scope: dict, receive: Callable, send: Callable) -> None:
        method, path = scope["method"], scope["path"]
        req_headers = [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP]
        route = path.rstrip("/") or "/"
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
        serve_task: asyncio.Future | None = None
        watch = _DisconnectWatch(receive, lambda: serve_task.cancel() if serve_task else None)

        body: bytes | _StreamedBody
        key: str | None = None
        if (method == "POST" and route in BODY_KEY_ROUTES) or not has_body:
            try:
                body = await _read_body(receive, self.max_body_bytes)
            except _TooLarge:
                await _send_whole(send, *_error(
                    413, "too_large", f"request body over the proxy's {self.max_body_bytes} bytes",
                    [(b"connection", b"close")],
                ))
                return
            except _ClientGone:
                return
            req_headers = [(k, v) for k, v in req_headers if k != b"content-length"]  # httpx sets it from the bytes
            if method == "POST" and route in BODY_KEY_ROUTES:
                key = merge_routing_key(body) or self.router.key_for(body_routing_key(body, BODY_KEY_ROUTES[route]))
                if key is None:  # the base model: keyed by what its prefix cache can reuse
                    key = prefix_routing_key(body, req_headers)
            watch.start()
        else:
            body = _StreamedBody(receive, on_complete=watch.start)
        if key is None:
            key = self.router.key_for(path_routing_key(path))

        client_addr = scope.get("client")
        forwarded_for = [v for k, v in req_headers if k == b"x-forwarded-for"]
        req_headers = [(k, v) for k, v in req_headers if k != b"x-forwarded-for"]
        if client_addr:
            prior = forwarded_for[0] + b", " if forwarded_for else b""
            req_headers.append((b"x-forwarded-for", prior + client_addr[0].encode()))
        target = scope.get("raw_path") or path.encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]

        serve_task = asyncio.ensure_future(self._serve(method, target, req_headers, body, key, path, send))
        try:
            await serve_task
        except asyncio.CancelledError:
            if not watch.fired:
                raise  # this handler itself is being cancelled (shutdown)
            log.info("%s %s: client disconnected; upstream request closed", method, path)
        finally:
            watch.stop()

    async def _serve(
        self, method: str, target: bytes, headers: list, body: bytes | _StreamedBody, key: str | None, path: str,
        send: Callable,
    ) -> None:
        candidates = self.router.candidates(key)
        failures: list[str] = []
        for i, upstream in enumerate(candidates):
            if isinstance(body, _StreamedBody) and body.started:
                break  # a streamed body cannot be sent twice
            last = i == len(candidates) - 1
            self.router.in_flight[upstream] += 1  # until its answer is through (streams included)
            try:
                request = self.client.build_request(method, upstream + target.decode("latin-1"), headers=headers, content=body)
                try:
                    response = await self.client.send(request, stream=True)
                except _ClientGone:
                    return
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    self.router.mark_down(upstream)
                    failures.append(f"{upstream}: {type(exc).__name__} {exc}".strip())
                    log.warning("%s %s: cannot connect to %s (%s); trying the next replica", method, path, upstream, exc)
                    continue
                except httpx.TimeoutException as exc:
                    await _send_whole(send, *_error(504, "upstream_timeout", f"{upstream} did not answer in time ({type(exc).__name__})"))
                    return
                except httpx.HTTPError as exc:
                    await _send_whole(send, *_error(502, "upstream_error", f"{upstream}: {type(exc).__name__} {exc}".strip()))
                    return
                try:
                    prefetched = None
                    if response.status_code == 503:
                        prefetched = b"".join([chunk async for chunk in response.aiter_raw()])  # errors are small
                        code = _error_code(response, prefetched)
                        replayable = not (isinstance(body, _StreamedBody) and body.started)
                        if code in RETRYABLE_503_CODES and replayable and not last:
                            failures.append(f"{upstream}: 503 {code}")
                            log.warning("%s %s: %s answered 503 %s; trying the next replica", method, path, upstream, code)
                            continue
                    self.router.mark_up(upstream)
                    if method == "DELETE" and key is not None and path_routing_key(path) and 200 <= response.status_code < 300:
                        await self._evict_elsewhere(upstream, target, headers)
                    await self._forward(response, upstream, send, prefetched)
                    return
                finally:
                    await response.aclose()
            finally:
                self.router.in_flight[upstream] -= 1
        message = "no svdserve replica could take the request: " + "; ".join(failures or ["request body already sent"])
        await _send_whole(send, *_error(502, "upstream_unavailable", message, [(b"retry-after", b"1")]))

    async def _evict_elsewhere(self, owner: str, target: bytes, headers: list) -> None:
        """The record is gone from the shared store; make every other replica drop its device-cached copy too."""
        others = [u for u in self.router.upstreams if u != owner]

        async def one(upstream: str) -> None:
            try:
                r = await self.client.request("DELETE", upstream + target.decode("latin-1"), headers=headers,
                                              timeout=httpx.Timeout(5.0))
                log.debug("eviction on %s: %d", upstream, r.status_code)
            except httpx.HTTPError as exc:
                log.warning("could not ask %s to evict %s (%s); its cached copy stays until LRU eviction or restart",
                            upstream, target.decode("latin-1"), exc)

        await asyncio.gather(*(one(u) for u in others))

    async def _forward(self, response: httpx.Response, upstream: str, send: Callable, prefetched: bytes | None) -> None:
        headers = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
        headers.append((UPSTREAM_HEADER, upstream.encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        if prefetched is not None:
            await send({"type": "http.response.body", "body": prefetched, "more_body": False})
            return
        try:
            async for chunk in response.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            # Headers are out; the only honest signal left is an incomplete response (the server closes it).
            log.warning("upstream %s broke off mid-response (%s)", upstream, exc)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _error_code(response: httpx.Response, body: bytes) -> str | None:
    if response.headers.get("content-encoding") or "json" not in response.headers.get("content-type", ""):
        return None
    try:
        err = json.loads(body).get("error")
        return err.get("code") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        return None


# --- command line ---------------------------------------------------------------------------------------------


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python deploy/proxy/proxy.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstreams", default=os.environ.get("SVDSERVE_UPSTREAMS", ""),
                   help="comma-separated replica base URLs (env SVDSERVE_UPSTREAMS)")
    p.add_argument("--host", default=os.environ.get("SVDSERVE_PROXY_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("SVDSERVE_PROXY_PORT", "8080")))
    p.add_argument("--connect-timeout", type=float, default=_env_float("SVDSERVE_PROXY_CONNECT_TIMEOUT", 2.0))
    p.add_argument("--read-timeout", type=float, default=_env_float("SVDSERVE_PROXY_READ_TIMEOUT", 600.0),
                   help="seconds without a byte from the replica before 504 (0: no limit)")
    p.add_argument("--cooldown", type=float, default=_env_float("SVDSERVE_PROXY_COOLDOWN", 5.0))
    p.add_argument("--max-body", type=int, default=int(os.environ.get("SVDSERVE_PROXY_MAX_BODY", str(16 << 20))))
    p.add_argument("--spread-ids", default=os.environ.get("SVDSERVE_PROXY_SPREAD_IDS", ""),
                   help="comma-separated ids that mean the base model (e.g. its name): routed by prompt prefix, not id")
    p.add_argument("--load-factor", type=float, default=_env_float("SVDSERVE_PROXY_LOAD_FACTOR", 1.25),
                   help="a replica over this factor times its share of requests in flight is passed over (0: off)")
    p.add_argument("--log-level", default=os.environ.get("SVDSERVE_LOG_LEVEL", "info"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = Proxy(
            args.upstreams.split(","),
            connect_timeout_s=args.connect_timeout,
            read_timeout_s=args.read_timeout or None,
            cooldown_s=args.cooldown,
            max_body_bytes=args.max_body,
            spread_ids=args.spread_ids.split(","),
            load_factor=args.load_factor,
        )
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    import uvicorn

    # The replica's own Server/Date headers are forwarded; uvicorn must not add a second pair.
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, log_level=args.log_level.lower(),
                server_header=False, date_header=False, timeout_graceful_shutdown=35)
    return 0


if __name__ == "__main__":
    sys.exit(main())
