"""Adapter files (format, validation) and where they are kept (disk or Redis, behind AdapterStore)."""
from __future__ import annotations

from adapters_store.base import AdapterExists, AdapterStore, StoreError, StoreUnavailable, validate_id
from adapters_store.records import AdapterRecord, record_for

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_store(spec: str, **kwargs) -> AdapterStore:
    """`redis://…` / `rediss://…` / `unix://…` → RedisStore (kwargs: prefix, timeouts); anything else is a directory → DiskStore."""
    if spec.startswith(REDIS_SCHEMES):
        from adapters_store.redis_store import RedisStore

        return RedisStore(spec, **kwargs)
    from adapters_store.disk import DiskStore

    return DiskStore(spec, **kwargs)


__all__ = [
    "AdapterExists",
    "AdapterRecord",
    "AdapterStore",
    "StoreError",
    "StoreUnavailable",
    "open_store",
    "record_for",
    "validate_id",
]
