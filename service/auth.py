"""Who is calling: tenant API keys, the admin key, per-tenant limits, and adapter ownership.

Modes (Settings.auth, SVDSERVE_AUTH / --auth):
    on    every route except the public ones (/health, /metrics, /docs, /redoc, /openapi.json) needs a key:
          `Authorization: Bearer <key>` or `X-API-Key: <key>`. A tenant's key reaches only that tenant's
          adapters; the admin key (SVDSERVE_ADMIN_KEY / --admin-key) only /admin/... .
    off   single-user mode: every request acts as tenant "default" (no keys, no limits).
    auto  (default) on when an admin key is configured, off otherwise, so an embedded server works out of
          the box. The mode is logged at start-up.

Authentication happens in `AuthMiddleware`, before the request body is read (an unauthenticated upload is
refused without reading 64 MiB); routes get the result through the `current_caller` dependency.
Another tenant's adapter answers exactly like a nonexistent one (404, same message). Admin endpoints:

    POST   /admin/tenants                {tenant, max_adapters?, requests_per_minute?, burst?, max_tokens?, weight?}
    GET    /admin/tenants                tenants with limits, key ids, adapter counts
    PATCH  /admin/tenants/{tenant}       change limits (null clears one)
    POST   /admin/tenants/{tenant}/keys  a new key, shown once: {"key": "sk-svd-…", "key_id", …}
    DELETE /admin/keys/{key_id}          revoke a key
"""
from __future__ import annotations

import hmac
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from adapters_store import AdapterStore, StoreUnavailable, validate_id
from adapters_store.records import AdapterRecord, check_id
from service.errors import STORE_RETRY_AFTER_S, ApiError, error_response_for, not_ready
from service.tenants import (
    DEFAULT_TENANT,
    ApiKeyRecord,
    RateLimiter,
    Tenant,
    TenantExists,
    TenantLimits,
    TenantNotFound,
    TenantStore,
    hash_key,
    key_id_of,
    new_api_key,
    open_tenant_store,
)
from svd_adapters.log import get_logger

log = get_logger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
ADMIN_PREFIX = "/admin"
CALLER_SCOPE_KEY = "svdserve.caller"
# While the key store is unreachable, a key that authenticated within this window is still accepted
# (cached adapters and the base keep serving through a Redis outage); a revocation during an outage waits for it.
LAST_GOOD_TTL_S = 300.0
OWNER_CACHE_SIZE = 10_000
BEARER = {"WWW-Authenticate": "Bearer"}
OFF_MESSAGE = "auth: OFF — single-user mode, every request acts as tenant 'default'"


@dataclass(frozen=True)
class Caller:
    """The authenticated caller: a tenant (with its limits) or the admin."""

    tenant: str | None
    admin: bool = False
    limits: TenantLimits = field(default_factory=TenantLimits)
    key_id: str | None = None


ANONYMOUS_DEFAULT = Caller(tenant=DEFAULT_TENANT)
ADMIN = Caller(tenant=None, admin=True)


class AdapterStoreUnreachable(StoreUnavailable):
    """The store is down and this replica has not seen the adapter's owner: 503 adapter_unavailable (a store
    error, so it is counted like one)."""

    code = "adapter_unavailable"


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, dict(BEARER))


