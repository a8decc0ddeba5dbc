"""Reading an adapter from a path on the server, as vLLM's `--lora-modules` and /v1/load_lora_adapter name them.

A path is
- a PEFT LoRA directory (what `save_pretrained` writes): adapter_config.json + adapter_model.safetensors;
- or one .safetensors file: the trainer's adapter file, or PEFT's adapter_model.safetensors with its
  adapter_config.json beside it.
Only safetensors are read (PEFT's older adapter_model.bin is a pickle: refused, with how to convert). Sizes are
checked before a byte is read. `roots` confines paths to directories (symlinks resolved first), so a tenant cannot
make the server read files outside them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from adapters_store.peft_import import MAX_CONFIG_BYTES
from service.errors import ApiError

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass(frozen=True)
class AdapterFiles:
    weights: bytes
    config: bytes | None  # a PEFT LoRA's adapter_config.json; None for the trainer's file
    source: Path  # the weights file read


def parse_roots(spec: str | None) -> list[Path]:
    """`--lora-path-roots`: directories separated by os.pathsep (':'), resolved."""
    return [Path(p).expanduser().resolve() for p in (spec or "").split(os.pathsep) if p.strip()]


def _bad(message: str, param: str = "lora_path") -> ApiError:
    return ApiError(400, "invalid_lora_path", message, param=param)


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _read(path: Path, limit: int, what: str) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise ApiError(413, "too_large", f"{what} {path.name} is {size:,} bytes, over this server's limit of {limit:,} "
                       "bytes; use a smaller rank or fewer target_modules", param="lora_path")
    return path.read_bytes()


def read_adapter(path: str, max_bytes: int, roots: list[Path] | None = None) -> AdapterFiles:
    """The files of the adapter at `path` (see the module doc); `roots`: None reads anywhere, else only inside them.
    Raises ApiError: 400 for a path that holds no adapter, 403 outside `roots`, 413 over `max_bytes`."""
    if not path or not path.strip():
        raise _bad("lora_path is empty: give the directory PEFT's save_pretrained wrote, or an adapter .safetensors file")
    where = Path(path).expanduser().resolve()
    if roots is not None and not _inside(where, roots):
        allowed = ", ".join(map(str, roots)) or "none are configured"
        raise ApiError(403, "lora_path_forbidden", f"lora_path {path!r} is outside the directories this server loads "
                       f"adapters from ({allowed}; --lora-path-roots)", param="lora_path")
    if not where.exists():
        raise _bad(f"lora_path {path!r} does not exist on the server")
    if where.is_dir():
        weights, config = where / PEFT_WEIGHTS, where / PEFT_CONFIG
        if not weights.is_file():
            if (where / "adapter_model.bin").is_file():
                raise _bad(f"{path!r} holds adapter_model.bin (a pickle, never loaded here); save it as safetensors: "
                           "model.save_pretrained(dir, safe_serialization=True)")
            found = sorted(p.name for p in where.glob("*.safetensors"))
            if len(found) == 1:  # a directory holding one trainer file
                return AdapterFiles(_read(where / found[0], max_bytes, "the adapter file"), None, where / found[0])
            raise _bad(f"directory {path!r} holds no {PEFT_WEIGHTS} (a PEFT LoRA) and not exactly one .safetensors file "
                       f"(found {len(found)}); give the adapter file itself")
        if not config.is_file():
            raise _bad(f"directory {path!r} has {PEFT_WEIGHTS} but no {PEFT_CONFIG} beside it")
    elif where.suffix != ".safetensors":
        raise _bad(f"lora_path {path!r} is neither a directory nor a .safetensors file")
    else:
        weights, config = where, where.with_name(PEFT_CONFIG)
        if where.name != PEFT_WEIGHTS or not config.is_file():
            config = None
    blob = _read(weights, max_bytes, "the adapter file")
    peft_config = _read(config, MAX_CONFIG_BYTES, PEFT_CONFIG) if config is not None else None
    return AdapterFiles(blob, peft_config, weights)
