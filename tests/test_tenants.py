"""Tenants and API keys: isolation on every endpoint, 401/403, the admin API, hashed key storage (disk and
Redis), per-tenant limits, auth-off mode. The app on the tiny base through httpx's ASGI transport."""
from __future__ import annotations

import hashlib
import json
import logging

import pytest

from adapters_store.records import record_for
from _reliability import REDIS_URL, redis_key_prefix
from adapters_store.redis_store import RedisStore
from service.auth import Auth
from service.tenants import DiskTenantStore, RateLimiter, Tenant, TenantStore, new_api_key

pytestmark = pytest.mark.anyio

ADMIN = "test-admin-key-" + "a" * 24
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
PROMPT = "Hello there"
CHAT = [{"role": "user", "content": "Name a colour."}]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_tenant(client, tenant: str, **limits) -> str:
    """Create `tenant` with `limits` and return a fresh API key for it."""
    resp = await client.post("/admin/tenants", json={"tenant": tenant, **limits}, headers=ADMIN_H)
    assert resp.status_code == 201, resp.text
    resp = await client.post(f"/admin/tenants/{tenant}/keys", headers=ADMIN_H)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["tenant"] == tenant and body["key"].startswith("sk-svd-" + body["key_id"])
    return body["key"]


async def upload(client, key: str | None, blob: bytes, adapter_id: str):
    headers = bearer(key) if key else {}
    return await client.post("/adapters", files={"file": ("a.safetensors", blob)}, data={"adapter_id": adapter_id}, headers=headers)


