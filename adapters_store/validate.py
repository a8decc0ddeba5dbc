"""Complete validation of an UNTRUSTED adapter upload, cheapest checks first.

Order: size → magic bytes (pickle / zip / GGUF disguised as .safetensors) → header length → header JSON →
every tensor entry (dtype, shape, offsets tiling the data exactly) → metadata (format, method, fingerprint,
targets, rank, alpha) → tensor names and shapes against what this base expects → only then are tensor
bytes decoded (by safetensors, whose header we already checked) and tested for NaN/Inf.
A header that passed every check is remembered (`_LayoutCache`): the next file with the same header (another
tenant's adapter of the same method, rank and targets) goes from the header length straight to its data's checks.
Nothing here unpickles: torch.load / pickle are never used.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import threading
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load as st_load

from adapters_store.format import FORMAT_NAME, FORMAT_VERSION
from svd_adapters.adapter import Adapter, selected_modules
from svd_adapters.factors import BaseFactors
from svd_adapters.methods import METHODS, get_method

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
# Only floating dtypes a trainer would write; everything is served as float32.
ALLOWED_DTYPES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
# Other safetensors dtypes, so a wrong-but-real dtype gets a precise message rather than "garbage".
KNOWN_ST_DTYPES = {"F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3", "F8_E5M2"}
REQUIRED_METADATA = ("format", "format_version", "method", "rank", "alpha", "target_modules", "base_fingerprint")
SVD_METHODS_NOTE = "OSoRA, LoRA-XS and SORSA slice the server's SVD factors"


class AdapterValidationError(ValueError):
    """An upload was refused. `code` is stable (for clients and metrics); `message` says what and how to fix."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _fail(code: str, message: str) -> AdapterValidationError:
    return AdapterValidationError(code, message)


def _first_few(names: list[str], n: int = 3) -> str:
    """'a, b, c (and 4 more)': enough names for an error message to be actionable without being a wall."""
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return f"{', '.join(names[:n])}{more}"


