"""RedisStore: the shared store for several replicas.

Keys: {prefix}adapter:{id}:blob (raw bytes), {prefix}adapter:{id}:meta (AdapterRecord JSON) and the index
set {prefix}adapters. Blob, record and index change together in one MULTI/EXEC, so readers never see half
an adapter. put(overwrite=False) WATCHes the meta key: a concurrent writer of the same id aborts our EXEC,
and the retry then sees the id taken. Durability is Redis's own (AOF with appendfsync always/everysec);
with persistence off, a Redis restart loses adapters, and the store warns once.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

import redis
from pydantic import ValidationError
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from adapters_store.base import AdapterExists, AdapterStore, StoreError, StoreUnavailable, validate_id
from adapters_store.records import AdapterRecord, sha256_hex
from svd_adapters.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")
CONNECT_TIMEOUT_S = 1.5
SOCKET_TIMEOUT_S = 2.0
MAX_WATCH_RETRIES = 5


def _safe_url(url: str) -> str:
    """The URL without credentials, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisStore(AdapterStore):
    def __init__(
        self,
        url: str,
        prefix: str = "svdserve:",
        socket_connect_timeout: float = CONNECT_TIMEOUT_S,
        socket_timeout: float = SOCKET_TIMEOUT_S,
    ) -> None:
        self.url = _safe_url(url)
        self.prefix = prefix
        # One quick retry absorbs a dropped idle connection; a dead server fails within a few seconds.
        self._client = redis.Redis.from_url(
            url,
            socket_connect_timeout=socket_connect_timeout,
            socket_timeout=socket_timeout,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
            decode_responses=False,
        )
        self._persistence_checked = False
        self._lock = threading.Lock()

    # --- keys and error mapping ------------------------------------------------------------------------

    def _blob_key(self, adapter_id: str) -> str:
        return f"{self.prefix}adapter:{adapter_id}:blob"

    def _meta_key(self, adapter_id: str) -> str:
        return f"{self.prefix}adapter:{adapter_id}:meta"

    @property
    def _index_key(self) -> str:
        return f"{self.prefix}adapters"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StoreUnavailable(
                f"Redis adapter store at {self.url} is unavailable ({what}: {exc}); check that redis-server is "
                "running and REDIS_URL points at it"
            ) from exc
        except WatchError:
            raise
        except RedisError as exc:
            raise StoreError(f"Redis adapter store at {self.url} failed ({what}): {exc}") from exc

    def _parse(self, raw: bytes | None, adapter_id: str) -> AdapterRecord | None:
        if raw is None:
            return None
        try:
            return AdapterRecord.model_validate_json(raw)
        except ValidationError:
            log.warning("ignoring unreadable record for adapter %r in Redis", adapter_id)
            return None

    def _warn_if_not_durable(self) -> None:
        if self._persistence_checked:
            return
        self._persistence_checked = True
        try:
            info = self._client.info("persistence")
        except RedisError:
            return
        if not info.get("aof_enabled"):
            log.warning(
                "Redis at %s runs without AOF persistence: stored adapters are lost if Redis restarts "
                "(enable appendonly yes for durable uploads)",
                self.url,
            )

    # --- interface -------------------------------------------------------------------------------------

    def put(self, record: AdapterRecord, blob: bytes, overwrite: bool = False) -> None:
        self._check_put(record, blob)
        adapter_id = record.adapter_id
        meta = record.model_dump_json().encode()

        def write() -> None:
            with self._client.pipeline(transaction=True) as pipe:
                for _ in range(MAX_WATCH_RETRIES):
                    try:
                        if not overwrite:
                            pipe.watch(self._meta_key(adapter_id))
                            if pipe.exists(self._meta_key(adapter_id)):
                                raise AdapterExists(adapter_id)
                        pipe.multi()
                        pipe.set(self._blob_key(adapter_id), blob)
                        pipe.set(self._meta_key(adapter_id), meta)
                        pipe.sadd(self._index_key, adapter_id)
                        pipe.execute()
                        return
                    except WatchError:
                        continue  # someone changed the key between WATCH and EXEC: look again
                    finally:
                        pipe.reset()
            raise StoreError(f"adapter {adapter_id!r} kept changing concurrently; try the upload again")

        self._call("put", write)
        with self._lock:
            self._warn_if_not_durable()

    def get_blob(self, adapter_id: str, expect_sha256: str | None = None) -> bytes | None:
        validate_id(adapter_id)
        # One MGET: record and blob from the same snapshot, so the hash check never races an overwrite.
        raw_meta, blob = self._call(
            "get_blob", lambda: self._client.mget([self._meta_key(adapter_id), self._blob_key(adapter_id)])
        )
        record = self._parse(raw_meta, adapter_id)
        if record is None or blob is None:
            return None
        self._check_version(record, expect_sha256)
        if sha256_hex(blob) != record.sha256:
            log.warning("adapter %r: blob in Redis does not match its sha256; not served", adapter_id)
            return None
        return blob

    def get_record(self, adapter_id: str) -> AdapterRecord | None:
        validate_id(adapter_id)
        return self._parse(self._call("get_record", lambda: self._client.get(self._meta_key(adapter_id))), adapter_id)

    def list(self, tenant: str | None = None) -> list[AdapterRecord]:
        def read() -> list[AdapterRecord]:
            ids = sorted(i.decode() for i in self._client.smembers(self._index_key))
            out = []
            for start in range(0, len(ids), 500):  # bounded MGETs for large indexes
                chunk = ids[start : start + 500]
                for adapter_id, raw in zip(chunk, self._client.mget([self._meta_key(i) for i in chunk])):
                    record = self._parse(raw, adapter_id)
                    if record is not None and (tenant is None or record.tenant == tenant):
                        out.append(record)
            return out

        return self._sorted(self._call("list", read))

    def delete(self, adapter_id: str) -> bool:
        validate_id(adapter_id)

        def remove() -> bool:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._meta_key(adapter_id), self._blob_key(adapter_id))
                pipe.srem(self._index_key, adapter_id)
                deleted, _ = pipe.execute()
            return deleted > 0

        return self._call("delete", remove)

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except RedisError:
            return False

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r})"
