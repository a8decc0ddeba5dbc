"""The CUDA path (torch ops on the GPU, no CPU kernels): mixed batches stay exact there too.

These run only where a GPU is visible (`bench/gpu_check.sh` runs them on a lent one); elsewhere they are
reported as skipped, not passed. The reference is each adapter merged into the base on the CPU, in float32.
"""
from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from adapters_store.disk import DiskStore
from adapters_store.format import adapter_to_bytes
from adapters_store.records import record_for
from service.engine import Engine, EngineConfig, SamplingParams
from svd_adapters import gpu_kernels
from svd_adapters.base_model import BaseModel
from svd_adapters.runner import BatchedRunner
from test_engine import adapters, assert_decode_matches, merged_model, reference_greedy  # noqa: F401  (adapters: fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = 1e-4  # the bound for fp32 logits


@pytest.fixture(scope="module")
def gpu_base(tiny_base) -> BaseModel:
    return BaseModel(model=copy.deepcopy(tiny_base.model).to("cuda"), tokenizer=tiny_base.tokenizer,
                     name=tiny_base.name, cache_dir=tiny_base.cache_dir)


@pytest.mark.parametrize("graphs,kernel,fused", [(True, True, False), (False, True, False), (False, False, False),
                                                (True, True, True)],
                         ids=["graphs-triton", "eager-triton", "eager-torch-ops", "graphs-fused-decode"])
def test_gpu_mixed_batch_logits_match_merged_reference(gpu_base, tiny_base, tiny_factors, adapters, graphs, kernel,
                                                       fused, monkeypatch):
    calls, fused_calls = [], []
    real, real_fused = gpu_kernels.core_delta, gpu_kernels.linear_core
    monkeypatch.setattr(gpu_kernels, "core_delta", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    monkeypatch.setattr(gpu_kernels, "linear_core", lambda *a: (fused_calls.append(1), real_fused(*a))[1])
    monkeypatch.setenv("SVDSERVE_GPU_FUSED_DECODE", "1" if fused else "0")
    monkeypatch.setitem(gpu_kernels._state, "force", None if kernel else False)
    runner = BatchedRunner(gpu_base, tiny_factors, max_rank=8, max_batch=16, max_seq_len=64, core_slots=8, lr_slots=8,
                           cuda_graphs=graphs)
    assert runner.device.type == "cuda" and (runner.graphs is not None) == graphs
    cs, ls = runner.place(list(adapters.values()), tiny_factors)
    row_ids = list(adapters) + [None, None]
    cs, ls = cs + [0, 0], ls + [0, 0]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (int(n),), generator=gen).tolist() for n in torch.randint(3, 12, (len(row_ids),), generator=gen)]
    logits = runner.prefill(prompts, list(range(len(row_ids))), cs, ls, all_logits=True).cpu()
    refs = [merged_model(tiny_base, tiny_factors, adapters.get(a)) for a in row_ids]
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = refs[i](torch.tensor([p])).logits[0]
        assert (logits[i, : len(p)] - ref).abs().max().item() <= TOL, f"prefill row {i} ({row_ids[i]})"
    assert_decode_matches(runner, logits, prompts, refs, runner.mapping(cs, ls), steps=3, device="cuda", tol=TOL)
    if graphs:  # the steps above were replays: 10 rows padded to 16, one bucket
        assert [k[0] for k in runner.graphs.graphs] == [16]
    assert bool(calls) == kernel  # the path under test took the core deltas
    assert bool(fused_calls) == fused  # and with the fused decode, its decode steps (captured in the graph)


def test_gpu_engine_greedy_matches_solo_reference(gpu_base, tiny_base, tiny_factors, adapters, tmp_path):
    store = DiskStore(tmp_path / "store")
    for aid, a in adapters.items():
        blob = adapter_to_bytes(a)
        store.put(record_for(a, blob, aid), blob)
    eng = Engine(gpu_base, tiny_factors, store, EngineConfig(max_batch=6, max_rank=8, max_seq_len=160, core_slots=4,
                                                             lr_slots=3, device="cuda"))
    eng.start()
    try:
        ids = list(adapters) + [None, None]
        prompts = [eng.encode_prompt(f"question {i}: what is {i} + {i}?") for i in range(len(ids))]
        max_new = [6 + (i % 5) * 3 for i in range(len(ids))]

        async def run():
            async def one(i):
                while eng.counters["steps"] < (i % 4) * 3:  # join a running batch at different steps
                    await asyncio.sleep(0.001)
                return await eng.generate(prompts[i], ids[i], SamplingParams(max_tokens=max_new[i]))

            return await asyncio.gather(*(one(i) for i in range(len(ids))))

        results = asyncio.run(run())
    finally:
        eng.shutdown(drain=False)
    for i, res in enumerate(results):
        ref = reference_greedy(tiny_base, tiny_factors, adapters.get(ids[i]) if ids[i] else None, prompts[i],
                               max_new[i], eng.eos_ids)
        assert res.token_ids == ref, f"request {i} ({ids[i]}) differs from its solo reference"
    assert len(eng.runner.graphs.graphs) > 1  # the engine decoded through graphs, in several buckets