def load_adapter(
    blob: bytes,
    factors: BaseFactors,
    base_model_name: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_rank: int | None = None,
) -> Adapter:
    """Validate `blob` completely against this server's base `factors`; return the Adapter (float32 tensors).

    `base_model_name` only makes messages clearer: identity is the factor fingerprint, not a name.
    Raises AdapterValidationError on any problem.
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    _check_size(blob, max_bytes)
    header_len = _check_magic_and_header_len(blob)
    raw = blob[8 : 8 + header_len]
    key = (_header_key(raw), len(blob) - 8 - header_len, factors.fingerprint, base_model_name, max_rank)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _check_layout(raw, len(blob) - 8 - header_len, factors, base_model_name, max_rank)
        _LAYOUTS.put(key, layout)
    return _decode(blob, layout, 8 + header_len)


_METADATA_FIRST = b'{"__metadata__":'
# duplicate keys refused, as the full parse does (a lambda: `_no_duplicate_keys` is defined further down)
_METADATA_DECODER = json.JSONDecoder(object_pairs_hook=lambda pairs: _no_duplicate_keys(pairs))


def _header_key(raw: bytes) -> tuple:
    """What identifies a header's meaning: its bytes, except that the metadata (which safetensors writes first,
    its keys in no fixed order: two saves of one adapter differ there) counts by its sorted items."""
    if raw.startswith(_METADATA_FIRST):
        try:
            text = raw.decode("utf-8")
            metadata, end = _METADATA_DECODER.raw_decode(text, len(_METADATA_FIRST))
        except (UnicodeDecodeError, ValueError, RecursionError):
            metadata = None  # the full check explains
        if isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()):
            return tuple(sorted(metadata.items())), hashlib.sha256(text[end:].encode()).digest()
    return (), hashlib.sha256(raw).digest()


class _Layout(NamedTuple):
    """What a header says once it has passed every check: the metadata's meaning and, for an all-F32 file, the
    pieces `_decode_f32` cuts its data into (None: the file is decoded by safetensors)."""

    meta: dict[str, Any]
    f32_plan: _F32Plan | None


def _check_layout(raw: bytes, data_len: int, factors: BaseFactors, base_model_name: str | None,
                  max_rank: int | None) -> _Layout:
    """Every check of the header (JSON, entries, metadata, names and shapes against this base)."""
    header = _parse_header_json(raw)
    metadata = header.pop("__metadata__", None)
    entries = _check_entries(header, data_len=data_len)
    meta = _check_metadata(metadata, factors, base_model_name, max_rank)
    _check_tensor_names_and_shapes(entries, meta, factors)
    return _Layout(meta, _f32_plan(header))


class _LayoutCache:
    """Headers that passed `_check_layout`, by `_header_key` and everything else the checks read (data length,
    base fingerprint, name, max_rank); least recently used first out. Adapters of one method, rank and targets
    (every tenant's, from the trainer) have one header up to the order of its metadata's keys, and parsing and
    checking a header of hundreds of entries was most of a cold load's CPU time (OSoRA: ~2/5 of fetch + validate +
    terms). The tensor data is still checked on every load; a refused header is never kept, so it is refused
    again."""

    def __init__(self, size: int = 64) -> None:
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key: tuple) -> _Layout | None:
        with self._lock:
            layout = self._items.get(key)
            if layout is not None:
                self._items.move_to_end(key)
            return layout

    def put(self, key: tuple, layout: _Layout) -> None:
        with self._lock:
            self._items[key] = layout
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_LAYOUTS = _LayoutCache()


# --- bytes level -------------------------------------------------------------------------------------------


def _check_size(blob: bytes, max_bytes: int) -> None:
    if len(blob) > max_bytes:
        raise _fail(
            "too_large",
            f"the file is {len(blob):,} bytes, over this server's limit of {max_bytes:,} bytes; "
            "use a smaller rank or fewer target_modules, or save in float16/bfloat16",
        )
    if len(blob) == 0:
        raise _fail("truncated", "the upload is empty; send the adapter's .safetensors file as the request body")


def _disguise(blob: bytes) -> str | None:
    """Name a well-known non-safetensors format from its magic bytes, or None."""
    if blob.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch torch.save checkpoint / .bin / .pt is a zip of pickles)"
    if len(blob) >= 2 and blob[0] == 0x80 and 2 <= blob[1] <= 5:
        return "a Python pickle (a legacy PyTorch .bin / .pt checkpoint)"
    if blob.startswith(b"GGUF"):
        return "a GGUF file"
    if blob.startswith(b"\x1f\x8b"):
        return "a gzip file"
    if blob.startswith(b"\x89HDF"):
        return "an HDF5 file"
    return None


def _check_magic_and_header_len(blob: bytes) -> int:
    header_len = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else -1
    looks_safetensors = 2 <= header_len <= len(blob) - 8 and blob[8:9] == b"{"
    # A real safetensors header length can start with byte 0x80, so magic bytes only decide when the
    # file does not already look like safetensors (8-byte length followed by '{').
    if not looks_safetensors and (kind := _disguise(blob)) is not None:
        raise _fail(
            "not_safetensors",
            f"this is {kind}, not a safetensors file. Pickle-based files can run code when loaded and are "
            "never opened here. Re-save the tensors with safetensors (e.g. adapters_store.format.save_adapter, "
            "or safetensors.torch.save_file with the svdserve metadata) and upload that",
        )
    if len(blob) < 8:
        raise _fail(
            "truncated",
            f"the file is only {len(blob)} bytes; a safetensors file starts with an 8-byte header length. "
            "The upload was cut short; send the whole file",
        )
    if header_len > MAX_HEADER_BYTES:
        raise _fail(
            "header_too_large",
            f"the safetensors header claims {header_len:,} bytes, over the {MAX_HEADER_BYTES:,}-byte limit; "
            "an adapter header is a few KiB. This is not a valid adapter (or not a safetensors file at all)",
        )
    if header_len > len(blob) - 8:
        raise _fail(
            "truncated",
            f"the header claims {header_len:,} bytes but only {len(blob) - 8:,} follow the length field; "
            "the file was cut short. Upload the complete file",
        )
    if header_len < 2:
        raise _fail("bad_header", f"a header length of {header_len} cannot hold a JSON object; not a safetensors file")
    return header_len


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # one C call per JSON object: a header has hundreds of them
    if len(out) != len(pairs):  # different parsers keep different duplicates: refuse the ambiguity
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def _parse_header_json(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting → RecursionError
        raise _fail(
            "bad_header",
            f"the safetensors header is not valid UTF-8 JSON ({exc}); the file is corrupt or not safetensors. "
            "Re-export it with safetensors",
        ) from None
    if not isinstance(header, dict):
        raise _fail("bad_header", f"the safetensors header must be a JSON object, got {type(header).__name__}")
    return header


_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _check_entries(header: dict[str, Any], data_len: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor entry well formed; offsets tile [0, data_len) exactly. Returns name → (dtype, shape)."""
    entries: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.keys() != _ENTRY_KEYS:
            raise _fail(
                "bad_header",
                f"tensor {name!r}: entry must be an object with exactly dtype, shape and data_offsets; "
                "the file is corrupt or hand-made. Re-export it with safetensors",
            )
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in ALLOWED_DTYPES:
            what = f"dtype {dtype}" if dtype in KNOWN_ST_DTYPES else f"unknown dtype {dtype!r}"
            raise _fail(
                "bad_dtype",
                f"tensor {name!r} has {what}; adapter tensors must be F32, F16 or BF16. "
                "Convert them to a float dtype (e.g. tensor.float()) before saving",
            )
        if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail("bad_header", f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and type(offsets[0]) is int and type(offsets[1]) is int):
            raise _fail("bad_header", f"tensor {name!r}: data_offsets {offsets!r} must be two integers [begin, end]")
        begin, end = offsets
        nbytes = math.prod(shape) * ALLOWED_DTYPES[dtype]
        if begin < 0 or end < begin or end - begin != nbytes:
            raise _fail(
                "bad_header",
                f"tensor {name!r}: data_offsets [{begin}, {end}] do not match shape {shape} × {dtype} "
                f"({nbytes} bytes); the header is inconsistent with the data. Re-export the file",
            )
        spans.append((begin, end, name))
        entries[name] = (dtype, tuple(shape))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        # Exact tiling: no overlap (two tensors aliasing bytes) and no gap (hidden payload between tensors).
        if begin != pos:
            kind = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise _fail("bad_header", f"tensor {name!r} {kind} in the data section; re-export the file with safetensors")
        pos = end
    if pos > data_len:
        raise _fail(
            "truncated",
            f"the header describes {pos:,} bytes of tensor data but the file holds {data_len:,}; "
            "the file was cut short. Upload the complete file",
        )
    if pos < data_len:
        raise _fail(
            "bad_header",
            f"{data_len - pos:,} bytes follow the last tensor; a safetensors file ends with its last tensor. "
            "Re-export the file with safetensors",
        )
    return entries


