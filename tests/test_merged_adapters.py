"""Request-time adapter merges through the engine and the API: a merged request generates exactly what the
merged weights generate, in a batch with plain adapters and base rows; merges are cached like adapters and go
with their sources; bad merges answer 4xx."""
from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from _reliability import put_adapters, wait_until
from adapters_store.disk import DiskStore
from service.engine import AdapterUnavailable, Engine, EngineConfig, SamplingParams
from service.merges import MergeSpec, key_sources
from svd_adapters import merge as merging
from svd_adapters.adapter import random_adapter
from svd_adapters.inject import merge_into, merge_weighted_into
from test_metrics import FlakyStore

SOURCES = {"os8": ("osora", 8), "os8b": ("osora", 8), "os4": ("osora", 4), "lx4": ("loraxs", 4),
           "lx4b": ("loraxs", 4), "lx8": ("loraxs", 8), "so6": ("sorsa", 6), "lo4": ("lora", 4)}


@pytest.fixture(scope="module")
def adapters(tiny_base, tiny_factors):
    return {aid: random_adapter(m, r, tiny_factors, tiny_base.name, seed=700 + i)
            for i, (aid, (m, r)) in enumerate(SOURCES.items())}


def spec_of(versions, ids, weights, strategy="linear", **kw) -> MergeSpec:
    return MergeSpec(tuple((i, versions[i]) for i in ids), tuple(weights), merging.MergeOptions(strategy, **kw))


def weighted_model(base, factors, parts):
    """The base with W + Σ wᵢ ΔWᵢ: a linear merge's reference."""
    model = copy.deepcopy(base.model)
    merge_weighted_into(model, parts, factors)
    return model