def _presented_key(headers: dict[str, str]) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`; None when neither is there."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _unauthorized("invalid_api_key", "use 'Authorization: Bearer <API key>' (or the X-API-Key header)")
        return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def _same(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets (via their hashes, so lengths leak nothing either)."""
    return hmac.compare_digest(hash_key(a), hash_key(b))


class Auth:
    """Authentication, rate limiting and ownership checks for one app (its state.auth)."""

    def __init__(self, enabled: bool, admin_key: str | None, tenants: TenantStore) -> None:
        self.enabled = enabled
        self._admin_key = admin_key or None
        self.tenants = tenants
        self.limiter = RateLimiter()
        self._last_good: dict[str, tuple[Caller, float]] = {}  # sha256(key) → (caller, when); store outages only
        self._owners: OrderedDict[str, str] = OrderedDict()  # adapter id → tenant, last seen in the store
        self._lock = threading.Lock()
        self._upload_locks: dict[str, threading.Lock] = {}

    @property
    def admin_enabled(self) -> bool:
        return self._admin_key is not None

    def log_mode(self) -> None:
        if self.enabled:
            admin = "admin API enabled" if self.admin_enabled else "no admin key configured: /admin is disabled"
            log.info("auth: ON — requests need a tenant API key (Authorization: Bearer …); %s; keys in %r", admin, self.tenants)
        else:
            log.warning(OFF_MESSAGE)
        if self._admin_key is not None and len(self._admin_key) < 16:
            log.warning("the admin key is shorter than 16 characters; use a long random one (e.g. `openssl rand -hex 32`)")

    def close(self) -> None:
        close = getattr(self.tenants, "close", None)
        if close is not None:
            close()

    # --- authentication (blocking: store lookups) ------------------------------------------------------------

    def authenticate(self, path: str, headers: dict[str, str]) -> Caller:
        """The caller of a request to `path` (not a public one); ApiError 401/403/503 otherwise."""
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            return self._authenticate_admin(headers)
        if not self.enabled:
            return ANONYMOUS_DEFAULT
        key = _presented_key(headers)
        if key is None:
            raise _unauthorized("missing_api_key", "this server needs an API key: send 'Authorization: Bearer <API key>'")
        if self._admin_key is not None and _same(key, self._admin_key):
            raise ApiError(
                403, "forbidden", "the admin key manages tenants and keys (/admin/...) only; use a tenant's API key here"
            )
        return self._tenant_of(key)

    def _authenticate_admin(self, headers: dict[str, str]) -> Caller:
        if self._admin_key is None:
            raise ApiError(
                403, "admin_disabled", "the admin API is disabled: start the server with SVDSERVE_ADMIN_KEY (or --admin-key)"
            )
        key = _presented_key(headers)
        if key is None:
            raise _unauthorized("missing_api_key", "the admin API needs the admin key: send 'Authorization: Bearer <admin key>'")
        if _same(key, self._admin_key):
            return ADMIN
        try:
            self._tenant_of(key)
        except ApiError:
            raise _unauthorized("invalid_api_key", "invalid API key") from None
        raise ApiError(403, "forbidden", "tenant API keys cannot use the admin API; use the admin key")

    def _tenant_of(self, key: str) -> Caller:
        invalid = _unauthorized("invalid_api_key", "invalid API key (unknown, revoked, or mistyped)")
        key_id = key_id_of(key)
        if key_id is None:
            raise invalid
        digest = hash_key(key)
        try:
            record, tenant = self.tenants.lookup(key_id)
        except StoreUnavailable as exc:
            with self._lock:
                cached = self._last_good.get(digest)
            if cached is not None and time.monotonic() - cached[1] < LAST_GOOD_TTL_S:
                return cached[0]
            raise ApiError(
                503, "store_unavailable", f"cannot check the API key: {exc}", {"Retry-After": str(STORE_RETRY_AFTER_S)}
            ) from exc
        if record is None or not hmac.compare_digest(digest, record.sha256) or tenant is None:
            raise invalid
        caller = Caller(tenant=tenant.tenant, limits=tenant.limits, key_id=key_id)
        with self._lock:
            self._last_good[digest] = (caller, time.monotonic())
        return caller

    def forget_key(self, key_id: str) -> None:
        """Drop a revoked key from the outage cache."""
        with self._lock:
            self._last_good = {d: (c, t) for d, (c, t) in self._last_good.items() if c.key_id != key_id}

    def check_rate(self, caller: Caller, cost: int = 1, why: str = "") -> None:
        """Take `cost` requests from the tenant's bucket, or 429 with Retry-After (`why` is said first)."""
        rpm = caller.limits.requests_per_minute
        if caller.tenant is None or rpm is None:
            return
        wait = self.limiter.take(caller.tenant, rpm, caller.limits.burst, cost=cost)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise ApiError(
                429, "rate_limited",
                f"{why}tenant {caller.tenant!r} is over its limit of {rpm:g} requests per minute; retry in {seconds} s",
                {"Retry-After": str(seconds)},
            )

    def charge_choices(self, caller: Caller, n: int) -> None:
        """n choices of one request count as n requests against the tenant's rate limit (the request itself was
        charged one by the middleware): a 429 when the bucket lacks the rest, a 400 when it never could hold them."""
        rpm = caller.limits.requests_per_minute
        if n <= 1 or caller.tenant is None or rpm is None:
            return
        capacity = self.limiter.capacity(rpm, caller.limits.burst)
        if n > capacity:
            raise ApiError(
                400, "too_many_choices",
                f"n: {n} choices count as {n} requests against tenant {caller.tenant!r}'s limit, which allows at most "
                f"{capacity:g} at once; ask for at most {capacity:g} choices", param="n",
            )
        self.check_rate(caller, cost=n - 1, why=f"n: {n} choices count as {n} requests (ask for fewer choices); ")

    # --- adapter ownership -----------------------------------------------------------------------------------

    def remember_owner(self, adapter_id: str, tenant: str | None) -> None:
        with self._lock:
            if tenant is None:
                self._owners.pop(adapter_id, None)
                return
            self._owners[adapter_id] = tenant
            self._owners.move_to_end(adapter_id)
            while len(self._owners) > OWNER_CACHE_SIZE:
                self._owners.popitem(last=False)

    def known_owner(self, adapter_id: str) -> str | None:
        with self._lock:
            return self._owners.get(adapter_id)

    def owned_record(self, store: AdapterStore, caller: Caller, adapter_id: str) -> AdapterRecord | None:
        """The record if `caller` owns `adapter_id`, else None (nonexistent and foreign look the same)."""
        try:
            validate_id(adapter_id)
        except ValueError:
            return None
        record = store.get_record(adapter_id)
        self.remember_owner(adapter_id, record.tenant if record is not None else None)
        return record if record is not None and record.tenant == caller.tenant else None

    def can_use(self, store: AdapterStore, caller: Caller, adapter_id: str) -> bool:
        """Whether `caller` may generate with `adapter_id` (see `usable_version`)."""
        return self.usable_version(store, caller, adapter_id)[0]

    def usable_version(self, store: AdapterStore, caller: Caller, adapter_id: str) -> tuple[bool, str | None]:
        """(may `caller` generate with `adapter_id`, the stored version's sha256 to serve). The version keys the
        engine's device cache, so a deleted and re-uploaded id never serves old weights on any replica. With the
        store unreachable, the owner last seen decides and the version is unknown (the cached copy serves);
        never seen → 503 adapter_unavailable."""
        try:
            record = self.owned_record(store, caller, adapter_id)
            return (record is not None, record.sha256 if record is not None else None)
        except StoreUnavailable as exc:
            owner = self.known_owner(adapter_id)
            if owner is None:
                raise AdapterStoreUnreachable(
                    f"adapter {adapter_id!r} cannot be loaded: the adapter store is unreachable ({exc}); retry shortly"
                ) from exc
            return owner == caller.tenant, None

    def usable_records(self, store: AdapterStore, caller: Caller, adapter_ids: list[str], what: str) -> list[AdapterRecord]:
        """The records of adapters `caller` may generate with, one per id (a merge's sources: their versions and
        methods are needed up front, so the store must be reachable); 404 naming the first that is missing or
        foreign, 503 adapter_unavailable when the store is down."""
        records = []
        for adapter_id in adapter_ids:
            try:
                record = self.owned_record(store, caller, adapter_id)
            except StoreUnavailable as exc:
                raise AdapterStoreUnreachable(
                    f"{what} cannot be resolved: the adapter store is unreachable ({exc}); retry shortly") from exc
            if record is None:
                raise ApiError(404, "adapter_not_found", f"adapter {adapter_id!r} in {what} not found; upload it with "
                               "POST /adapters or list them with GET /adapters")
            records.append(record)
        return records

    def put_for(self, store: AdapterStore, caller: Caller, record: AdapterRecord, blob: bytes) -> None:
        """Store an upload for its tenant, within the tenant's adapter quota (checked and written under one
        per-tenant lock in this process; replicas uploading for one tenant at once may overshoot by one each)."""
        tenant = record.tenant
        with self._lock:
            lock = self._upload_locks.setdefault(tenant, threading.Lock())
        with lock:
            limit = caller.limits.max_adapters
            if limit is not None:
                count = len(store.list(tenant=tenant))
                if count >= limit:
                    raise ApiError(
                        403, "adapter_quota_exceeded",
                        f"tenant {tenant!r} already stores {count} adapter(s), its limit is {limit}; "
                        "delete one (DELETE /adapters/{id}) before uploading another",
                    )
            store.put(record, blob)
        self.remember_owner(record.adapter_id, tenant)


def build_auth(settings: Any, store: AdapterStore) -> Auth:
    """The app's Auth from its settings (auth mode, admin key) and the adapter store (which holds the keys)."""
    auth = Auth(settings.auth_enabled, settings.admin_key, open_tenant_store(store))
    auth.log_mode()
    return auth


def max_tokens_for(caller: Caller, requested: int, explicit: bool, param: str = "max_tokens") -> int:
    """`requested` within the tenant's max_tokens limit: an explicit value over it is a 400; a default is capped."""
    limit = caller.limits.max_tokens
    if limit is None or requested <= limit:
        return requested
    if not explicit:
        return limit
    raise ApiError(
        400, "max_tokens_too_large",
        f"{param}: {requested} exceeds this tenant's limit of {limit} tokens per request; ask for at most {limit}",
        param=param,
    )


# --- middleware and dependencies -----------------------------------------------------------------------------


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.rstrip("/") in PUBLIC_PATHS


class AuthMiddleware:
    """Authenticates every non-public request from its headers (before its body is read) and applies the
    tenant's rate limit; the Caller goes into scope[CALLER_SCOPE_KEY] for `current_caller`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        auth: Auth | None = getattr(scope["app"].state, "auth", None) if "app" in scope else None
        try:
            if auth is None:
                raise not_ready()
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if auth.enabled or path.startswith(ADMIN_PREFIX):
                caller = await run_in_threadpool(auth.authenticate, path, headers)
            else:
                caller = ANONYMOUS_DEFAULT  # auth off: no store round trip
            auth.check_rate(caller)
        except ApiError as exc:
            response = error_response_for(path, exc.status_code, exc.code, exc.message, exc.headers, exc.param)
            await response(scope, receive, send)
            return
        scope[CALLER_SCOPE_KEY] = caller
        await self.app(scope, receive, send)


_bearer = HTTPBearer(auto_error=False, description="a tenant's API key (sk-svd-…); the admin key for /admin")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="alternative to Authorization: Bearer")


async def current_caller(
    request: Request,
    _bearer_key: Annotated[Any, Security(_bearer)] = None,
    _header_key: Annotated[Any, Security(_api_key_header)] = None,
) -> Caller:
    """The caller AuthMiddleware authenticated (the Security parameters only document the schemes in /docs)."""
    caller = request.scope.get(CALLER_SCOPE_KEY)
    if caller is None:  # routed around the middleware (should not happen): authenticate here
        auth: Auth | None = request.app.state.auth
        if auth is None:
            raise not_ready()
        headers = {k.lower(): v for k, v in request.headers.items()}
        caller = await run_in_threadpool(auth.authenticate, request.url.path, headers)
        auth.check_rate(caller)
        request.scope[CALLER_SCOPE_KEY] = caller
    return caller


async def tenant_caller(caller: Annotated[Caller, Depends(current_caller)]) -> Caller:
    if caller.tenant is None:
        raise ApiError(403, "forbidden", "the admin key manages tenants and keys (/admin/...) only; use a tenant's API key here")
    return caller


async def admin_caller(caller: Annotated[Caller, Depends(current_caller)]) -> Caller:
    if not caller.admin:
        raise ApiError(403, "forbidden", "tenant API keys cannot use the admin API; use the admin key")
    return caller


TenantCaller = Annotated[Caller, Depends(tenant_caller)]


def app_auth(request: Request) -> Auth:
    auth = request.app.state.auth
    if auth is None:
        raise not_ready()
    return auth


# --- admin API -----------------------------------------------------------------------------------------------


class TenantCreate(TenantLimits):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"tenant": "acme", "max_adapters": 100, "requests_per_minute": 600, "max_tokens": 512}]},
    )

    tenant: str = Field(description="1-128 characters from A-Z a-z 0-9 . _ -")


class KeyInfo(BaseModel):
    key_id: str
    tenant: str
    created_at: float

    @classmethod
    def of(cls, record: ApiKeyRecord) -> "KeyInfo":
        return cls(key_id=record.key_id, tenant=record.tenant, created_at=record.created_at)


class KeyCreated(KeyInfo):
    key: str = Field(description="the API key; shown only now (only its sha256 is stored)")


class TenantInfo(TenantLimits):
    tenant: str
    created_at: float
    adapters: int | None = Field(default=None, description="adapters stored (null when the store is unreachable)")
    keys: list[KeyInfo] = Field(default_factory=list)


class TenantList(BaseModel):
    tenants: list[TenantInfo]
    count: int


def _tenant_info(t: Tenant, keys: list[ApiKeyRecord], adapters: int | None) -> TenantInfo:
    return TenantInfo(
        **t.limits.model_dump(), tenant=t.tenant, created_at=t.created_at, adapters=adapters,
        keys=[KeyInfo.of(k) for k in keys if k.tenant == t.tenant],
    )


admin_router = APIRouter(prefix=ADMIN_PREFIX, tags=["admin"], dependencies=[Depends(admin_caller)])


@admin_router.post("/tenants", status_code=201, response_model=TenantInfo, summary="Create a tenant with its limits")
async def create_tenant(request: Request, body: TenantCreate) -> TenantInfo:
    auth = app_auth(request)
    try:
        check_id(body.tenant, "tenant")
    except ValueError as exc:
        raise ApiError(400, "invalid_tenant", str(exc)) from None
    tenant = Tenant(**body.model_dump())
    try:
        await run_in_threadpool(auth.tenants.create_tenant, tenant)
    except TenantExists:
        raise ApiError(409, "tenant_exists", f"tenant {body.tenant!r} already exists; PATCH /admin/tenants/{body.tenant} changes its limits") from None
    log.info("created tenant %s (%s)", tenant.tenant, tenant.limits.model_dump(exclude_none=True) or "no limits")
    return _tenant_info(tenant, [], 0)


@admin_router.get("/tenants", response_model=TenantList, summary="Tenants, their limits, key ids and adapter counts")
async def list_tenants(request: Request) -> TenantList:
    auth = app_auth(request)
    tenants = await run_in_threadpool(auth.tenants.list_tenants)
    keys = await run_in_threadpool(auth.tenants.list_keys)
    store: AdapterStore | None = request.app.state.store
    counts: dict[str, int] | None = None
    if store is not None:
        try:
            counts = {}
            for r in await run_in_threadpool(store.list):
                counts[r.tenant] = counts.get(r.tenant, 0) + 1
        except StoreUnavailable:
            counts = None
    infos = [_tenant_info(t, keys, None if counts is None else counts.get(t.tenant, 0)) for t in tenants]
    return TenantList(tenants=infos, count=len(infos))


@admin_router.patch("/tenants/{tenant}", response_model=TenantInfo, summary="Change a tenant's limits (null clears one)")
async def update_tenant(request: Request, tenant: str, body: TenantLimits) -> TenantInfo:
    auth = app_auth(request)
    try:
        updated = await run_in_threadpool(auth.tenants.update_tenant, tenant, body.model_dump(exclude_unset=True))
    except TenantNotFound:
        raise ApiError(404, "tenant_not_found", f"no tenant {tenant!r}") from None
    keys = await run_in_threadpool(auth.tenants.list_keys, tenant)
    return _tenant_info(updated, keys, None)


@admin_router.post("/tenants/{tenant}/keys", status_code=201, response_model=KeyCreated, summary="Create an API key (shown once)")
async def create_key(request: Request, tenant: str) -> KeyCreated:
    auth = app_auth(request)
    key, record = new_api_key(tenant)
    try:
        await run_in_threadpool(auth.tenants.add_key, record)
    except TenantNotFound:
        raise ApiError(404, "tenant_not_found", f"no tenant {tenant!r}; create it with POST /admin/tenants") from None
    log.info("created API key %s for tenant %s", record.key_id, tenant)
    return KeyCreated(key=key, **KeyInfo.of(record).model_dump())


@admin_router.delete("/keys/{key_id}", status_code=204, summary="Revoke an API key")
async def delete_key(request: Request, key_id: str) -> Response:
    auth = app_auth(request)
    if not await run_in_threadpool(auth.tenants.delete_key, key_id):
        raise ApiError(404, "key_not_found", f"no API key {key_id!r}")
    auth.forget_key(key_id)
    log.info("revoked API key %s", key_id)
    return Response(status_code=204)


__all__ = [
    "ADMIN", "Auth", "AuthMiddleware", "Caller", "TenantCaller", "admin_router", "build_auth", "current_caller",
    "is_public", "max_tokens_for",
]