# --- metadata ----------------------------------------------------------------------------------------------


def _check_metadata(
    metadata: Any, factors: BaseFactors, base_model_name: str | None, max_rank: int | None
) -> dict[str, Any]:
    if metadata is None:
        raise _fail(
            "bad_metadata",
            "the file has no metadata, so it is not an svdserve adapter (a PEFT adapter_model.safetensors must "
            "be converted first). Save it with adapters_store.format.save_adapter",
        )
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _fail("bad_header", "__metadata__ must be a JSON object mapping strings to strings")
    if metadata.get("format") != FORMAT_NAME:
        raise _fail(
            "bad_metadata",
            f"metadata format is {metadata.get('format')!r}, expected {FORMAT_NAME!r}; this is not an svdserve "
            "adapter file. Save it with adapters_store.format.save_adapter (or the trainer's export)",
        )
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise _fail("bad_metadata", f"metadata lacks {', '.join(missing)}; re-save with adapters_store.format.save_adapter")
    if metadata["format_version"] != str(FORMAT_VERSION):
        raise _fail(
            "bad_metadata",
            f"format_version {metadata['format_version']!r} is not supported (this server reads version "
            f"{FORMAT_VERSION}); re-save the adapter with this server's svdserve version",
        )

    method = metadata["method"]
    if method not in METHODS:
        raise _fail(
            "unknown_method",
            f"method {method!r} is unknown; this server serves {', '.join(sorted(METHODS))}. "
            "Set metadata 'method' to one of those",
        )

    fingerprint = metadata["base_fingerprint"]
    if fingerprint != factors.fingerprint:
        served = f"base {base_model_name!r}" if base_model_name else "its base"
        raise _fail(
            "fingerprint_mismatch",
            f"the adapter's base_fingerprint is {fingerprint!r} but this server serves {served} with factor "
            f"fingerprint {factors.fingerprint!r}: the adapter was trained against another base model or "
            "another SVD factor set, and its tensors mean nothing here. Retrain it against this server's base "
            "(its factors), or upload it to a server running the base it was trained on",
        )

    try:
        targets = json.loads(metadata["target_modules"])
    except ValueError:
        targets = None
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise _fail("bad_metadata", 'target_modules must be a non-empty JSON list of names, e.g. ["q_proj", "v_proj"]')
    if len(set(targets)) != len(targets):
        raise _fail("bad_metadata", f"target_modules {targets} lists a module twice; list each once")
    known = sorted({name.rsplit(".", 1)[-1] for name in factors.modules})
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise _fail(
            "unknown_module",
            f"target_modules {unknown} are not adaptable linears of this base; known: {', '.join(known)}",
        )

    rank_s = metadata["rank"]
    # Length cap first: int() of a huge digit string is slow (and refused past 4300 digits).
    if not (rank_s.isascii() and rank_s.isdigit() and len(rank_s) <= 9) or int(rank_s) < 1:
        raise _fail("bad_metadata", f"rank {rank_s!r} must be a positive integer")
    rank = int(rank_s)
    if method == "lora":
        # Plain LoRA does not slice the factors; a rank above min(m, n) only wastes memory.
        limit = min(min(factors.modules[n].shape) for n in selected_modules(factors, tuple(targets)))
        why = "min(out, in) over its target modules"
    else:
        limit, why = factors.r_max, f"this server's SVD factor rank r_max ({SVD_METHODS_NOTE})"
    if rank > limit:
        raise _fail("rank_too_large", f"rank {rank} exceeds {limit}, {why}; retrain with rank ≤ {limit}")
    if max_rank is not None and rank > max_rank:
        raise _fail("rank_too_large", f"rank {rank} exceeds this server's max_rank {max_rank}; retrain with rank ≤ {max_rank}")

    try:
        alpha = float(metadata["alpha"])
    except ValueError:
        alpha = math.nan
    if not math.isfinite(alpha):
        raise _fail("bad_metadata", f"alpha {metadata['alpha']!r} must be a finite number (commonly alpha = rank)")

    return {
        "method": method,
        "rank": rank,
        "alpha": alpha,
        "targets": tuple(targets),
        "fingerprint": fingerprint,
        "base_model": metadata.get("base_model", base_model_name or ""),
    }


