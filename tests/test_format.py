"""The adapter file format round-trips every method exactly, through the full validator."""
from __future__ import annotations

import json

import pytest
import torch

from adapters_store.format import FORMAT_NAME, adapter_from_bytes_unchecked, adapter_to_bytes, save_adapter
from adapters_store.validate import load_adapter
from svd_adapters.adapter import Adapter, new_adapter
from svd_adapters.factors import BaseFactors

METHODS = ("osora", "loraxs", "sorsa", "lora")


def trained_like(method: str, factors: BaseFactors, rank: int = 4, **kw) -> Adapter:
    """A fresh adapter with every tensor perturbed, so a round trip cannot pass by re-initialising."""
    adapter = new_adapter(method, rank, factors, base_model="tiny-random-llama", alpha=rank * 2.0, **kw)
    gen = torch.Generator().manual_seed(1)
    for params in adapter.params.values():
        for name, t in params.items():
            params[name] = t + 0.01 * torch.randn(t.shape, generator=gen)
    return adapter


def assert_same(a: Adapter, b: Adapter) -> None:
    assert (a.method, a.rank, a.alpha, a.base_model, a.base_fingerprint, tuple(a.target_modules)) == (
        b.method, b.rank, b.alpha, b.base_model, b.base_fingerprint, tuple(b.target_modules)
    )
    assert a.params.keys() == b.params.keys()
    for module in a.params:
        assert a.params[module].keys() == b.params[module].keys()
        for name in a.params[module]:
            assert b.params[module][name].dtype == torch.float32
            assert torch.equal(a.params[module][name], b.params[module][name]), (module, name)


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_through_validator(method: str, tiny_factors: BaseFactors) -> None:
    adapter = trained_like(method, tiny_factors)
    blob = adapter_to_bytes(adapter)
    loaded = load_adapter(blob, tiny_factors)
    assert_same(adapter, loaded)
    assert loaded.trainable_params() == adapter.trainable_params()
    assert_same(adapter, adapter_from_bytes_unchecked(blob))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_as_float32(dtype: torch.dtype, tiny_factors: BaseFactors) -> None:
    adapter = trained_like("loraxs", tiny_factors)
    blob = adapter_to_bytes(adapter, dtype=dtype)
    n = int.from_bytes(blob[:8], "little")
    assert {e["dtype"] for k, e in json.loads(blob[8 : 8 + n]).items() if k != "__metadata__"} == {
        {torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    }
    loaded = load_adapter(blob, tiny_factors)
    for module, params in adapter.params.items():
        expected = params["R"].to(dtype).to(torch.float32)
        assert torch.equal(loaded.params[module]["R"], expected)


def test_metadata_fields(tiny_factors: BaseFactors) -> None:
    adapter = trained_like("osora", tiny_factors, target_modules=("q_proj", "v_proj"))
    blob = adapter_to_bytes(adapter)
    n = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + n])["__metadata__"]
    assert meta["format"] == FORMAT_NAME and meta["format_version"] == "1"
    assert meta["method"] == "osora" and meta["rank"] == "4" and float(meta["alpha"]) == 8.0
    assert json.loads(meta["target_modules"]) == ["q_proj", "v_proj"]
    assert meta["base_fingerprint"] == tiny_factors.fingerprint
    loaded = load_adapter(blob, tiny_factors)
    assert loaded.target_modules == ("q_proj", "v_proj")
    assert set(loaded.params) == {n for n in tiny_factors.modules if n.endswith(("q_proj", "v_proj"))}


def test_save_adapter_writes_a_loadable_file(tiny_factors: BaseFactors, tmp_path) -> None:
    adapter = trained_like("sorsa", tiny_factors, rank=2)
    path = tmp_path / "sub" / "a.safetensors"
    size = save_adapter(adapter, str(path))
    # Not byte-equal to adapter_to_bytes: safetensors does not keep metadata key order stable between saves.
    assert size == path.stat().st_size
    assert [p.name for p in path.parent.iterdir()] == ["a.safetensors"]  # no temp file left behind
    assert_same(adapter, load_adapter(path.read_bytes(), tiny_factors))
