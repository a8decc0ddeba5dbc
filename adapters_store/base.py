"""The store interface: disk (embedded default) and Redis (shared by replicas) behave the same behind it."""
from __future__ import annotations

from abc import ABC, abstractmethod

from adapters_store.records import AdapterRecord, check_id, sha256_hex


class StoreError(Exception):
    """A store operation failed."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached right now (the service answers 503 and the client may retry)."""


class AdapterExists(StoreError):
    """put() without overwrite=True for an id that is already stored."""

    def __init__(self, adapter_id: str) -> None:
        super().__init__(f"adapter {adapter_id!r} already exists; delete it first or put with overwrite=True")
        self.adapter_id = adapter_id


class VersionChanged(StoreError):
    """get_blob(expect_sha256=...) found the id stored with other contents (replaced since the caller looked)."""


def validate_id(adapter_id: str) -> str:
    """ValueError unless `adapter_id` matches ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$."""
    return check_id(adapter_id)


class AdapterStore(ABC):
    """Blob (the validated adapter file, byte for byte) + its AdapterRecord, under one adapter id.

    Contract for every backend: put is atomic (readers see the old adapter or the new one, never half) and
    durable (as far as the backend can promise) before it returns; get_* return None for unknown ids.
    """

    @abstractmethod
    def put(self, record: AdapterRecord, blob: bytes, overwrite: bool = False) -> None: ...

    @abstractmethod
    def get_blob(self, adapter_id: str, expect_sha256: str | None = None) -> bytes | None:
        """The blob, checked against its record's sha256 (None for an unknown id or a blob that fails the check).
        With expect_sha256: VersionChanged unless that is the record's sha256, so a caller that knows the version
        it wants need not hash the blob again (a second pass over it: ~0.5 ms for OSoRA, ~14 ms for SORSA)."""

    @abstractmethod
    def get_record(self, adapter_id: str) -> AdapterRecord | None: ...

    @abstractmethod
    def list(self, tenant: str | None = None) -> list[AdapterRecord]: ...

    @abstractmethod
    def delete(self, adapter_id: str) -> bool: ...

    @abstractmethod
    def ping(self) -> bool: ...

    def close(self) -> None:
        pass

    def __enter__(self) -> "AdapterStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _check_version(record: AdapterRecord, expect_sha256: str | None) -> None:
        """get_blob's expect_sha256: VersionChanged unless the record it found is that version."""
        if expect_sha256 is not None and record.sha256 != expect_sha256:
            raise VersionChanged(f"adapter {record.adapter_id!r} is now stored with other contents")

    @staticmethod
    def _check_put(record: AdapterRecord, blob: bytes) -> None:
        """A record must describe exactly the blob stored with it (readers verify by sha256)."""
        validate_id(record.adapter_id)
        if len(blob) != record.size_bytes or sha256_hex(blob) != record.sha256:
            raise ValueError(
                f"record for {record.adapter_id!r} does not describe this blob (size/sha256 differ); "
                "build it with adapters_store.records.record_for(adapter, blob, ...)"
            )

    @staticmethod
    def _sorted(records: list[AdapterRecord]) -> list[AdapterRecord]:
        return sorted(records, key=lambda r: (r.created_at, r.adapter_id))
