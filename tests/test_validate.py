"""Every kind of bad upload is refused before anything is stored, each with its own code and a fixing hint."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save as st_save

from adapters_store.format import adapter_to_bytes
from adapters_store import validate
from adapters_store.validate import MAX_HEADER_BYTES, AdapterValidationError, load_adapter
from svd_adapters.adapter import Adapter, new_adapter
from svd_adapters.factors import BaseFactors
from svd_adapters.methods import get_method

Q0 = "model.layers.0.self_attn.q_proj"


# --- helpers: take a good file apart and put it back together with one thing wrong ---------------------


def split(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def parts(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header, _ = split(adapter_to_bytes(adapter))
    tensors = {f"{m}.{p}": t.clone(memory_format=torch.contiguous_format) for m, ps in adapter.params.items() for p, t in ps.items()}
    return tensors, header["__metadata__"]


def with_meta(blob: bytes, **changes: str | None) -> bytes:
    header, data = split(blob)
    meta = header["__metadata__"]
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    return join(header, data)


def refused(blob: bytes, factors: BaseFactors, code: str, *hints: str, **kw) -> AdapterValidationError:
    with pytest.raises(AdapterValidationError) as info:
        load_adapter(blob, factors, **kw)
    err = info.value
    assert err.code == code, f"expected {code}, got {err.code}: {err.message}"
    for hint in hints:
        assert hint.lower() in err.message.lower(), (hint, err.message)
    assert str(err).startswith(code)
    return err


@pytest.fixture(scope="module")
def osora(tiny_factors: BaseFactors) -> Adapter:
    return new_adapter("osora", 4, tiny_factors, base_model="tiny-random-llama")


@pytest.fixture(scope="module")
def good(osora: Adapter) -> bytes:
    return adapter_to_bytes(osora)


def test_good_file_is_accepted(good: bytes, tiny_factors: BaseFactors) -> None:
    adapter = load_adapter(good, tiny_factors, base_model_name="tiny-random-llama", max_rank=4)
    assert adapter.method == "osora" and adapter.rank == 4
    assert len(adapter.params) == len(tiny_factors.modules)


# --- bytes level --------------------------------------------------------------------------------------


def test_oversized_file(good: bytes, tiny_factors: BaseFactors) -> None:
    refused(good, tiny_factors, "too_large", f"{len(good):,} bytes", "limit", max_bytes=len(good) - 1)
    load_adapter(good, tiny_factors, max_bytes=len(good))  # the limit itself is allowed


@pytest.mark.parametrize("cut", ["empty", "short", "in_header", "in_data"])
def test_truncated_file(cut: str, good: bytes, tiny_factors: BaseFactors) -> None:
    n = int.from_bytes(good[:8], "little")
    blob = {"empty": b"", "short": good[:5], "in_header": good[: 8 + n // 2], "in_data": good[:-7]}[cut]
    refused(blob, tiny_factors, "truncated", "upload")


def test_header_too_large(tiny_factors: BaseFactors) -> None:
    size = MAX_HEADER_BYTES + 16
    blob = size.to_bytes(8, "little") + b"{" + b" " * (size - 1)
    refused(blob, tiny_factors, "header_too_large", "limit")
    # A huge claimed length with a tiny file is also refused at once, without reading anything.
    refused((1 << 62).to_bytes(8, "little") + b"{}", tiny_factors, "header_too_large")


def test_torch_zip_checkpoint_disguised(osora: Adapter, tiny_factors: BaseFactors) -> None:
    buf = io.BytesIO()
    torch.save({k: t for k, t in parts(osora)[0].items()}, buf)  # what a PyTorch .bin/.pt really is
    assert buf.getvalue()[:4] == b"PK\x03\x04"
    refused(buf.getvalue(), tiny_factors, "not_safetensors", "zip", "pickle", "safetensors")
    # Any zip, even a tiny one, gets the same specific answer.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"x")
    refused(buf.getvalue(), tiny_factors, "not_safetensors", "zip")


def test_pickle_disguised(osora: Adapter, tiny_factors: BaseFactors) -> None:
    buf = io.BytesIO()
    torch.save(parts(osora)[0], buf, _use_new_zipfile_serialization=False)  # legacy .bin: raw pickle
    assert buf.getvalue()[0] == 0x80
    refused(buf.getvalue(), tiny_factors, "not_safetensors", "pickle", "run code")
    refused(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.", tiny_factors, "not_safetensors", "pickle")


def test_pickle_magic_in_a_real_header_length_is_not_misread(osora: Adapter, tiny_factors: BaseFactors) -> None:
    # A header length whose first bytes are 0x80, 0x02 looks like pickle protocol 2 but is valid safetensors.
    header, data = split(adapter_to_bytes(osora))
    raw = json.dumps(header).encode()
    length = next(L for L in range(len(raw), MAX_HEADER_BYTES) if L & 0xFFFF in (0x0280, 0x0380, 0x0480, 0x0580))
    blob = join(raw + b" " * (length - len(raw)), data)
    assert blob[0] == 0x80 and 2 <= blob[1] <= 5
    assert load_adapter(blob, tiny_factors).rank == 4


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b'{"a": 1', b"[1, 2, 3]", b"\xff\xfe{}", b'{"__metadata__": {}, "__metadata__": {}}', b"[" * 5000],
    ids=["garbage", "unterminated", "array", "not_utf8", "duplicate_keys", "deep_nesting"],
)
def test_header_not_json_object(raw: bytes, tiny_factors: BaseFactors) -> None:
    refused(join(raw, b""), tiny_factors, "bad_header", "json")


def test_wrong_dtype(osora: Adapter, tiny_factors: BaseFactors) -> None:
    tensors, meta = parts(osora)
    tensors[f"{Q0}.O"] = tensors[f"{Q0}.O"].to(torch.int64)
    refused(st_save(tensors, metadata=meta), tiny_factors, "bad_dtype", "I64", "F32, F16 or BF16")
    tensors[f"{Q0}.O"] = tensors[f"{Q0}.O"].to(torch.float64)
    refused(st_save(tensors, metadata=meta), tiny_factors, "bad_dtype", "F64")


def test_offsets_trickery(good: bytes, tiny_factors: BaseFactors) -> None:
    header, data = split(good)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    first, second = header[names[0]], header[names[1]]

    overlap = json.loads(json.dumps(header))
    b0, e0 = first["data_offsets"]
    size1 = second["data_offsets"][1] - second["data_offsets"][0]
    overlap[names[1]]["data_offsets"] = [b0, b0 + size1]  # aliases the first tensor's bytes
    refused(join(overlap, data), tiny_factors, "bad_header", "overlaps")

    gap = json.loads(json.dumps(header))
    for k in names[1:]:
        gap[k]["data_offsets"] = [o + 4 for o in gap[k]["data_offsets"]]
    refused(join(gap, data[:e0] + b"EVIL" + data[e0:]), tiny_factors, "bad_header", "gap")

    refused(join(header, data + b"trailing"), tiny_factors, "bad_header", "follow the last tensor")

    lying = json.loads(json.dumps(header))
    lying[names[0]]["shape"] = [first["shape"][0] * 2]
    refused(join(lying, data), tiny_factors, "bad_header", "do not match shape")

    negative = json.loads(json.dumps(header))
    negative[names[0]]["shape"] = [-1]
    refused(join(negative, data), tiny_factors, "bad_header", "non-negative")


# --- metadata -----------------------------------------------------------------------------------------


def test_bad_format_name(good: bytes, tiny_factors: BaseFactors) -> None:
    refused(with_meta(good, format="peft"), tiny_factors, "bad_metadata", "svdserve-adapter", "save_adapter")


def test_no_metadata_at_all(osora: Adapter, tiny_factors: BaseFactors) -> None:
    refused(st_save(parts(osora)[0]), tiny_factors, "bad_metadata", "no metadata", "PEFT")


@pytest.mark.parametrize(
    "change, hint",
    [
        ({"format_version": "2"}, "not supported"),
        ({"rank": "four"}, "positive integer"),
        ({"rank": "0"}, "positive integer"),
        ({"rank": "9" * 5000}, "positive integer"),
        ({"alpha": "nan"}, "finite"),
        ({"alpha": "inf"}, "finite"),
        ({"alpha": "x"}, "finite"),
        ({"target_modules": "q_proj"}, "JSON list"),
        ({"target_modules": "[]"}, "JSON list"),
        ({"target_modules": '["q_proj", "q_proj"]'}, "twice"),
        ({"base_fingerprint": None}, "lacks base_fingerprint"),
    ],
)
def test_bad_metadata_values(change: dict, hint: str, good: bytes, tiny_factors: BaseFactors) -> None:
    refused(with_meta(good, **change), tiny_factors, "bad_metadata", hint)


def test_unknown_method(good: bytes, tiny_factors: BaseFactors) -> None:
    refused(with_meta(good, method="dora"), tiny_factors, "unknown_method", "'dora'", "osora", "loraxs", "sorsa", "lora")


def test_other_fingerprint(good: bytes, tiny_factors: BaseFactors) -> None:
    err = refused(
        with_meta(good, base_fingerprint="0" * 32), tiny_factors, "fingerprint_mismatch",
        "0" * 32, tiny_factors.fingerprint, "another base", "retrain", "tiny-random-llama",
        base_model_name="tiny-random-llama",
    )
    assert "upload it to a server" in err.message


def test_unknown_target_module(good: bytes, tiny_factors: BaseFactors) -> None:
    refused(with_meta(good, target_modules='["q_proj", "lm_head"]'), tiny_factors, "unknown_module", "lm_head", "known")


def test_rank_above_r_max(tiny_factors: BaseFactors) -> None:
    r = tiny_factors.r_max + 1
    adapter = new_adapter("loraxs", 2, tiny_factors, base_model="tiny", target_modules=("q_proj",))
    tensors = {f"{m}.R": torch.zeros(r, r) for m in adapter.params}
    meta = parts(adapter)[1] | {"rank": str(r)}
    refused(st_save(tensors, metadata=meta), tiny_factors, "rank_too_large", "r_max", f"rank ≤ {tiny_factors.r_max}")


def test_lora_rank_above_min_dim(tiny_factors: BaseFactors) -> None:
    # LoRA does not use the factors: it may exceed r_max only up to min(out, in) of its targets.
    too_big = min(min(tiny_factors.modules[n].shape) for n in tiny_factors.modules if n.endswith("k_proj")) + 1
    adapter = new_adapter("lora", too_big, tiny_factors, base_model="tiny", target_modules=("k_proj",))
    refused(adapter_to_bytes(adapter), tiny_factors, "rank_too_large", "min(out, in)")


def test_rank_above_server_max_rank(good: bytes, tiny_factors: BaseFactors) -> None:
    refused(good, tiny_factors, "rank_too_large", "max_rank 2", max_rank=2)


def test_metadata_lies_about_rank(good: bytes, tiny_factors: BaseFactors) -> None:
    refused(with_meta(good, rank="8"), tiny_factors, "rank_mismatch", "metadata says rank 8", "rank 4")


# --- tensors ------------------------------------------------------------------------------------------


def test_wrong_shape(osora: Adapter, tiny_factors: BaseFactors) -> None:
    tensors, meta = parts(osora)
    tensors[f"{Q0}.O"] = torch.ones(65)
    refused(st_save(tensors, metadata=meta), tiny_factors, "shape_mismatch", f"{Q0}.O", "[65]", "expected [64]")


def test_wrong_shape_in_one_module_is_not_called_a_rank_lie(tiny_factors: BaseFactors) -> None:
    adapter = new_adapter("loraxs", 4, tiny_factors, base_model="tiny")
    tensors, meta = parts(adapter)
    tensors[f"{Q0}.R"] = torch.zeros(3, 3)  # only one module disagrees: broken, not mislabelled
    refused(st_save(tensors, metadata=meta), tiny_factors, "shape_mismatch", f"{Q0}.R")


def test_missing_tensor(osora: Adapter, tiny_factors: BaseFactors) -> None:
    tensors, meta = parts(osora)
    del tensors[f"{Q0}.S"]
    refused(st_save(tensors, metadata=meta), tiny_factors, "missing_tensor", f"{Q0}.S")


def test_extra_tensor(osora: Adapter, tiny_factors: BaseFactors) -> None:
    tensors, meta = parts(osora)
    tensors[f"{Q0}.R"] = torch.zeros(4, 4)
    refused(st_save(tensors, metadata=meta), tiny_factors, "unexpected_tensor", f"{Q0}.R")
    # Tensors for modules the metadata does not target are extra too.
    refused(
        st_save(parts(osora)[0], metadata=meta | {"target_modules": '["q_proj"]'}),
        tiny_factors, "unexpected_tensor", "target_modules",
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite(bad: float, dtype: torch.dtype, osora: Adapter, tiny_factors: BaseFactors) -> None:
    tensors, meta = parts(osora)
    tensors[f"{Q0}.S"][1] = bad
    tensors = {k: t.to(dtype) for k, t in tensors.items()}
    refused(st_save(tensors, metadata=meta), tiny_factors, "non_finite", f"{Q0}.S", "NaN" if bad != bad else "Inf")


def test_every_method_checks_shapes(tiny_factors: BaseFactors) -> None:
    for method in ("osora", "loraxs", "sorsa", "lora"):
        adapter = new_adapter(method, 3, tiny_factors, base_model="tiny", target_modules=("v_proj",))
        tensors, meta = parts(adapter)
        name = next(iter(tensors))
        tensors[name] = torch.zeros(*[d + 1 for d in tensors[name].shape])
        err = refused(st_save(tensors, metadata=meta), tiny_factors, "shape_mismatch")
        assert name in err.message
        assert set(get_method(method).param_shapes(32, 64, 3)) == {k.rsplit(".", 1)[1] for k in tensors}


# --- headers already checked are remembered (`validate._LAYOUTS`); the data never is ---------------------


@pytest.fixture
def layout_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per header checked in full from here on (none remembered at the start)."""
    checks: list[int] = []
    real = validate._check_layout
    monkeypatch.setattr(validate, "_check_layout", lambda *a: (checks.append(1), real(*a))[1])
    validate._LAYOUTS.clear()
    return checks