def test_gpu_prefix_cache_continues_prompts_as_computed_whole(gpu_base, tiny_base, tiny_factors, adapters, tmp_path):
    """The prefix path on the GPU (cache blocks copied on the device, the rest prefilled with a masked attention
    over the row, then CUDA-graph decode): each adapter's repeated and extended prompts take their prefix from
    the cache and still generate their solo reference."""
    store = DiskStore(tmp_path / "store")
    for aid, a in adapters.items():
        blob = adapter_to_bytes(a)
        store.put(record_for(a, blob, aid), blob)
    eng = Engine(gpu_base, tiny_factors, store, EngineConfig(max_batch=4, max_rank=8, max_seq_len=200, core_slots=4,
                                                             lr_slots=3, device="cuda", prefix_block_tokens=8))
    eng.start()
    try:
        system = "Answer in one short sentence, and be kind."
        ids = list(adapters) + [None]
        for aid in ids:
            first = eng.encode_prompt(messages=[{"role": "system", "content": system},
                                                {"role": "user", "content": "what is 2 + 2?"}])
            res = [asyncio.run(eng.generate(first, aid, SamplingParams(max_tokens=8)))]
            follow = first + res[0].token_ids[:-1] + eng.encode_prompt("and 3 + 3?", raw=True)
            for prompt in (first, follow):
                res.append(asyncio.run(eng.generate(prompt, aid, SamplingParams(max_tokens=8))))
            assert res[0].cached_tokens == 0 and res[1].cached_tokens > 0 and res[2].cached_tokens > 0, aid
            adapter = adapters[aid] if aid else None
            want = reference_greedy(tiny_base, tiny_factors, adapter, first, 8, eng.eos_ids)
            assert res[0].token_ids == res[1].token_ids == want, aid
            assert res[2].token_ids == reference_greedy(tiny_base, tiny_factors, adapter, follow, 8, eng.eos_ids), aid
    finally:
        eng.shutdown(drain=False)


def test_gpu_chunked_prefill_beside_graph_decode_steps(gpu_base, tiny_base, tiny_factors, adapters, tmp_path):
    """A long prompt prefilled in chunks in the last row while three rows decode from CUDA graphs: their bucket of
    four rows pads into that row (a padded row writes only the last cache position, which no prompt reaches), and
    every request still generates its solo reference."""
    from test_chunked_prefill import long_prompt_during_decode, tokens

    store, versions = DiskStore(tmp_path / "store"), {}
    for aid, a in adapters.items():
        blob = adapter_to_bytes(a)
        record = record_for(a, blob, aid)
        store.put(record, blob)
        versions[aid] = record.sha256
    eng = Engine(gpu_base, tiny_factors, store, EngineConfig(max_batch=4, max_rank=8, max_seq_len=160, core_slots=8,
                                                             lr_slots=4, device="cuda", prefill_chunk_tokens=16))
    eng.start()
    ids = list(adapters)
    try:
        running = [(tokens(9, 1), ids[0]), (tokens(12, 2), None), (tokens(7, 3), ids[2])]
        prompt = tokens(75, 4)
        long, tails = asyncio.run(long_prompt_during_decode(eng, versions, running, prompt, ids[3]))
        assert eng.stats()["prefilling_in_chunks"] == 0
    finally:
        eng.shutdown(drain=False)
    assert long.token_ids == reference_greedy(tiny_base, tiny_factors, adapters[ids[3]], prompt, 6, eng.eos_ids)
    for (p, aid), tail in zip(running, tails):
        assert tail.token_ids == reference_greedy(tiny_base, tiny_factors, adapters.get(aid), p, 40, set())
