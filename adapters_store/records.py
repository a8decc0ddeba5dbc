"""What a store keeps beside each adapter blob: identity, ownership, shape of the adapter, and the blob's hash."""
from __future__ import annotations

import hashlib
import re
import time
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:  # records and stores stay torch-free: light to import for store-only tools
    from svd_adapters.adapter import Adapter

# Ids become file names and Redis key parts: no '/', no leading '.', bounded length.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_ID_RE = re.compile(ID_PATTERN)


def check_id(value: str, what: str = "adapter id") -> str:
    """Return `value` if it is a valid id, else raise ValueError saying what is allowed."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return value


class AdapterRecord(BaseModel):
    # extra="ignore": a record written by a newer version (with more fields) stays readable by older replicas.
    model_config = ConfigDict(frozen=True, extra="ignore")

    adapter_id: str
    tenant: str = "default"
    method: str
    rank: int = Field(ge=1)
    alpha: float
    trainable_params: int = Field(ge=0)
    size_bytes: int = Field(ge=0)
    base_model: str
    base_fingerprint: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: float = Field(default_factory=time.time)

    @field_validator("adapter_id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        return check_id(v)

    @field_validator("tenant")
    @classmethod
    def _valid_tenant(cls, v: str) -> str:
        return check_id(v, "tenant")


def sha256_hex(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def record_for(adapter: Adapter, blob: bytes, adapter_id: str, tenant: str = "default") -> AdapterRecord:
    """The record for a validated adapter and the exact bytes that will be stored."""
    return AdapterRecord(
        adapter_id=adapter_id,
        tenant=tenant,
        method=adapter.method,
        rank=adapter.rank,
        alpha=adapter.alpha,
        trainable_params=adapter.trainable_params(),
        size_bytes=len(blob),
        base_model=adapter.base_model,
        base_fingerprint=adapter.base_fingerprint,
        sha256=sha256_hex(blob),
    )
