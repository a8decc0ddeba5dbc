"""Tenants, their API keys and limits, kept in the same backend as the adapter store (so replicas share them).

A tenant owns adapters (AdapterRecord.tenant) and has optional limits: adapters stored, requests per
minute (a token bucket, per replica), and the largest max_tokens of one request. An API key looks like

    sk-svd-<key_id>_<secret>        key_id: 16 hex digits (not secret; names the key), secret: 256 random bits

Only sha256(key) is stored, under its key_id; a presented key is looked up by its key_id and its hash
compared in constant time. The plaintext is shown once, when the key is created.

Backends:
    disk   <store root>/tenants.json: {"tenants": {name: Tenant}, "keys": {key_id: ApiKeyRecord}}, rewritten
           atomically (temp file + fsync + rename + directory fsync) under an flock on <root>/.tenants.lock
    Redis  {prefix}tenants (hash: name → Tenant JSON) and {prefix}apikeys (hash: key_id → ApiKeyRecord JSON)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adapters_store.base import AdapterStore, StoreError, StoreUnavailable
from adapters_store.filelock import DirLock
from adapters_store.records import check_id
from svd_adapters.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")
DEFAULT_TENANT = "default"
KEY_PREFIX = "sk-svd-"
_KEY_RE = re.compile(r"^sk-svd-([0-9a-f]{16})_([A-Za-z0-9_-]{20,128})$")
TENANTS_FILE = "tenants.json"
TENANTS_LOCK = ".tenants.lock"


# --- records -----------------------------------------------------------------------------------------------


class TenantLimits(BaseModel):
    """Per-tenant limits; None means unlimited."""

    model_config = ConfigDict(extra="forbid")

    max_adapters: int | None = Field(default=None, ge=0, description="adapters this tenant may have stored")
    requests_per_minute: float | None = Field(
        default=None, gt=0, description="sustained request rate (token bucket; per replica)"
    )
    burst: int | None = Field(default=None, ge=1, description="bucket size: requests allowed at once (default: requests_per_minute)")
    max_tokens: int | None = Field(default=None, ge=1, description="largest max_tokens of one generation request")
    weight: float | None = Field(
        default=None, gt=0, le=1000,
        description="this tenant's share of the batch's rows under fair admission, relative to others' (default 1: "
        "a tenant of weight 2 is admitted twice as many rows as one of weight 1 while both wait)",
    )


class Tenant(TenantLimits):
    model_config = ConfigDict(extra="ignore", frozen=True)  # ignore: records of newer versions stay readable

    tenant: str
    created_at: float = Field(default_factory=time.time)

    @field_validator("tenant")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return check_id(v, "tenant")

    @property
    def limits(self) -> TenantLimits:
        return TenantLimits.model_validate(self.model_dump(include=set(TenantLimits.model_fields)))


class ApiKeyRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    tenant: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the whole key; the key itself is never stored")
    created_at: float = Field(default_factory=time.time)


class TenantExists(StoreError):
    def __init__(self, tenant: str) -> None:
        super().__init__(f"tenant {tenant!r} already exists")
        self.tenant = tenant


class TenantNotFound(StoreError):
    def __init__(self, tenant: str) -> None:
        super().__init__(f"no tenant {tenant!r}")
        self.tenant = tenant


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_api_key(tenant: str) -> tuple[str, ApiKeyRecord]:
    """(the plaintext key, its record). Show the key once; store only the record."""
    key_id = secrets.token_hex(8)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return key, ApiKeyRecord(key_id=key_id, tenant=tenant, sha256=hash_key(key))


def key_id_of(key: str) -> str | None:
    """The key_id part of a well-formed key, else None."""
    m = _KEY_RE.fullmatch(key)
    return m.group(1) if m else None


# --- stores ------------------------------------------------------------------------------------------------


class TenantStore(ABC):
    """Tenants and hashed API keys. Unknown names/ids read as None; writes raise StoreError subclasses."""

    @abstractmethod
    def create_tenant(self, tenant: Tenant) -> None:
        """TenantExists if the name is taken."""

    @abstractmethod
    def update_tenant(self, name: str, changes: dict[str, Any]) -> Tenant:
        """Set limit fields; TenantNotFound if there is no such tenant."""

    @abstractmethod
    def get_tenant(self, name: str) -> Tenant | None: ...

    @abstractmethod
    def list_tenants(self) -> list[Tenant]: ...

    @abstractmethod
    def add_key(self, record: ApiKeyRecord) -> None:
        """TenantNotFound if the key's tenant does not exist."""

    @abstractmethod
    def get_key(self, key_id: str) -> ApiKeyRecord | None: ...

    @abstractmethod
    def list_keys(self, tenant: str | None = None) -> list[ApiKeyRecord]: ...

    @abstractmethod
    def delete_key(self, key_id: str) -> bool: ...

    def lookup(self, key_id: str) -> tuple[ApiKeyRecord | None, Tenant | None]:
        """The key record and its tenant (what authentication needs), in as few round trips as the backend allows."""
        record = self.get_key(key_id)
        return record, (self.get_tenant(record.tenant) if record is not None else None)