# --- tensors -----------------------------------------------------------------------------------------------


def _infer_rank(method: str, m: int, n: int, actual: dict[str, tuple[int, ...]]) -> int | None:
    """The rank these tensors were really saved with, if they fit the method at some rank."""
    shapes_of = get_method(method).param_shapes
    for r in sorted({d for s in actual.values() for d in s if d >= 1}):
        if shapes_of(m, n, r) == actual:
            return r
    return None


def _check_tensor_names_and_shapes(
    entries: dict[str, tuple[str, tuple[int, ...]]], meta: dict[str, Any], factors: BaseFactors
) -> None:
    probe = Adapter(meta["method"], meta["rank"], meta["alpha"], meta["base_model"], meta["fingerprint"], meta["targets"])
    expected = factors.memo(("expected_tensors", probe.method, probe.rank, tuple(probe.target_modules)), lambda: {
        f"{module}.{param}": shape
        for module, params in probe.expected_shapes(factors).items()
        for param, shape in params.items()
    })
    missing = [k for k in expected if k not in entries]
    if missing:
        raise _fail(
            "missing_tensor",
            f"tensor(s) {_first_few(missing)} are missing; a {meta['method']} adapter over "
            f"target_modules {list(meta['targets'])} needs {len(expected)} tensors. Save the complete adapter",
        )
    extra = sorted(k for k in entries if k not in expected)
    if extra:
        raise _fail(
            "unexpected_tensor",
            f"tensor(s) {_first_few(extra)} do not belong to a {meta['method']} adapter over "
            f"target_modules {list(meta['targets'])}; remove them or fix target_modules/method in the metadata",
        )

    wrong = [k for k, shape in expected.items() if entries[k][1] != shape]
    if not wrong:
        return
    # Tell a lying metadata rank apart from a broken tensor: do all modules agree on another rank?
    inferred: set[int | None] = set()
    for module in probe.expected_shapes(factors):
        m, n = factors.modules[module].shape
        actual = {k.rsplit(".", 1)[1]: entries[k][1] for k in expected if k.rsplit(".", 1)[0] == module}
        inferred.add(_infer_rank(meta["method"], m, n, actual))
    if len(inferred) == 1 and (r := next(iter(inferred))) is not None and r != meta["rank"]:
        raise _fail(
            "rank_mismatch",
            f"metadata says rank {meta['rank']} but every tensor has rank {r}: the metadata lies about the rank. "
            f"Set metadata 'rank' to {r} (and check alpha), or re-save with adapters_store.format.save_adapter",
        )
    k = wrong[0]
    raise _fail(
        "shape_mismatch",
        f"tensor {k!r} has shape {list(entries[k][1])}, expected {list(expected[k])} for a rank-{meta['rank']} "
        f"{meta['method']} adapter on this base ({len(wrong)} tensor(s) wrong). It was trained for another "
        "model architecture or saved incorrectly",
    )