def test_a_header_is_checked_once_and_its_layout_reused(osora: Adapter, tiny_factors: BaseFactors,
                                                        layout_checks: list[int]) -> None:
    good = adapter_to_bytes(osora)
    first, second = load_adapter(good, tiny_factors), load_adapter(good, tiny_factors)
    assert len(layout_checks) == 1
    for module, params in osora.params.items():
        for name, t in params.items():
            assert torch.equal(first.params[module][name], t) and torch.equal(second.params[module][name], t)
    assert second.params[Q0]["S"].data_ptr() != first.params[Q0]["S"].data_ptr()  # each load owns its tensors
    load_adapter(with_meta(good, alpha="2.0"), tiny_factors)  # another header: checked in full
    assert len(layout_checks) == 2


def test_a_remembered_header_still_has_its_data_checked(osora: Adapter, tiny_factors: BaseFactors) -> None:
    good = adapter_to_bytes(osora)
    load_adapter(good, tiny_factors)
    header_len = int.from_bytes(good[:8], "little")
    header, data = split(good)
    at = header[f"{Q0}.S"]["data_offsets"][0] + 4  # S[1], float32
    data = data[:at] + struct.pack("<f", math.nan) + data[at + 4 :]
    bad = good[: 8 + header_len] + data  # byte for byte the header just accepted
    refused(bad, tiny_factors, "non_finite", f"{Q0}.S", "NaN")