def _parse_tenant(raw: Any) -> Tenant | None:
    try:
        return Tenant.model_validate(raw) if not isinstance(raw, (bytes, str)) else Tenant.model_validate_json(raw)
    except ValidationError:
        log.warning("ignoring an unreadable tenant record")
        return None


def _parse_key(raw: Any) -> ApiKeyRecord | None:
    try:
        return ApiKeyRecord.model_validate(raw) if not isinstance(raw, (bytes, str)) else ApiKeyRecord.model_validate_json(raw)
    except ValidationError:
        log.warning("ignoring an unreadable API key record")
        return None


class DiskTenantStore(TenantStore):
    """One JSON file, rewritten atomically; readers re-parse it only when it changed (stat signature)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.path = self.root / TENANTS_FILE
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = DirLock(self.root / TENANTS_LOCK)
        except OSError as exc:
            raise StoreError(f"cannot open tenant store in {self.root}: {exc}") from exc
        self._cache: tuple[tuple[int, int, int], dict[str, dict[str, Any]]] | None = None

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {"tenants": {}, "keys": {}}
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from exc
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._cache
        if cached is not None and cached[0] == sig:
            return cached[1]
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {"tenants": {}, "keys": {}}
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from exc
        data = {"tenants": dict(data.get("tenants") or {}), "keys": dict(data.get("keys") or {})}
        self._cache = (sig, data)
        return data

    def _write(self, data: dict[str, dict[str, Any]]) -> None:
        tmp = self.root / f".tmp-tenants-{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(json.dumps(data, indent=1, sort_keys=True).encode())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            dfd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise StoreError(f"could not write {self.path}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        self._cache = None

    @contextmanager
    def _modify(self) -> Iterator[dict[str, dict[str, Any]]]:
        with self._lock.held():
            self._cache = None  # re-read under the lock: another process may have written
            current = self._read()
            data = {"tenants": dict(current["tenants"]), "keys": dict(current["keys"])}
            yield data
            if data != current:
                self._write(data)

    def create_tenant(self, tenant: Tenant) -> None:
        with self._modify() as data:
            if tenant.tenant in data["tenants"]:
                raise TenantExists(tenant.tenant)
            data["tenants"][tenant.tenant] = tenant.model_dump(mode="json")

    def update_tenant(self, name: str, changes: dict[str, Any]) -> Tenant:
        with self._modify() as data:
            old = _parse_tenant(data["tenants"].get(name)) if name in data["tenants"] else None
            if old is None:
                raise TenantNotFound(name)
            new = Tenant.model_validate({**old.model_dump(), **changes})
            data["tenants"][name] = new.model_dump(mode="json")
        return new

    def get_tenant(self, name: str) -> Tenant | None:
        raw = self._read()["tenants"].get(name)
        return _parse_tenant(raw) if raw is not None else None

    def list_tenants(self) -> list[Tenant]:
        out = [t for raw in self._read()["tenants"].values() if (t := _parse_tenant(raw)) is not None]
        return sorted(out, key=lambda t: (t.created_at, t.tenant))

    def add_key(self, record: ApiKeyRecord) -> None:
        with self._modify() as data:
            if record.tenant not in data["tenants"]:
                raise TenantNotFound(record.tenant)
            if record.key_id in data["keys"]:
                raise StoreError(f"key id {record.key_id} already exists")
            data["keys"][record.key_id] = record.model_dump(mode="json")

    def get_key(self, key_id: str) -> ApiKeyRecord | None:
        raw = self._read()["keys"].get(key_id)
        return _parse_key(raw) if raw is not None else None

    def list_keys(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        out = [k for raw in self._read()["keys"].values() if (k := _parse_key(raw)) is not None]
        return sorted((k for k in out if tenant is None or k.tenant == tenant), key=lambda k: (k.created_at, k.key_id))

    def delete_key(self, key_id: str) -> bool:
        with self._modify() as data:
            return data["keys"].pop(key_id, None) is not None

    def close(self) -> None:
        self._lock.close()

    def __repr__(self) -> str:
        return f"DiskTenantStore({str(self.path)!r})"


class RedisTenantStore(TenantStore):
    """Two Redis hashes under the adapter store's prefix; every write is one atomic command or script."""

    # add_key must not orphan a key whose tenant does not exist: check and write in one script.
    _ADD_KEY = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -1 end
return redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3])
"""

    def __init__(self, client: Any, prefix: str, url: str = "redis") -> None:
        import redis  # the Redis backend only

        self._redis = redis
        self._client = client
        self.prefix = prefix
        self.url = url
        self.tenants_key = f"{prefix}tenants"
        self.keys_key = f"{prefix}apikeys"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        r = self._redis
        try:
            return fn()
        except (r.exceptions.ConnectionError, r.exceptions.TimeoutError) as exc:
            raise StoreUnavailable(f"Redis tenant store at {self.url} is unavailable ({what}: {exc})") from exc
        except r.exceptions.WatchError:
            raise
        except r.exceptions.RedisError as exc:
            raise StoreError(f"Redis tenant store at {self.url} failed ({what}): {exc}") from exc

    def create_tenant(self, tenant: Tenant) -> None:
        created = self._call("create_tenant", lambda: self._client.hsetnx(self.tenants_key, tenant.tenant, tenant.model_dump_json()))
        if not created:
            raise TenantExists(tenant.tenant)

    def update_tenant(self, name: str, changes: dict[str, Any]) -> Tenant:
        r = self._redis

        def update() -> Tenant:
            with self._client.pipeline(transaction=True) as pipe:
                for _ in range(5):
                    try:
                        pipe.watch(self.tenants_key)
                        raw = pipe.hget(self.tenants_key, name)
                        old = _parse_tenant(raw) if raw is not None else None
                        if old is None:
                            raise TenantNotFound(name)
                        new = Tenant.model_validate({**old.model_dump(), **changes})
                        pipe.multi()
                        pipe.hset(self.tenants_key, name, new.model_dump_json())
                        pipe.execute()
                        return new
                    except r.exceptions.WatchError:
                        continue
            raise StoreError(f"tenant {name!r} kept changing concurrently; try again")

        return self._call("update_tenant", update)

    def get_tenant(self, name: str) -> Tenant | None:
        raw = self._call("get_tenant", lambda: self._client.hget(self.tenants_key, name))
        return _parse_tenant(raw) if raw is not None else None

    def list_tenants(self) -> list[Tenant]:
        raw = self._call("list_tenants", lambda: self._client.hvals(self.tenants_key))
        out = [t for v in raw if (t := _parse_tenant(v)) is not None]
        return sorted(out, key=lambda t: (t.created_at, t.tenant))

    def add_key(self, record: ApiKeyRecord) -> None:
        result = self._call(
            "add_key",
            lambda: self._client.eval(
                self._ADD_KEY, 2, self.tenants_key, self.keys_key, record.tenant, record.key_id, record.model_dump_json()
            ),
        )
        if result == -1:
            raise TenantNotFound(record.tenant)
        if result == 0:
            raise StoreError(f"key id {record.key_id} already exists")

    def get_key(self, key_id: str) -> ApiKeyRecord | None:
        raw = self._call("get_key", lambda: self._client.hget(self.keys_key, key_id))
        return _parse_key(raw) if raw is not None else None

    def list_keys(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        raw = self._call("list_keys", lambda: self._client.hvals(self.keys_key))
        out = [k for v in raw if (k := _parse_key(v)) is not None and (tenant is None or k.tenant == tenant)]
        return sorted(out, key=lambda k: (k.created_at, k.key_id))

    def delete_key(self, key_id: str) -> bool:
        return bool(self._call("delete_key", lambda: self._client.hdel(self.keys_key, key_id)))

    def __repr__(self) -> str:
        return f"RedisTenantStore({self.url!r}, prefix={self.prefix!r})"


def open_tenant_store(store: AdapterStore) -> TenantStore:
    """The tenant store beside an adapter store: same directory, or same Redis connection and key prefix."""
    if type(store).__name__ == "RedisStore":
        # The adapter store's own client: same server, credentials, timeouts and retry policy.
        return RedisTenantStore(store._client, store.prefix, url=store.url)  # noqa: SLF001
    root = getattr(store, "root", None)
    if root is None:
        raise StoreError(f"cannot keep tenants beside {store!r}: it is neither a DiskStore nor a RedisStore")
    return DiskTenantStore(root)


# --- rate limiting -----------------------------------------------------------------------------------------


class RateLimiter:
    """Token buckets, one per tenant, in this process. take() → None (allowed) or seconds until a token is due."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant → (tokens, last refill time)
        self._lock = threading.Lock()

    @staticmethod
    def capacity(per_minute: float, burst: int | None = None) -> float:
        return float(burst if burst is not None else max(1, math.floor(per_minute)))

    def take(self, tenant: str, per_minute: float, burst: int | None = None, cost: float = 1.0) -> float | None:
        rate = per_minute / 60.0
        capacity = self.capacity(per_minute, burst)
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(tenant, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * rate)
            if tokens >= cost:
                self._buckets[tenant] = (tokens - cost, now)
                return None
            self._buckets[tenant] = (tokens, now)
            return (cost - tokens) / rate