def err(resp, status: int, code: str | None = None) -> dict:
    """The error object of an answer in either shape (project or OpenAI), checked for status and code."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    e = resp.json()["error"]
    if code is not None:
        assert e["code"] == code, e
    return e


# (method, path, json body or None for GET/DELETE, is an OpenAI route); {id} is filled in per test.
def endpoints(base_name: str, adapter_id: str) -> list[tuple[str, str, dict | None]]:
    return [
        ("GET", "/adapters", None),
        ("GET", f"/adapters/{adapter_id}", None),
        ("DELETE", f"/adapters/{adapter_id}", None),
        ("POST", "/generate", {"adapter_id": adapter_id, "prompt": PROMPT, "max_tokens": 4}),
        ("POST", "/v1/completions", {"model": adapter_id, "prompt": PROMPT, "max_tokens": 4}),
        ("POST", "/v1/chat/completions", {"model": adapter_id, "messages": CHAT, "max_tokens": 4}),
        ("GET", "/v1/models", None),
        ("GET", f"/v1/models/{adapter_id}", None),
    ]


async def call(client, method: str, path: str, body: dict | None, headers: dict[str, str]):
    return await client.request(method, path, json=body, headers=headers)


# --- 401 / 403 --------------------------------------------------------------------------------------------


async def test_every_endpoint_needs_a_valid_tenant_key(serve, store, make_blob):
    async with serve(store, auth="on", admin_key=ADMIN) as client:
        key = await new_tenant(client, "acme")
        assert (await upload(client, key, make_blob("osora"), "mine")).status_code == 201
        malformed = "not-a-key"
        unknown = "sk-svd-0123456789abcdef_" + "z" * 43
        forged = key[:-4] + ("aaaa" if not key.endswith("aaaa") else "bbbb")  # right key id, wrong secret
        cases = endpoints("tiny-random-llama", "mine") + [("POST", "/adapters", None)]
        for method, path, body in cases:
            for headers, code in (({}, "missing_api_key"), (bearer(malformed), "invalid_api_key"),
                                  (bearer(unknown), "invalid_api_key"), (bearer(forged), "invalid_api_key"),
                                  ({"Authorization": f"Basic {key}"}, "invalid_api_key")):
                resp = await call(client, method, path, body, headers)
                e = err(resp, 401, code)
                assert resp.headers["www-authenticate"] == "Bearer", (method, path)
                if path.startswith("/v1/"):
                    assert set(e) == {"message", "type", "code", "param"} and e["type"] == "authentication_error"
                else:
                    assert set(e) == {"code", "message"}
            # the admin key is not a tenant key
            err(await call(client, method, path, body, ADMIN_H), 403, "forbidden")
        # the adapter survived every refused DELETE; the right key works, also as X-API-Key
        assert (await client.get("/adapters/mine", headers={"X-API-Key": key})).status_code == 200
        assert (await client.post("/generate", json={"adapter_id": "mine", "prompt": PROMPT, "max_tokens": 2},
                                  headers=bearer(key))).status_code == 200
        # public routes need no key
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200


async def test_admin_api_needs_the_admin_key(serve, store):
    async with serve(store, auth="on", admin_key=ADMIN) as client:
        key = await new_tenant(client, "acme", max_adapters=5, requests_per_minute=600, max_tokens=100)
        admin_calls = [
            ("POST", "/admin/tenants", {"tenant": "evil"}),
            ("GET", "/admin/tenants", None),
            ("PATCH", "/admin/tenants/acme", {"max_adapters": 1000}),
            ("POST", "/admin/tenants/acme/keys", None),
            ("DELETE", "/admin/keys/0123456789abcdef", None),
        ]
        for method, path, body in admin_calls:
            resp = await call(client, method, path, body, {})
            err(resp, 401, "missing_api_key")
            assert resp.headers["www-authenticate"] == "Bearer"
            err(await call(client, method, path, body, bearer("wrong")), 401, "invalid_api_key")
            err(await call(client, method, path, body, bearer(key)), 403, "forbidden")  # a tenant key
        listing = (await client.get("/admin/tenants", headers=ADMIN_H)).json()
        assert [t["tenant"] for t in listing["tenants"]] == ["acme"]  # "evil" was never created
        acme = listing["tenants"][0]
        assert (acme["max_adapters"], acme["requests_per_minute"], acme["max_tokens"], acme["adapters"]) == (5, 600, 100, 0)
        assert len(acme["keys"]) == 1 and "key" not in acme["keys"][0]

        err(await client.post("/admin/tenants", json={"tenant": "acme"}, headers=ADMIN_H), 409, "tenant_exists")
        err(await client.post("/admin/tenants", json={"tenant": "../x"}, headers=ADMIN_H), 400, "invalid_tenant")
        err(await client.post("/admin/tenants", json={"tenant": "t", "max_adapters": -1}, headers=ADMIN_H), 422)
        err(await client.post("/admin/tenants/nobody/keys", headers=ADMIN_H), 404, "tenant_not_found")
        err(await client.patch("/admin/tenants/nobody", json={}, headers=ADMIN_H), 404, "tenant_not_found")
        patched = await client.patch("/admin/tenants/acme", json={"max_tokens": None, "max_adapters": 7}, headers=ADMIN_H)
        assert patched.status_code == 200 and (patched.json()["max_tokens"], patched.json()["max_adapters"]) == (None, 7)
        assert patched.json()["weight"] is None  # fair share's default weight, 1
        weighted = await client.patch("/admin/tenants/acme", json={"weight": 2.5}, headers=ADMIN_H)
        assert weighted.status_code == 200 and weighted.json()["weight"] == 2.5 and weighted.json()["max_adapters"] == 7
        err(await client.patch("/admin/tenants/acme", json={"weight": 0}, headers=ADMIN_H), 422)
        listed = (await client.get("/admin/tenants", headers=ADMIN_H)).json()["tenants"][0]
        assert listed["weight"] == 2.5  # stored

        # a second key works alongside the first; revoking one leaves the other
        second = (await client.post("/admin/tenants/acme/keys", headers=ADMIN_H)).json()
        assert second["key"] != key
        assert (await client.get("/adapters", headers=bearer(second["key"]))).status_code == 200
        assert (await client.delete(f"/admin/keys/{second['key_id']}", headers=ADMIN_H)).status_code == 204
        err(await client.get("/adapters", headers=bearer(second["key"])), 401, "invalid_api_key")
        assert (await client.get("/adapters", headers=bearer(key))).status_code == 200
        err(await client.delete(f"/admin/keys/{second['key_id']}", headers=ADMIN_H), 404, "key_not_found")


async def test_admin_api_is_disabled_without_an_admin_key(serve, store):
    async with serve(store, auth="on") as client:
        err(await client.get("/admin/tenants"), 403, "admin_disabled")
        err(await client.get("/adapters"), 401, "missing_api_key")


# --- isolation ---------------------------------------------------------------------------------------------


async def test_tenants_cannot_see_use_or_delete_each_others_adapters(serve, store, make_blob, tiny_base):
    async with serve(store, auth="on", admin_key=ADMIN) as client:
        a, b = await new_tenant(client, "tenant-a"), await new_tenant(client, "tenant-b")
        assert (await upload(client, a, make_blob("loraxs", rank=4, seed=1), "a-1")).status_code == 201
        assert (await upload(client, b, make_blob("sorsa", rank=2, seed=2), "b-1")).status_code == 201
        assert store.get_record("a-1").tenant == "tenant-a" and store.get_record("b-1").tenant == "tenant-b"

        # A on B's adapter answers exactly as A on an adapter that does not exist (ids substituted)
        for method, path, body in endpoints(tiny_base.name, "b-1"):
            foreign = await call(client, method, path, body, bearer(a))
            missing = await call(client, method, path.replace("b-1", "zz-9"),
                                 json.loads(json.dumps(body).replace("b-1", "zz-9")) if body else None, bearer(a))
            if path in ("/adapters", "/v1/models"):  # lists: B's adapter is simply absent
                assert foreign.status_code == 200
                listed = [x["adapter_id"] for x in foreign.json()["adapters"]] if path == "/adapters" else \
                    [m["id"] for m in foreign.json()["data"]]
                assert "b-1" not in listed and "a-1" in listed
                continue
            assert foreign.status_code == missing.status_code == 404, (path, foreign.text)
            assert foreign.text.replace("b-1", "X") == missing.text.replace("zz-9", "X"), (path, foreign.text, missing.text)
            assert foreign.headers.get("www-authenticate") is None

        # B's adapter is untouched and B can still use it; A uses its own on every route
        assert store.get_record("b-1") is not None
        assert (await client.get("/adapters/b-1", headers=bearer(b))).status_code == 200
        for method, path, body in endpoints(tiny_base.name, "a-1"):
            if method != "DELETE":
                resp = await call(client, method, path, body, bearer(a))
                assert resp.status_code == 200, (path, resp.text)

        # ids are global: A cannot take B's id; the 409 reads exactly like B's own duplicate upload
        taken_by_other = await upload(client, a, make_blob("osora", seed=3), "b-1")
        own_duplicate = await upload(client, b, make_blob("osora", seed=3), "b-1")
        assert err(taken_by_other, 409, "adapter_exists") == err(own_duplicate, 409, "adapter_exists")
        assert store.get_record("b-1").method == "sorsa"

        assert (await client.delete("/adapters/a-1", headers=bearer(a))).status_code == 204
        assert (await client.get("/adapters", headers=bearer(b))).json()["count"] == 1


# --- key storage -------------------------------------------------------------------------------------------


async def test_tenants_never_reuse_each_others_cached_prompts(serve, store, tiny_base):
    """The base model is every tenant's: a prompt one tenant sent is cached for that tenant only (else its
    usage.cached_tokens, or a faster first token, would tell another tenant what was asked), and within a tenant
    cache_salt scopes it further, as vLLM's does."""
    long_prompt = "You are the support assistant of a bakery. When do you open?"  # tiny: one token a byte

    async def cached(key: str, api: str, **extra) -> int:
        if api == "generate":
            body = {"adapter_id": None, "prompt": long_prompt, "max_tokens": 2, **extra}
            resp = await client.post("/generate", json=body, headers=bearer(key))
            assert resp.status_code == 200, resp.text
            return resp.json()["usage"]["cached_tokens"]
        body = {"model": tiny_base.name, "prompt": long_prompt, "max_tokens": 2, **extra}
        resp = await client.post("/v1/completions", json=body, headers=bearer(key))
        assert resp.status_code == 200, resp.text
        return resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    async with serve(store, auth="on", admin_key=ADMIN) as client:
        a, b = await new_tenant(client, "tenant-a"), await new_tenant(client, "tenant-b")
        for api in ("generate", "completions"):
            assert await cached(a, api) == 0  # first time (the two APIs encode the prompt differently)
            assert await cached(b, api) == 0  # the same prompt, another tenant: nothing of A's
            assert await cached(a, api) > 0 and await cached(b, api) > 0  # each its own again
            assert await cached(a, api, cache_salt="s1") == 0  # a salt: a scope of its own
            assert await cached(a, api, cache_salt="s1") > 0
            assert await cached(b, api, cache_salt="s1") == 0  # the same salt in another tenant: still not shared
        err(await client.post("/generate", json={"prompt": "hi", "cache_salt": ""}, headers=bearer(a)), 422)