def test_a_remembered_header_is_checked_again_for_another_server_or_length(osora: Adapter,
                                                                           tiny_factors: BaseFactors) -> None:
    good = adapter_to_bytes(osora)
    load_adapter(good, tiny_factors, max_rank=4)
    refused(good, tiny_factors, "rank_too_large", "max_rank 3", max_rank=3)
    refused(good[:-4], tiny_factors, "truncated", "upload")
    other_base = dataclasses.replace(tiny_factors, fingerprint="0" * 16)
    refused(good, other_base, "fingerprint_mismatch", "retrain")


def test_the_layout_cache_keeps_the_most_recently_used() -> None:
    cache = validate._LayoutCache(size=2)
    layouts = [validate._Layout({"n": i}, None) for i in range(4)]
    for i in range(3):
        cache.put((i,), layouts[i])
    assert cache.get((0,)) is None and cache.get((2,)) is layouts[2]
    assert cache.get((1,)) is layouts[1]  # now the most recent: 2 goes next
    cache.put((3,), layouts[3])
    assert cache.get((2,)) is None and cache.get((1,)) is layouts[1] and cache.get((3,)) is layouts[3]


def test_the_metadata_counts_by_its_items_not_their_order(osora: Adapter, tiny_factors: BaseFactors,
                                                          layout_checks: list[int]) -> None:
    good = adapter_to_bytes(osora)
    n = int.from_bytes(good[:8], "little")
    raw = good[8 : 8 + n].decode()
    assert raw.startswith('{"__metadata__":')  # where safetensors writes it, its keys in no fixed order
    meta, end = json.JSONDecoder().raw_decode(raw, len('{"__metadata__":'))
    reordered = json.dumps(dict(reversed(list(meta.items()))), separators=(",", ":"))
    load_adapter(good, tiny_factors)
    load_adapter(join(('{"__metadata__":' + reordered + raw[end:]).encode(), good[8 + n :]), tiny_factors)
    assert len(layout_checks) == 1
    # a key given twice is still refused, not read as the header just accepted
    twice = reordered[:-1] + ',"method":"osora"}'
    refused(join(('{"__metadata__":' + twice + raw[end:]).encode(), good[8 + n :]), tiny_factors, "bad_header",
            "duplicate key 'method'")