class _F32Plan(NamedTuple):
    """How `_decode_f32` cuts an all-F32 file's data section: runs of back-to-back tensors of one shape, in data
    order, each (shape, its tensors as (module, param)), and the runs' sizes in numbers."""

    runs: list[tuple[tuple[int, ...], list[tuple[str, str]]]]
    sizes: list[int]


def _f32_plan(header: dict[str, Any]) -> _F32Plan | None:
    """None when a tensor is not F32 or not 4-byte aligned (or this host is big-endian): safetensors decodes."""
    spans = sorted((e["data_offsets"][0], name, e["shape"]) for name, e in header.items())
    if not spans or sys.byteorder != "little" or any(header[name]["dtype"] != "F32" or begin % 4 for begin, name, _ in spans):
        return None
    runs: list[tuple[tuple[int, ...], list[tuple[str, str]]]] = []
    for _, name, shape in spans:
        module, param = name.rsplit(".", 1)
        if runs and runs[-1][0] == tuple(shape):
            runs[-1][1].append((module, param))
        else:
            runs.append((tuple(shape), [(module, param)]))
    return _F32Plan(runs, [math.prod(shape) * len(names) for shape, names in runs])


def _decode_f32(blob: bytes, plan: _F32Plan, data_start: int) -> dict[str, dict[str, torch.Tensor]] | None:
    """Fast path for all-F32 files (what the trainer writes): one copy of the data section, one finiteness check
    for the whole file, tensors as views of the copy, by module and param. None when a value is non-finite (the
    slow path explains). `_check_entries` has checked that the tensors tile the data section exactly."""
    # numpy: a single-threaded scan. torch's parallel kernels stall when the engine thread holds the cores.
    if not np.isfinite(np.frombuffer(blob, dtype="<f4", offset=data_start)).all():
        return None
    flat = torch.frombuffer(bytearray(memoryview(blob)[data_start:]), dtype=torch.float32)  # writable, owned
    # Runs of back-to-back tensors of one shape are one piece each (LoRA-XS: all its cores), the rest a piece per
    # tensor (OSoRA's vectors alternate in size); one split makes every piece. An adapter has hundreds of tensors,
    # and a Python-level slice and view each was most of a cold load's time.
    params: dict[str, dict[str, torch.Tensor]] = {}
    for (shape, names), piece in zip(plan.runs, torch.split(flat, plan.sizes)):
        if len(names) > 1:
            for (module, param), t in zip(names, piece.view(len(names), *shape).unbind(0)):
                params.setdefault(module, {})[param] = t
        else:
            module, param = names[0]
            params.setdefault(module, {})[param] = piece if len(shape) == 1 else piece.view(shape)
    return params


def _decode(blob: bytes, layout: _Layout, data_start: int) -> Adapter:
    meta = layout.meta
    fast = _decode_f32(blob, layout.f32_plan, data_start) if layout.f32_plan and len(blob) > data_start else None
    if fast is not None:
        return _adapter(meta, fast)
    try:
        tensors = st_load(blob)  # header fully checked above; safetensors itself never executes code
    except Exception as exc:  # defensive: a safetensors rule we did not mirror
        raise _fail("bad_header", f"safetensors could not read the file ({exc}); re-export it with safetensors") from None
    params: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        t = tensors[key].to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            kinds = [w for w, hit in (("NaN", t.isnan().any()), ("Inf", t.isinf().any())) if hit]
            raise _fail(
                "non_finite",
                f"tensor {key!r} has {bad} non-finite value(s) ({'/'.join(kinds)}); training diverged or the "
                "file is corrupt. Retrain (lower the learning rate, clip gradients) or re-export a good checkpoint",
            )
        module, param = key.rsplit(".", 1)
        params.setdefault(module, {})[param] = t.contiguous()
    return _adapter(meta, params)


def _adapter(meta: dict[str, Any], params: dict[str, dict[str, torch.Tensor]]) -> Adapter:
    return Adapter(
        method=meta["method"],
        rank=meta["rank"],
        alpha=meta["alpha"],
        base_model=meta["base_model"],
        base_fingerprint=meta["fingerprint"],
        target_modules=meta["targets"],
        params=params,
    )
