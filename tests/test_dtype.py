"""Serving in bfloat16 (--dtype): as close to the float32 reference as the merged model run in bfloat16 itself."""
from __future__ import annotations

import asyncio
import copy
import dataclasses

import pytest
import torch

from adapters_store.disk import DiskStore
from adapters_store.format import adapter_to_bytes
from adapters_store.records import record_for
from service.config import Settings
from service.engine import Engine, EngineConfig, SamplingParams, check_dtype
from svd_adapters import cpu_kernels
from svd_adapters.adapter import random_adapter
from svd_adapters.inject import merge_into
from svd_adapters.runner import BatchedRunner

MIX = [("osora", 8), ("loraxs", 8), ("sorsa", 4), ("lora", 8), ("osora", 4)]


@pytest.fixture(scope="module")
def bf16_base(tiny_base):
    return dataclasses.replace(tiny_base, model=copy.deepcopy(tiny_base.model).to(torch.bfloat16))


@pytest.fixture(scope="module")
def adapters(tiny_base, tiny_factors):
    return [random_adapter(m, r, tiny_factors, tiny_base.name, seed=300 + i) for i, (m, r) in enumerate(MIX)]


def merged(model, adapter, factors, dtype):
    m = copy.deepcopy(model).float()
    if adapter is not None:
        merge_into(m, adapter, factors)
    return m.to(dtype)


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "pytorch-path"])
def test_bf16_mixed_batch_is_as_accurate_as_the_merged_model_in_bf16(tiny_base, bf16_base, tiny_factors, adapters,
                                                                     kernels, monkeypatch):
    assert cpu_kernels.available()
    monkeypatch.setitem(cpu_kernels._state, "force", kernels)  # every decode GEMM through the kernels, or none
    calls = []
    fused = cpu_kernels.core_linear
    monkeypatch.setattr(cpu_kernels, "core_linear", lambda *a, **kw: (calls.append(1), fused(*a, **kw))[1])
    runner = BatchedRunner(bf16_base, tiny_factors, max_rank=8, max_batch=8, max_seq_len=32, core_slots=4, lr_slots=4)
    assert runner.pools["qkv"].C.dtype == torch.bfloat16 and runner.k_cache[0].dtype == torch.bfloat16
    cs, ls = runner.place(adapters, tiny_factors)
    rows = adapters + [None]
    cs, ls = cs + [0], ls + [0]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 200, (10,), generator=gen).tolist() for _ in rows]
    logits = runner.prefill(prompts, list(range(len(rows))), cs, ls)
    nxt = torch.randint(3, 200, (len(rows),), generator=gen)
    step = runner.decode(nxt, torch.full((len(rows),), 10), runner.mapping(cs, ls))
    assert bool(calls) == kernels  # the decode step's groups took the fused GEMM + core delta kernel, or not
    for i, a in enumerate(rows):
        ids = torch.tensor([prompts[i] + [int(nxt[i])]])
        with torch.no_grad():
            ref = merged(tiny_base.model, a, tiny_factors, torch.float32)(ids).logits[0].float()
            plain_bf16 = merged(tiny_base.model, a, tiny_factors, torch.bfloat16)(ids).logits[0].float()
        budget = 2 * (plain_bf16 - ref).abs().max().item() + 1e-3
        assert (logits[i].float() - ref[-2]).abs().max().item() <= budget
        assert (step[i].float() - ref[-1]).abs().max().item() <= budget
        if a is not None:  # the adapter moves the logits far more than bf16 rounding does (not a vacuous check)
            with torch.no_grad():
                base_ref = tiny_base.model(ids).logits[0].float()
            assert (ref - base_ref).abs().max().item() > 10 * budget


def test_engine_serves_in_bf16(bf16_base, tiny_factors, adapters, tmp_path):
    store = DiskStore(tmp_path / "store")
    ids = []
    for i, a in enumerate(adapters):
        blob = adapter_to_bytes(a)
        store.put(record_for(a, blob, f"a{i}"), blob)
        ids.append(f"a{i}")
    eng = Engine(bf16_base, tiny_factors, store, EngineConfig(max_batch=4, max_rank=8, max_seq_len=64, core_slots=2,
                                                              lr_slots=2, dtype="bfloat16"))
    eng.start()
    try:
        async def run():
            params = SamplingParams(max_tokens=6)
            return await asyncio.gather(*(eng.generate([5, 6, 7, 8], aid, params) for aid in ids + [None]))

        results = asyncio.run(run())
    finally:
        eng.shutdown(drain=False)
    assert [r.adapter_id for r in results] == ids + [None]
    assert all(r.completion_tokens >= 1 and r.finish_reason in ("stop", "length") for r in results)
    assert len({tuple(r.token_ids) for r in results}) > 1  # adapters really change what is generated


def test_dtype_is_checked_with_a_clear_message(monkeypatch):
    check_dtype("bfloat16", "cpu")
    check_dtype("float16", "cuda")
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        check_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        check_dtype("fp8", "cpu")
    monkeypatch.setenv("SVDSERVE_DTYPE", "bfloat16")
    assert Settings.from_env(device="cpu").dtype == "bfloat16"
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        Settings.from_env(device="cpu", dtype="float16")
