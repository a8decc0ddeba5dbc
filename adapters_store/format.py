"""The adapter file: one safetensors file with the trainable tensors and string metadata.

Tensors are named "<qualified module name>.<param>" (e.g. "model.layers.0.self_attn.q_proj.O").
Metadata keys: format, format_version, method, rank, alpha, target_modules (JSON list), base_model,
base_fingerprint, dtype. safetensors never unpickles, so reading an untrusted file runs no code.
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from svd_adapters.adapter import Adapter

FORMAT_NAME = "svdserve-adapter"
FORMAT_VERSION = 1


def adapter_to_bytes(adapter: Adapter, dtype: torch.dtype = torch.float32) -> bytes:
    tensors = {
        f"{module}.{param}": t.detach().to("cpu", dtype).contiguous()
        for module, params in adapter.params.items()
        for param, t in params.items()
    }
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "method": adapter.method,
        "rank": str(adapter.rank),
        "alpha": repr(float(adapter.alpha)),
        "target_modules": json.dumps(list(adapter.target_modules)),
        "base_model": adapter.base_model,
        "base_fingerprint": adapter.base_fingerprint,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return _sorted_metadata(st_save(tensors, metadata=metadata))


def _sorted_metadata(blob: bytes) -> bytes:
    """`blob` with its header's metadata keys in sorted order. safetensors writes metadata in a hash map's order,
    which differs from call to call, so the same adapter gave different bytes (and sha256) each time it was
    serialized: a converted PEFT upload's retry looked like another adapter. Same length, same tensors."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(raw) > n:  # cannot happen (same content, reordered); keep safetensors' own bytes rather than break them
        return blob
    return blob[:8] + raw.ljust(n, b" ") + blob[8 + n :]


def save_adapter(adapter: Adapter, path: str, dtype: torch.dtype = torch.float32) -> int:
    """Write atomically (temp file + rename); returns the size in bytes."""
    import os
    import tempfile

    blob = adapter_to_bytes(adapter, dtype)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".part")
    with os.fdopen(fd, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return len(blob)


def adapter_from_bytes_unchecked(blob: bytes) -> Adapter:
    """Parse without validation (use `validate.load_adapter` for untrusted input)."""
    meta = _read_metadata(blob)
    tensors = st_load(blob)
    params: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, param = key.rsplit(".", 1)
        params.setdefault(module, {})[param] = t.to(torch.float32)
    return Adapter(
        method=meta["method"],
        rank=int(meta["rank"]),
        alpha=float(meta["alpha"]),
        base_model=meta["base_model"],
        base_fingerprint=meta["base_fingerprint"],
        target_modules=tuple(json.loads(meta["target_modules"])),
        params=params,
    )


def _read_metadata(blob: bytes) -> dict[str, str]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {})