def greedy(model, prompt: list[int], max_new: int, eos: set[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and each one's log-probability under `model`."""
    ids, out, lps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(max_new):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            tok = int(logp.argmax())
            if tok in eos:
                break
            out.append(tok)
            lps.append(float(logp[tok]))
            ids.append(tok)
    return out, lps


def make_engine(base, factors, store, **kw) -> Engine:
    cfg = dict(max_batch=6, max_rank=8, max_seq_len=160, core_slots=4, lr_slots=3)
    cfg.update(kw)
    eng = Engine(base, factors, store, EngineConfig(**cfg))
    eng.start()
    return eng


def test_merged_requests_generate_what_the_merged_weights_generate(tiny_base, tiny_factors, adapters, tmp_path):
    """In one batch: a linear merge of every method (a low-rank slot), a linear merge of LoRA-XS adapters of two
    ranks (a core slot), a TIES and a DARE-TIES merge of OSoRA adapters, a plain adapter and a base row; each
    generates the tokens its reference weights generate, the requests arriving at different steps."""
    store = DiskStore(tmp_path / "store")
    versions = put_adapters(store, adapters)
    eng = make_engine(tiny_base, tiny_factors, store)
    mixed = spec_of(versions, ["os8", "lx4", "so6"], [0.6, 1.0, -0.5])
    cores = spec_of(versions, ["lx4", "lx8"], [1.0, 0.5])
    ties = spec_of(versions, ["os8", "os8b"], [1.0, 0.8], "ties", density=0.5)
    dare = spec_of(versions, ["lx4", "lx4b"], [1.0, 1.0], "dare_ties", density=0.5)
    jobs = [(mixed, 0), ("os8", 1), (cores, 2), (None, 3), (ties, 4), (dare, 5)]
    prompts = [eng.encode_prompt(f"merge {i}: {i * 7}") for i in range(len(jobs))]

    async def run():
        async def one(i, target, delay):
            await asyncio.sleep(delay * 0.05)
            version = versions.get(target) if isinstance(target, str) else None
            return await eng.generate(prompts[i], target, SamplingParams(max_tokens=8, logprobs=0), version)
        return await asyncio.gather(*(one(i, t, d) for i, (t, d) in enumerate(jobs)))

    try:
        results = asyncio.run(run())
        placed = {key: res.pool for key, res in eng.cache.resident.items()}
    finally:
        eng.shutdown(drain=False)

    a = adapters
    refs = [
        weighted_model(tiny_base, tiny_factors, [(a["os8"], 0.6), (a["lx4"], 1.0), (a["so6"], -0.5)]),
        weighted_model(tiny_base, tiny_factors, [(a["os8"], 1.0)]),
        weighted_model(tiny_base, tiny_factors, [(a["lx4"], 1.0), (a["lx8"], 0.5)]),
        tiny_base.model,
    ]
    for spec in (ties, dare):
        merged = merging.parameter_merge([a[i] for i, _ in spec.sources], spec.weights, spec.options, tiny_factors,
                                         seed=spec.seed)
        model = copy.deepcopy(tiny_base.model)
        merge_into(model, merged, tiny_factors)
        refs.append(model)
    for i, (res, ref) in enumerate(zip(results, refs)):
        tokens, logprobs = greedy(ref, prompts[i], 8, eng.eos_ids)
        assert res.token_ids == tokens, f"request {i} ({jobs[i][0]})"
        # and the same probabilities: a wrong weight or a dropped term moves these even where tokens agree
        got = [lp.logprob for lp in res.logprobs]
        assert max(abs(a - b) for a, b in zip(got, logprobs)) <= 1e-4, f"request {i}: {got} vs {logprobs}"
    assert results[0].adapter_id == "merge:os8,lx4,so6"
    assert placed[mixed.cache_key] == "lr" and placed[cores.cache_key] == "core" and placed[ties.cache_key] == "core"
    # the merges' tokens differ from their sources' alone (the merge did something)
    alone = greedy(weighted_model(tiny_base, tiny_factors, [(a["os8"], 1.0)]), prompts[0], 8, eng.eos_ids)
    assert (results[0].token_ids, [lp.logprob for lp in results[0].logprobs]) != alone


def test_a_merge_is_cached_and_reuses_its_sources_from_host_memory(tiny_base, tiny_factors, adapters, tmp_path):
    store = FlakyStore(tmp_path / "store")
    versions = put_adapters(store, adapters)
    eng = make_engine(tiny_base, tiny_factors, store)
    fetched: list[str] = []
    real_get = store.get_blob
    store.get_blob = lambda aid, **kw: (fetched.append(aid), real_get(aid, **kw))[1]
    prompt = eng.encode_prompt("cache me")
    p = SamplingParams(max_tokens=3)
    try:
        asyncio.run(eng.generate(prompt, "os8", p, versions["os8"]))  # the source alone first: now in host memory
        assert fetched == ["os8"]
        spec = spec_of(versions, ["os8", "lo4"], [1.0, 1.0])
        first = asyncio.run(eng.generate(prompt, spec, p))
        assert fetched == ["os8", "lo4"]  # os8's terms came from the host tier, lo4 from the store
        loads = eng.counters["adapter_loads"]
        again = asyncio.run(eng.generate(prompt, spec_of(versions, ["os8", "lo4"], [1.0, 1.0]), p))
        assert eng.counters["adapter_loads"] == loads and again.token_ids == first.token_ids  # resident: no load
        asyncio.run(eng.generate(prompt, spec_of(versions, ["os8", "lo4"], [1.0, 0.5]), p))
        assert eng.counters["adapter_loads"] == loads + 1  # other weights: another merge
        assert fetched == ["os8", "lo4"]  # both sources from host memory this time
        # the store down: a resident merge still serves; a merge of a source not held anywhere fails clearly
        store.down = True
        assert asyncio.run(eng.generate(prompt, spec, p)).token_ids == first.token_ids
        with pytest.raises(AdapterUnavailable, match="'so6' is not cached on this replica and the adapter store is unreachable"):
            asyncio.run(eng.generate(prompt, spec_of(versions, ["os8", "so6"], [1.0, 1.0]), p))
    finally:
        eng.shutdown(drain=False)


def test_deleting_a_source_drops_its_merges_from_both_tiers(tiny_base, tiny_factors, adapters, tmp_path):
    store = DiskStore(tmp_path / "store")
    versions = put_adapters(store, adapters)
    eng = make_engine(tiny_base, tiny_factors, store)
    prompt = eng.encode_prompt("drop me")
    p = SamplingParams(max_tokens=2)
    with_lx4 = spec_of(versions, ["lx4", "lx8"], [1.0, 1.0])
    without = spec_of(versions, ["lx8", "os4"], [1.0, 1.0])
    try:
        for spec in (with_lx4, without):
            asyncio.run(eng.generate(prompt, spec, p))
        keys = set(eng.cache.resident)
        assert {with_lx4.cache_key, without.cache_key} <= keys
        eng.evict("lx4")
        wait_until(lambda: with_lx4.cache_key not in eng.cache.resident, 5.0, what="the merge of lx4 evicted")
    finally:
        eng.shutdown(drain=False)
    assert without.cache_key in eng.cache.resident
    held = list(eng.host_tier._entries)
    assert all("lx4" not in key_sources(k) for k in held) and without.cache_key in held


def test_key_sources():
    assert key_sources("ad-1") == ("ad-1",)
    assert key_sources("ad-1@" + "0" * 64) == ("ad-1",)
    spec = MergeSpec((("a", "1" * 64), ("b.c", "2" * 64)), (1.0, 2.0), merging.MergeOptions())
    assert spec.label == "merge:a,b.c" and key_sources(spec.cache_key) == ("a", "b.c")
    # every input to the merge changes its key: versions, weights, strategy, density
    others = [MergeSpec((("a", "3" * 64), ("b.c", "2" * 64)), (1.0, 2.0), merging.MergeOptions()),
              MergeSpec(spec.sources, (1.0, 2.5), merging.MergeOptions()),
              MergeSpec(spec.sources, spec.weights, merging.MergeOptions("ties")),
              MergeSpec(spec.sources, spec.weights, merging.MergeOptions("ties", density=0.5))]
    assert len({spec.cache_key, *(o.cache_key for o in others)}) == 5


# --- HTTP API ------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_generate_with_merged_adapters_over_http(serve, store, make_blob):
    blobs = {"a": make_blob("osora", 4, seed=1), "b": make_blob("loraxs", 4, seed=2), "c": make_blob("sorsa", 8, seed=3),
             "d": make_blob("lora", 8, seed=4), "b2": make_blob("loraxs", 4, seed=5)}
    async with serve(store, lr_slots=3) as client:
        for aid, blob in blobs.items():
            r = await client.post("/adapters", files={"file": (f"{aid}.safetensors", blob)}, data={"adapter_id": aid})
            assert r.status_code == 201, r.text
        body = {"prompt": "hello", "max_tokens": 4,
                "merged_adapters": {"ids": ["a", "b"], "weights": [0.5, 1.5]}}
        r = await client.post("/generate", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["adapter_id"] == "merge:a,b" and r.json()["usage"]["completion_tokens"] >= 1
        same = await client.post("/generate", json=body)
        assert same.json()["text"] == r.json()["text"]
        for strategy in ("ties", "dare_linear", "dare_ties"):
            r = await client.post("/generate", json={"prompt": "hi", "max_tokens": 2, "merged_adapters": {
                "ids": ["b", "b2"], "merge_strategy": strategy, "density": 0.5, "majority_sign_method": "frequency"}})
            assert r.status_code == 200, r.text
            assert r.json()["adapter_id"] == "merge:b,b2"
        r = await client.post("/generate", json={**body, "stream": True})
        assert r.status_code == 200 and "event: done" in r.text and "merge:a,b" in r.text

        async def error(merged, status, code, *words, **extra):
            r = await client.post("/generate", json={"prompt": "x", "max_tokens": 2, "merged_adapters": merged, **extra})
            assert r.status_code == status, r.text
            err = r.json()["error"]
            assert err["code"] == code, err
            for w in words:
                assert w in err["message"], err

        await error({"ids": ["a", "zz"]}, 404, "adapter_not_found", "'zz' in merged_adapters not found")
        await error({"ids": ["a", "b"], "merge_strategy": "ties"}, 400, "invalid_merge",
                    "one method at one rank", "loraxs rank 4, osora rank 4")
        # 4 (OSoRA) + 8 (SORSA) + 8 (LoRA) = 20 rows > 2 × max_rank 8
        await error({"ids": ["a", "c", "d"]}, 400, "invalid_merge", "needs 20 low-rank rows", "--max-rank")
        await error({"ids": ["a", "a"]}, 422, "validation_error", "once")
        await error({"ids": ["a", "b"], "weights": [1.0]}, 422, "validation_error", "one per adapter")
        await error({"ids": []}, 422, "validation_error")
        await error({"ids": ["a"], "density": 0}, 422, "validation_error", "density")
        await error({"ids": ["a"], "merge_strategy": "slerp"}, 422, "validation_error")
        await error({"ids": ["a"]}, 422, "validation_error", "not both", adapter_id="b")
        # the OpenAI routes take it as an extra, with model = the base model's name
        base = client.app.state.base.name
        chat = {"model": base, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0,
                "merged_adapters": {"ids": ["a", "b"], "weights": [0.5, 1.5]}}
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == same.json()["text"]  # the same merge, greedy
        r = await client.post("/v1/completions", json={"model": base, "prompt": "hi", "max_tokens": 2,
                                                        "merged_adapters": {"ids": ["a"]}})
        assert r.status_code == 200, r.text
        r = await client.post("/v1/chat/completions", json={**chat, "model": "a"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
        r = await client.post("/v1/chat/completions", json={**chat, "merged_adapters": {"ids": ["a", "zz"]}})
        assert r.status_code == 404 and "'zz' in merged_adapters" in r.json()["error"]["message"], r.text
        # a deleted source: its merges answer 404 like the source itself
        assert (await client.delete("/adapters/b")).status_code == 204
        await error({"ids": ["a", "b"], "weights": [0.5, 1.5]}, 404, "adapter_not_found", "'b' in merged_adapters")
        metrics = (await client.get("/metrics")).text
        assert 'svdserve_adapter_load_seconds_count{method="merged"}' in metrics