async def test_every_generation_carries_its_tenant_weight_and_priority_to_the_engines_admission(serve, store, tiny_base):
    """Admission shares rows between tenants (Engine._admission_order): each route must tell the engine who asked."""
    async with serve(store, auth="on", admin_key=ADMIN) as client:
        a, b = await new_tenant(client, "tenant-a"), await new_tenant(client, "tenant-b", weight=3)
        engine = client.app.state.engine
        seen: list[tuple[str | None, int, float]] = []
        real = engine._submit
        engine._submit = lambda ids, aid, params, version=None: (
            seen.append((params.tenant, params.priority, params.tenant_weight)), real(ids, aid, params, version))[1]
        for key, priority in ((a, None), (b, -3)):
            extra = {} if priority is None else {"priority": priority}
            for path, body in (("/generate", {"prompt": "hi", "max_tokens": 2}),
                               ("/v1/completions", {"model": tiny_base.name, "prompt": "hi", "max_tokens": 2}),
                               ("/v1/chat/completions", {"model": tiny_base.name, "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "hi"}]})):
                resp = await client.post(path, json={**body, **extra}, headers=bearer(key))
                assert resp.status_code == 200, resp.text
        # and its weight (the tenant's, default 1) and the request's priority (vLLM's extra, default 0)
        assert seen == [("tenant-a", 0, 1.0)] * 3 + [("tenant-b", -3, 3.0)] * 3
        resp = await client.post("/generate", json={"prompt": "hi", "priority": 1 << 40}, headers=bearer(a))
        assert resp.status_code == 422 and "priority" in resp.text


async def test_keys_are_stored_hashed_on_disk(serve, store):
    async with serve(store, auth="on", admin_key=ADMIN) as client:
        key = await new_tenant(client, "acme")
        path = store.root / "tenants.json"
        raw = path.read_text()
        secret = key.split("_", 1)[1]
        assert key not in raw and secret not in raw and ADMIN not in raw
        data = json.loads(raw)
        (key_id, record), = data["keys"].items()
        assert record["sha256"] == hashlib.sha256(key.encode()).hexdigest() and key.startswith(f"sk-svd-{key_id}_")
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-tenants")]  # atomic write left no temp


# --- limits ------------------------------------------------------------------------------------------------


async def test_adapter_quota(serve, store, make_blob):
    async with serve(store, auth="on", admin_key=ADMIN) as client:
        key = await new_tenant(client, "small", max_adapters=2)
        other = await new_tenant(client, "big")
        for i in range(2):
            assert (await upload(client, key, make_blob("osora", seed=i), f"s-{i}")).status_code == 201
        e = err(await upload(client, key, make_blob("osora", seed=9), "s-2"), 403, "adapter_quota_exceeded")
        assert "limit is 2" in e["message"]
        assert store.get_record("s-2") is None
        assert (await upload(client, other, make_blob("osora", seed=9), "o-1")).status_code == 201  # per tenant
        assert (await client.delete("/adapters/s-0", headers=bearer(key))).status_code == 204
        assert (await upload(client, key, make_blob("osora", seed=9), "s-2")).status_code == 201


async def test_rate_limit_is_429_with_retry_after(serve, store):
    async with serve(store, auth="on", admin_key=ADMIN) as client:
        key = await new_tenant(client, "chatty", requests_per_minute=3)
        other = await new_tenant(client, "quiet")
        for _ in range(3):
            assert (await client.get("/adapters", headers=bearer(key))).status_code == 200
        resp = await client.get("/adapters", headers=bearer(key))
        e = err(resp, 429, "rate_limited")
        assert "3 requests per minute" in e["message"] and 1 <= int(resp.headers["retry-after"]) <= 20
        resp = await client.post("/v1/completions", json={"model": "x", "prompt": "hi"}, headers=bearer(key))
        assert err(resp, 429, "rate_limited")["type"] == "rate_limit_error" and "retry-after" in resp.headers
        assert (await client.get("/adapters", headers=bearer(other))).status_code == 200  # other tenants unaffected


async def test_n_choices_count_as_n_requests_against_the_rate_limit(serve, store, tiny_base):
    async with serve(store, auth="on", admin_key=ADMIN) as client:
        key = await new_tenant(client, "fanout", requests_per_minute=5)
        body = {"model": tiny_base.name, "messages": CHAT, "max_tokens": 2}
        e = err(await client.post("/v1/chat/completions", json={**body, "n": 6}, headers=bearer(key)), 400, "too_many_choices")
        assert e["param"] == "n" and "at most 5" in e["message"]
        ok = await client.post("/v1/chat/completions", json={**body, "n": 3}, headers=bearer(key))
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 3
        # 1 + 3 charged so far (the refused request's one included): one left, so 2 choices are over
        resp = await client.post("/v1/completions", json={"model": tiny_base.name, "prompt": PROMPT, "max_tokens": 2, "n": 2},
                                 headers=bearer(key))
        e = err(resp, 429, "rate_limited")
        assert "2 choices count as 2 requests" in e["message"] and int(resp.headers["retry-after"]) >= 1


async def test_max_tokens_limit(serve, store, tiny_base):
    async with serve(store, auth="on", admin_key=ADMIN) as client:
        key = await new_tenant(client, "brief", max_tokens=4)
        h = bearer(key)
        e = err(await client.post("/generate", json={"prompt": PROMPT, "max_tokens": 5}, headers=h), 400, "max_tokens_too_large")
        assert "limit of 4" in e["message"]
        e = err(await client.post("/v1/completions", json={"model": tiny_base.name, "prompt": PROMPT, "max_tokens": 5}, headers=h), 400)
        assert e["param"] == "max_tokens"
        e = err(await client.post("/v1/chat/completions", json={"model": tiny_base.name, "messages": CHAT,
                                                                "max_completion_tokens": 50}, headers=h), 400)
        assert e["param"] == "max_completion_tokens"
        # at the limit: fine; no max_tokens at all: capped at the limit instead of refused
        ok = await client.post("/generate", json={"prompt": PROMPT, "max_tokens": 4, "raw": True}, headers=h)
        assert ok.status_code == 200
        capped = await client.post("/generate", json={"prompt": PROMPT, "raw": True}, headers=h)
        assert capped.status_code == 200 and capped.json()["usage"]["completion_tokens"] <= 4
        chat = await client.post("/v1/chat/completions", json={"model": tiny_base.name, "messages": CHAT}, headers=h)
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] <= 4


# --- auth off ----------------------------------------------------------------------------------------------


async def test_auth_off_acts_as_tenant_default(serve, store, make_blob, tiny_base, tiny_factors, caplog):
    from svd_adapters.adapter import new_adapter
    from adapters_store.format import adapter_to_bytes

    # an adapter of another tenant already in the store (uploaded while auth was on)
    blob = adapter_to_bytes(new_adapter("osora", 2, tiny_factors, tiny_base.name))
    store.put(record_for(new_adapter("osora", 2, tiny_factors, tiny_base.name), blob, "foreign", tenant="acme"), blob)
    with caplog.at_level(logging.INFO, logger="service.auth"):
        async with serve(store) as client:  # no admin key, auth auto → off
            assert "auth: OFF — single-user mode, every request acts as tenant 'default'" in caplog.text
            resp = await upload(client, None, make_blob("osora"), "mine")
            assert resp.status_code == 201
            assert store.get_record("mine").tenant == "default"
            assert [a["adapter_id"] for a in (await client.get("/adapters")).json()["adapters"]] == ["mine"]
            err(await client.get("/adapters/foreign"), 404, "adapter_not_found")
            err(await client.post("/generate", json={"adapter_id": "foreign", "prompt": PROMPT}), 404)
            # any or no key: still tenant default
            assert (await client.get("/adapters/mine", headers=bearer("whatever"))).status_code == 200
            models = (await client.get("/v1/models")).json()
            assert [m["id"] for m in models["data"]] == [tiny_base.name, "mine"]
            err(await client.get("/admin/tenants"), 403, "admin_disabled")


async def test_startup_logs_the_auth_mode(serve, store, caplog):
    with caplog.at_level(logging.INFO, logger="service.auth"):
        async with serve(store, admin_key=ADMIN):  # auto + admin key → on
            pass
    assert "auth: ON" in caplog.text and "auth: OFF" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="service.auth"):
        async with serve(store, auth="off", admin_key=ADMIN) as client:  # explicitly off: admin API still works
            assert (await client.get("/admin/tenants", headers=ADMIN_H)).status_code == 200
            assert (await client.get("/adapters")).status_code == 200
    assert "auth: OFF" in caplog.text


async def test_errors_before_routing_use_openai_shape_on_v1(serve, store):
    """The body-size limit and unknown /v1 routes answer in OpenAI's error shape too."""
    async with serve(store, max_request_bytes=1000) as client:
        for resp in (await client.post("/v1/completions", json={"model": "m", "prompt": "x" * 2000}),
                     await client.get("/v1/nowhere")):
            e = resp.json()["error"]
            assert resp.status_code in (413, 404) and set(e) == {"message", "type", "code", "param"}, resp.text
        assert set((await client.post("/generate", json={"prompt": "x" * 2000})).json()["error"]) == {"code", "message"}


def test_settings_auth_modes(monkeypatch):
    from service.config import Settings

    for var in ("SVDSERVE_AUTH", "SVDSERVE_ADMIN_KEY", "REDIS_URL", "SVDSERVE_STORE"):
        monkeypatch.delenv(var, raising=False)
    assert not Settings.from_env().auth_enabled
    monkeypatch.setenv("SVDSERVE_ADMIN_KEY", "k" * 32)
    s = Settings.from_env()
    assert s.auth_enabled and s.admin_key == "k" * 32 and "k" * 32 not in repr(s)
    monkeypatch.setenv("SVDSERVE_AUTH", "OFF")
    assert not Settings.from_env().auth_enabled
    assert Settings.from_env(auth="on").auth_enabled
    monkeypatch.setenv("SVDSERVE_AUTH", "maybe")
    with pytest.raises(ValueError, match="auth"):
        Settings.from_env()


# --- units: rate limiter, store outages --------------------------------------------------------------------


def test_token_bucket():
    now = [0.0]
    rl = RateLimiter(clock=lambda: now[0])
    assert [rl.take("t", 60) for _ in range(60)] == [None] * 60  # a full minute's burst
    wait = rl.take("t", 60)
    assert wait == pytest.approx(1.0)
    now[0] += 0.5
    assert rl.take("t", 60) == pytest.approx(0.5)
    now[0] += 0.5
    assert rl.take("t", 60) is None
    assert rl.take("u", 1, burst=1) is None and rl.take("u", 1, burst=1) == pytest.approx(60.0)


class FlakyTenants(DiskTenantStore):
    down = False

    def lookup(self, key_id):
        from adapters_store import StoreUnavailable

        if self.down:
            raise StoreUnavailable("down")
        return super().lookup(key_id)


def test_a_store_outage_keeps_recently_seen_keys_working(tmp_path):
    from service.errors import ApiError

    tenants = FlakyTenants(tmp_path)
    tenants.create_tenant(Tenant(tenant="acme"))
    key, record = new_api_key("acme")
    tenants.add_key(record)
    other_key, other = new_api_key("acme")
    tenants.add_key(other)
    auth = Auth(True, None, tenants)
    assert auth.authenticate("/adapters", {"authorization": f"Bearer {key}"}).tenant == "acme"
    tenants.down = True
    assert auth.authenticate("/adapters", {"authorization": f"Bearer {key}"}).tenant == "acme"
    with pytest.raises(ApiError) as exc:  # never seen before the outage: 503, not 401
        auth.authenticate("/adapters", {"authorization": f"Bearer {other_key}"})
    assert exc.value.status_code == 503
    auth.forget_key(record.key_id)
    with pytest.raises(ApiError):
        auth.authenticate("/adapters", {"authorization": f"Bearer {key}"})
    assert isinstance(tenants, TenantStore)


# --- Redis-backed keys --------------------------------------------------------------------------------------


@pytest.fixture
def redis_prefix():
    with redis_key_prefix("svdserve-test-tenants") as space:
        yield space


@pytest.mark.redis
async def test_redis_key_store_is_hashed_and_shared_by_replicas(serve, redis_prefix, make_blob):
    client_r, prefix = redis_prefix
    a_store, b_store = RedisStore(REDIS_URL, prefix=prefix), RedisStore(REDIS_URL, prefix=prefix)
    try:
        async with serve(a_store, auth="on", admin_key=ADMIN) as a, serve(b_store, auth="on", admin_key=ADMIN) as b:
            key_a = await new_tenant(a, "acme")
            key_b = await new_tenant(b, "beta")  # created on the other replica
            raw = client_r.hgetall(f"{prefix}apikeys")
            assert len(raw) == 2
            dump = b"".join(k + v for k, v in raw.items())
            for key in (key_a, key_b):
                assert key.encode() not in dump and key.split("_", 1)[1].encode() not in dump
                assert hashlib.sha256(key.encode()).hexdigest().encode() in dump
            assert set(client_r.hkeys(f"{prefix}tenants")) == {b"acme", b"beta"}

            # a key made on replica A works on replica B, and isolation holds across replicas
            assert (await upload(b, key_a, make_blob("osora"), "acme-1")).status_code == 201
            assert (await upload(a, key_b, make_blob("lora", rank=4), "beta-1")).status_code == 201
            assert [x["adapter_id"] for x in (await a.get("/adapters", headers=bearer(key_a))).json()["adapters"]] == ["acme-1"]
            err(await b.get("/adapters/beta-1", headers=bearer(key_a)), 404, "adapter_not_found")
            err(await a.post("/v1/completions", json={"model": "beta-1", "prompt": PROMPT}, headers=bearer(key_a)), 404, "model_not_found")
            gen = await a.post("/generate", json={"adapter_id": "beta-1", "prompt": PROMPT, "max_tokens": 3}, headers=bearer(key_b))
            assert gen.status_code == 200, gen.text

            # revoking on A takes effect on B at once
            key_id = key_a.split("_", 1)[0].removeprefix("sk-svd-")
            assert (await a.delete(f"/admin/keys/{key_id}", headers=ADMIN_H)).status_code == 204
            err(await b.get("/adapters", headers=bearer(key_a)), 401, "invalid_api_key")
            listing = (await b.get("/admin/tenants", headers=ADMIN_H)).json()
            assert {t["tenant"]: t["adapters"] for t in listing["tenants"]} == {"acme": 1, "beta": 1}
    finally:
        a_store.close()
        b_store.close()


async def test_a_tenant_merges_only_its_own_adapters(serve, store, make_blob):
    async with serve(store, auth="on", admin_key=ADMIN) as client:
        acme, globex = await new_tenant(client, "acme"), await new_tenant(client, "globex")
        assert (await upload(client, acme, make_blob("osora", 2, seed=1), "mine")).status_code == 201
        assert (await upload(client, globex, make_blob("osora", 2, seed=2), "theirs")).status_code == 201
        ok = await client.post("/generate", headers=bearer(acme), json={
            "prompt": "x", "max_tokens": 2, "merged_adapters": {"ids": ["mine"], "weights": [0.5]}})
        assert ok.status_code == 200, ok.text
        # another tenant's adapter in a merge answers exactly like a nonexistent one
        for ids in (["mine", "theirs"], ["mine", "nobody"]):
            resp = await client.post("/generate", headers=bearer(acme), json={
                "prompt": "x", "max_tokens": 2, "merged_adapters": {"ids": ids}})
            assert err(resp, 404, "adapter_not_found")["message"].startswith(f"adapter {ids[1]!r} in merged_adapters not found")
