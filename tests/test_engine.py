"""Mixed-adapter batches are exact: logits and greedy generations equal each adapter alone with merged weights."""
from __future__ import annotations

import asyncio
import json
import re
import copy
import threading

import pytest
import torch

from _reliability import put_adapters, wait_until
from adapters_store.disk import DiskStore
from service.engine import AdapterNotFound, AdapterUnavailable, Engine, EngineConfig, EngineError, InvalidRequest, SamplingParams, TextDelta
from svd_adapters import cpu_kernels
from svd_adapters.adapter import Adapter, random_adapter
from svd_adapters.inject import merge_into
from svd_adapters.runner import BatchedRunner

# (method, rank): every method, several ranks, within max_rank 8 (LoRA up to 2·8)
MIX = [("osora", 8), ("loraxs", 4), ("sorsa", 6), ("lora", 8), ("osora", 3), ("loraxs", 8), ("lora", 16), ("sorsa", 2)]


@pytest.fixture(scope="module")
def adapters(tiny_base, tiny_factors) -> dict[str, Adapter]:
    return {f"{m}-r{r}-{i}": random_adapter(m, r, tiny_factors, tiny_base.name, seed=100 + i) for i, (m, r) in enumerate(MIX)}


def merged_model(base, factors, adapter: Adapter | None):
    model = copy.deepcopy(base.model)
    if adapter is not None:
        merge_into(model, adapter, factors)
    return model


def assert_decode_matches(runner, logits, prompts, refs, mp, steps: int, device: str = "cpu", tol: float = 1e-4) -> None:
    """Greedy decode steps after a prefill (`logits`: all positions), every row at its own position: each row's
    logits against its merged reference model (`refs`, on the CPU)."""
    seqs = [list(p) for p in prompts]
    last = logits[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])].cpu()
    for _ in range(steps):
        nxt = last.argmax(-1)
        for i in range(len(seqs)):
            seqs[i].append(int(nxt[i]))
        last = runner.decode(nxt.to(device), torch.tensor([len(s) - 1 for s in seqs], device=device), mp).cpu()
        for i, s in enumerate(seqs):
            with torch.no_grad():
                ref = refs[i](torch.tensor([s])).logits[0, -1]
            assert (last[i] - ref).abs().max().item() <= tol, f"decode row {i}"


@pytest.mark.parametrize("path", ["cpu-kernels", "cpu-kernels-torch-gemm", "pytorch-path"])
@pytest.mark.parametrize("low_rank_only", [False, True], ids=["all-methods", "sorsa-lora-only"])
def test_runner_mixed_batch_logits_match_merged_reference(tiny_base, tiny_factors, adapters, path, low_rank_only,
                                                          monkeypatch):
    """Every method, several ranks and base rows in one batch (or only SORSA / LoRA rows and base rows: the shared
    projections are then computed for SORSA's subtraction alone) against merged references, prefill and decode;
    through the CPU kernels (every decode GEMM the kernel's own, or torch's as calibration picks on an AMX CPU in
    bfloat16) or through PyTorch ops alone."""
    assert cpu_kernels.available()
    fused = path != "pytorch-path"
    monkeypatch.setitem(cpu_kernels._state, "force", True if path == "cpu-kernels" else None if fused else False)
    if path == "cpu-kernels-torch-gemm":
        monkeypatch.setattr(cpu_kernels, "uses_kernel", lambda x, W: False)
    calls, blas, scaled = [], [], []
    for name in ("skinny_linear", "core_delta", "core_linear", "lowrank_delta"):
        kernel = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _k=kernel, _n=name, **kw: (calls.append(_n), _k(*a, **kw))[1])
    real_linear = cpu_kernels.core_linear
    monkeypatch.setattr(cpu_kernels, "core_linear", lambda *a, **kw: (blas.append(kw.get("blas")),
                                                                      scaled.append(kw.get("scaled")),
                                                                      real_linear(*a, **kw))[2])
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=16, max_seq_len=64, core_slots=8, lr_slots=8)
    chosen = {k: a for k, a in adapters.items() if not low_rank_only or a.method in ("sorsa", "lora")}
    cs, ls = runner.place(list(chosen.values()), tiny_factors)
    assert runner.scaled_slots == {c for c, a in zip(cs, chosen.values()) if a.method == "osora"}
    assert runner.lr_sub_slots == {l for l, a in zip(ls, chosen.values()) if a.method == "sorsa"}
    # OSoRA's cores are diagonal (the CPU decode kernel reads their diagonals), LoRA-XS's are not
    for pools in runner.pools.values():
        assert {c for c in cs if c and pools.diagonal[c]} == {c for c, a in zip(cs, chosen.values()) if a.method == "osora"}
    row_ids = list(chosen) + [None, None]  # plus two base rows
    cs, ls = cs + [0, 0], ls + [0, 0]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (int(n),), generator=gen).tolist() for n in torch.randint(3, 12, (len(row_ids),), generator=gen)]
    logits = runner.prefill(prompts, list(range(len(row_ids))), cs, ls, all_logits=True)
    refs = [merged_model(tiny_base, tiny_factors, adapters.get(a)) for a in row_ids]
    worst = 0.0
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = refs[i](torch.tensor([p])).logits[0]
        worst = max(worst, (logits[i, : len(p)] - ref).abs().max().item())
    assert worst <= 1e-4
    assert_decode_matches(runner, logits, prompts, refs, runner.mapping(cs, ls), steps=2)
    # the decode steps above went through the path under test (with core rows: each group's GEMM and core delta in
    # one call, core_linear; the prefill's core delta after its GEMM, core_delta); the kernels read the slot pools,
    # so the per-row buffers the PyTorch path copies adapters into were never made
    gemm = {"skinny_linear"} if path == "cpu-kernels" else set()
    assert set(calls) == (gemm | {"lowrank_delta"} | ({"core_delta", "core_linear"} if not low_rank_only else set())
                          if fused else set())
    assert set(blas) == ({path == "cpu-kernels-torch-gemm"} if fused and not low_rank_only else set())
    # the kernel was told which rows are OSoRA's (the others, LoRA-XS's, take the unscaled arithmetic; base and
    # low-rank rows read slot 0 and get no core delta)
    osora_rows = [a is not None and adapters[a].method == "osora" for a in row_ids]
    assert all(torch.equal(f, torch.tensor(osora_rows)) for f in scaled)
    assert (runner._row_keys is None) == (fused or low_rank_only)  # row buffers hold core adapters only
    # the adapters really change the output (the comparison above is not vacuous)
    base_row = refs[-1](torch.tensor([prompts[0]])).logits[0]
    assert (logits[0, : len(prompts[0])] - base_row).abs().max().item() > 1e-3


def test_a_core_slot_rewritten_with_another_method_is_served_as_its_new_adapter(tiny_base, tiny_factors, adapters):
    """The CPU decode kernel takes a row unscaled unless its slot holds an output-scaling (OSoRA) adapter: a slot
    that held OSoRA and now holds LoRA-XS (the device cache evicts and reuses slots) is served as LoRA-XS, and the
    reverse, beside another OSoRA row and a base row, each row against its merged reference."""
    assert cpu_kernels.available()
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=4, max_seq_len=64, core_slots=4, lr_slots=2)
    osora, loraxs, other = adapters["osora-r8-0"], adapters["loraxs-r8-5"], adapters["osora-r3-4"]
    runner.place([osora, loraxs, other], tiny_factors)  # slots 1, 2, 3
    runner.write_core_slot(1, loraxs.terms(tiny_factors))  # evicted and reused, both ways
    runner.write_core_slot(2, osora.terms(tiny_factors))
    assert runner.scaled_slots == {2, 3}
    cs, ls = [1, 2, 3, 0], [0] * 4
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (5, 9, 7, 4)]
    logits = runner.prefill(prompts, list(range(4)), cs, ls, all_logits=True)
    refs = [merged_model(tiny_base, tiny_factors, a) for a in (loraxs, osora, other, None)]
    mp = runner.mapping(cs, ls)
    assert mp.core_scaled.tolist() == [False, True, True, False]
    assert_decode_matches(runner, logits, prompts, refs, mp, steps=2)


def test_prefill_projections_of_narrow_members_come_from_their_outputs(tiny_base, tiny_factors):
    """At prefill k and v, and down (narrower than their input) can take h = (U_rᵀ y) / σ_r from their own base
    outputs instead of a GEMM over V_rᵀ: every plan a group offers (calibration picks one per CPU) gives the y and h
    of x · W_augᵀ, to float rounding (the merged-reference tests check the logits)."""
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=4, max_seq_len=64, core_slots=2, lr_slots=2)
    groups = runner.layers[0].groups
    assert {name: g.v_members for name, g in groups.items()} == {"qkv": 1, "o": 1, "gate_up": 2, "down": 0}
    assert {name: sorted(g.prefill_plans()) for name, g in groups.items()} == {
        "qkv": ["one GEMM", "one GEMM, narrow h from outputs", "two GEMMs", "two GEMMs, narrow h from outputs"],
        "o": ["one GEMM", "two GEMMs"], "gate_up": ["one GEMM", "two GEMMs"],
        "down": ["GEMM over W, narrow h from outputs", "one GEMM", "two GEMMs"]}
    assert all(cpu_kernels.prefill_plan(g.plan_key) in g.prefill_plans() for g in groups.values())  # calibrated
    gen = torch.Generator().manual_seed(0)
    for name, g in groups.items():
        x = torch.randn(cpu_kernels.SKINNY_MAX_ROWS + 36, g.W_aug.shape[1], generator=gen)  # a prefill's rows
        want = x.double() @ g.W_aug.double().T
        for plan, project in list(g.prefill_plans().items()) + [("chosen", g.project)]:
            y, h = project(x)
            assert y.shape == (x.shape[0], g.M) and h.shape == (x.shape[0], g.k * g.R)
            assert (y.double() - want[:, : g.M]).abs().max() <= 1e-5 * want[:, : g.M].abs().max(), (name, plan)
            assert (h.double() - want[:, g.M :]).abs().max() <= 1e-5 * want[:, g.M :].abs().max(), (name, plan)


@pytest.mark.parametrize("plan", ["one GEMM", "two GEMMs, narrow h from outputs"], ids=["one-gemm", "two-gemms-narrow"])
@pytest.mark.parametrize("mix", ["osora-loraxs-base-rows", "all-methods-base-rows", "sorsa-lora-base-rows", "base-only"])
def test_prefill_fuses_the_gated_activation_and_still_matches_merged_reference(tiny_base, tiny_factors, adapters,
                                                                              mix, plan, monkeypatch):
    """A prefill of more than 64 tokens applies silu(gate)·up inside the kernels: with core rows fused into the
    gate/up core delta (low-rank rows' delta added first), else (and for base-only batches) in one pass after the
    deltas; the logits stay the merged reference's, whether the projections come from one GEMM over [W; V_rᵀ] or
    from two GEMMs and the narrow members' outputs (calibration picks a plan per CPU)."""
    assert cpu_kernels.available() and tiny_base.model.config.hidden_act == "silu"
    monkeypatch.setattr(cpu_kernels, "prefill_plan", lambda key: plan)  # down has no "two GEMMs, narrow": its default
    used = []
    for name in ("core_delta", "gated_silu", "lowrank_delta"):
        kernel = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _k=kernel, _n=name, **kw: (
            used.append(_n if kw.get("out") is None and _n != "gated_silu" else _n + "+act"), _k(*a, **kw))[1])
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=12, max_seq_len=32, core_slots=8, lr_slots=8)
    methods = {"osora-loraxs-base-rows": ("osora", "loraxs"), "all-methods-base-rows": ("osora", "loraxs", "sorsa", "lora"),
               "sorsa-lora-base-rows": ("sorsa", "lora"), "base-only": ()}[mix]
    ids = [aid for aid, a in adapters.items() if a.method in methods]
    cs, ls = runner.place([adapters[a] for a in ids], tiny_factors)
    rows = ids + [None] * (2 if ids else 6)  # base rows
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 200, (int(n),), generator=gen).tolist() for n in torch.randint(14, 20, (len(rows),), generator=gen)]
    assert len(rows) * max(map(len, prompts)) > cpu_kernels.SKINNY_MAX_ROWS
    pad = [0] * (len(rows) - len(ids))
    logits = runner.prefill(prompts, list(range(len(rows))), cs + pad, ls + pad, all_logits=True)
    layers = len(runner.layers)
    expect = {"osora-loraxs-base-rows": "core_delta+act", "all-methods-base-rows": "core_delta+act",
              "sorsa-lora-base-rows": "gated_silu+act", "base-only": "gated_silu+act"}
    assert used.count(expect[mix]) == layers
    assert used.count("lowrank_delta") == (4 * layers if "sorsa" in methods else 0)  # every group, once per step
    for i, aid in enumerate(rows):
        with torch.no_grad():
            ref = merged_model(tiny_base, tiny_factors, adapters.get(aid)).eval()(torch.tensor([prompts[i]])).logits[0]
        assert (logits[i, : len(prompts[i])] - ref).abs().max().item() <= 1e-4


@pytest.fixture()
def engine(tiny_base, tiny_factors, adapters, tmp_path):
    store = DiskStore(tmp_path / "store")
    put_adapters(store, adapters)
    eng = Engine(tiny_base, tiny_factors, store, EngineConfig(max_batch=6, max_rank=8, max_seq_len=160, core_slots=4, lr_slots=3))
    eng.start()
    yield eng
    eng.shutdown(drain=False)


def reference_greedy(base, factors, adapter, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
    model = merged_model(base, factors, adapter)
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            tok = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if tok in eos:
                break
            out.append(tok)
            ids.append(tok)
    return out


def test_engine_greedy_matches_solo_reference_with_staggered_arrivals(engine, tiny_base, tiny_factors, adapters):
    """More requests than rows and slots: they join at different steps, adapters get evicted and reloaded."""
    ids = list(adapters) + [None] * 2 + list(adapters)[:3]
    prompts = [engine.encode_prompt(f"question {i}: what is {i} + {i}?") for i in range(len(ids))]
    max_new = [6 + (i % 5) * 3 for i in range(len(ids))]

    async def run():
        async def one(i, delay_steps):
            # wait until the engine has run some steps, so requests join a running batch
            while engine.counters["steps"] < delay_steps:
                await asyncio.sleep(0.001)
            return await engine.generate(prompts[i], ids[i], SamplingParams(max_tokens=max_new[i]))

        return await asyncio.gather(*(one(i, (i % 4) * 3) for i in range(len(ids))))

    results = asyncio.run(run())
    for i, res in enumerate(results):
        ref = reference_greedy(tiny_base, tiny_factors, adapters.get(ids[i]) if ids[i] else None, prompts[i], max_new[i], engine.eos_ids)
        assert res.token_ids == ref, f"request {i} ({ids[i]}) differs from its solo reference"
        assert res.completion_tokens == len(ref)
        assert res.finish_reason == ("length" if len(ref) == max_new[i] else "stop")
    assert engine.stats()["cache_evictions"] > 0  # 3 core + 2 low-rank slots for 8 adapters: the LRU really worked
    wait_until(lambda: engine.stats()["active"] == 0 and engine.stats()["waiting"] == 0, 5, what="the batch to empty")


def test_engine_sampling_is_seeded_and_stop_strings_cut(engine):
    prompt = engine.encode_prompt("tell me a story")

    async def run(params):
        return await engine.generate(prompt, None, params)

    a = asyncio.run(run(SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)))
    b = asyncio.run(run(SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)))
    assert a.token_ids == b.token_ids
    full = asyncio.run(run(SamplingParams(max_tokens=20)))
    if len(full.text) > 4:
        stop = full.text[2:4]
        cut = asyncio.run(run(SamplingParams(max_tokens=20, stop=[stop])))
        assert cut.finish_reason == "stop"
        assert cut.text == full.text[: full.text.find(stop)]
        assert stop not in cut.text


def test_engine_errors(engine):
    prompt = engine.encode_prompt("hi")

    async def gen(aid, params):
        return await engine.generate(prompt, aid, params)

    with pytest.raises(AdapterNotFound):
        asyncio.run(gen("no-such-adapter", SamplingParams(max_tokens=3)))
    with pytest.raises(InvalidRequest):
        asyncio.run(gen(None, SamplingParams(max_tokens=1000)))


def test_a_version_replaced_before_its_load_is_refused_not_served(engine, adapters):
    """The API passes the version (sha256) it authorised; a load that finds other contents stored under the id
    fails with 'replaced ... retry' (503) instead of serving weights the caller did not ask for."""
    aid = next(iter(adapters))
    version = engine.store.get_record(aid).sha256
    prompt = engine.encode_prompt("hi")

    async def gen(v):
        return await engine.generate(prompt, aid, SamplingParams(max_tokens=2), v)

    assert asyncio.run(gen(version)).finish_reason in ("length", "stop")
    with pytest.raises(AdapterUnavailable, match="replaced while it was loading"):
        asyncio.run(gen("0" * 64))


def test_streaming_yields_deltas_that_add_up(engine, adapters):
    aid = next(iter(adapters))
    prompt = engine.encode_prompt("stream please")

    async def run(params):
        parts, final = [], None
        async for item in engine.stream(prompt, aid, params):
            if isinstance(item, TextDelta):
                parts.append(item)
            else:
                final = item
        return parts, final

    parts, final = asyncio.run(run(SamplingParams(max_tokens=10)))
    assert "".join(p.text for p in parts) == final.text
    assert final.completion_tokens > 0 and final.logprobs is None and not any(p.logprobs for p in parts)
    # with logprobs, the deltas carry every generated token's entry once, in order
    parts, final = asyncio.run(run(SamplingParams(max_tokens=10, logprobs=3)))
    streamed = [lp for p in parts for lp in p.logprobs]
    assert streamed == final.logprobs and [lp.token for lp in streamed] == final.token_ids


def test_logprobs_are_the_models_log_softmax_with_its_top_alternatives(engine, tiny_base):
    prompt = engine.encode_prompt("log probabilities please")
    for params in (SamplingParams(max_tokens=6, logprobs=4),
                   SamplingParams(max_tokens=6, logprobs=0, temperature=1.0, top_k=10, seed=5)):
        res = asyncio.run(engine.generate(prompt, None, params))
        assert len(res.logprobs) == len(res.token_ids) == res.completion_tokens
        ids = list(prompt)
        for entry in res.logprobs:
            with torch.no_grad():
                ref = torch.log_softmax(tiny_base.model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)
            assert abs(entry.logprob - float(ref[entry.token])) < 1e-4
            assert len(entry.top) == params.logprobs
            want = torch.topk(ref, params.logprobs)
            assert [t for t, _ in entry.top] == want.indices.tolist()
            assert all(abs(v - float(w)) < 1e-4 for (_, v), w in zip(entry.top, want.values))
            if params.temperature == 0:
                assert entry.token == entry.top[0][0]  # greedy: the chosen token is the most likely one
            ids.append(entry.token)
    with pytest.raises(InvalidRequest, match="logprobs"):
        asyncio.run(engine.generate(prompt, None, SamplingParams(max_tokens=2, logprobs=21)))


def test_runner_prefill_without_output_scales_matches_merged_reference(tiny_base, tiny_factors, adapters):
    """A batch with LoRA-XS and base rows only takes the unscaled prefill path (one GEMM per member)."""
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=4, max_seq_len=32, core_slots=4, lr_slots=2)
    xs = [aid for aid, a in adapters.items() if a.method == "loraxs"]
    for slot, aid in enumerate(xs, start=1):
        runner.write_core_slot(slot, adapters[aid].terms(tiny_factors))
    prompts = [[5, 9, 77, 3, 12, 40], [8, 8, 100, 31, 2, 19], [60, 61, 62, 63, 64, 65]]
    logits = runner.prefill(prompts, [0, 1, 2], [1, 2, 0], [0, 0, 0], all_logits=True)
    for i, aid in enumerate(xs + [None]):
        with torch.no_grad():
            ref = merged_model(tiny_base, tiny_factors, adapters.get(aid)).eval()(torch.tensor([prompts[i]])).logits[0]
        assert (logits[i] - ref).abs().max().item() <= 1e-4


def test_requests_ending_at_their_first_token_leave_before_the_decode_step(engine, tiny_base):
    """A prefill whose first sampled token is EOS finishes with no output while other rows keep decoding."""
    prompt = engine.encode_prompt("first token ends it")
    with torch.no_grad():
        first = int(tiny_base.model(torch.tensor([prompt])).logits[0, -1].argmax())
    engine.eos_ids.add(first)  # make this prompt's greedy first token an end-of-sequence token
    try:
        async def run():
            other = engine.encode_prompt("a longer answer please")
            return await asyncio.gather(
                engine.generate(other, None, SamplingParams(max_tokens=12)),
                engine.generate(prompt, None, SamplingParams(max_tokens=12)),
                engine.generate(other, None, SamplingParams(max_tokens=5)),
            )

        long, ended, short = asyncio.run(run())
    finally:
        engine.eos_ids.discard(first)
    assert ended.completion_tokens == 0 and ended.finish_reason == "stop" and ended.text == ""
    assert long.finish_reason in ("length", "stop") and short.completion_tokens <= 5
    # answers are sent before the engine retires their rows at the end of the step: wait for that, bounded
    wait_until(lambda: engine.stats()["active"] == 0, 5, what="the batch to empty")


def reference_penalized_greedy(base, prompt: list[int], max_new: int, eos: set[int], params: SamplingParams) -> list[int]:
    """Greedy decoding with the penalties and logit bias applied by hand to the plain model's logits."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            logits = base.model(torch.tensor([ids])).logits[0, -1].double()
            for tok in set(prompt) | set(out):
                r = params.repetition_penalty
                logits[tok] = logits[tok] / r if logits[tok] > 0 else logits[tok] * r
            for tok in set(out):
                logits[tok] -= params.presence_penalty + params.frequency_penalty * out.count(tok)
            for tok, bias in params.logit_bias.items():
                logits[tok] += bias
            tok = int(logits.argmax())
            if tok in eos:
                break
            out.append(tok)
            ids.append(tok)
    return out


def test_engine_penalties_and_logit_bias_match_a_hand_reference_in_a_shared_batch(engine, tiny_base):
    prompt = engine.encode_prompt("repeat after me: la la la la")
    plain = SamplingParams(max_tokens=16)
    cases = [
        SamplingParams(max_tokens=16, repetition_penalty=1.8),
        SamplingParams(max_tokens=16, presence_penalty=1.5, frequency_penalty=0.7),
        SamplingParams(max_tokens=16, logit_bias={41: 6.0, 42: -100.0}, frequency_penalty=0.3),
        SamplingParams(max_tokens=8, logit_bias={77: 100.0}),  # forced: every token is 77
    ]

    async def run():
        return await asyncio.gather(*(engine.generate(prompt, None, p) for p in [plain] + cases))

    results = asyncio.run(run())
    unpenalized = reference_greedy(tiny_base, None, None, prompt, 16, engine.eos_ids)
    assert results[0].token_ids == unpenalized
    for p, res in zip(cases, results[1:]):
        assert res.token_ids == reference_penalized_greedy(tiny_base, prompt, p.max_tokens, engine.eos_ids, p), p
    assert results[-1].token_ids == [77] * 8
    assert results[1].token_ids != unpenalized  # the penalties really changed something


def test_engine_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(engine):
    prompt = engine.encode_prompt("tell me a story")
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=11),
              SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=12),
              SamplingParams(max_tokens=10, temperature=1.2, top_p=0.8, min_p=0.05, seed=13)]

    async def alone(p):
        return await engine.generate(prompt, None, p)

    async def busy():
        others = [engine.generate(engine.encode_prompt(f"noise {i}"), None, SamplingParams(max_tokens=12, temperature=1.0))
                  for i in range(3)]
        return await asyncio.gather(*(engine.generate(prompt, None, p) for p in params), *others)

    solo = [asyncio.run(alone(p)).token_ids for p in params]
    together = asyncio.run(busy())[: len(params)]
    assert [r.token_ids for r in together] == solo
    assert len({tuple(s) for s in solo}) == len(solo)


def test_engine_refuses_logit_bias_outside_the_vocabulary(engine):
    prompt = engine.encode_prompt("hi")
    vocab = engine.base.model.config.vocab_size
    with pytest.raises(InvalidRequest, match=f"outside this model's vocabulary of {vocab}"):
        asyncio.run(engine.generate(prompt, None, SamplingParams(max_tokens=2, logit_bias={vocab: 1.0})))


def test_engine_ignore_eos_min_tokens_and_stop_token_ids(engine, tiny_base):
    prompt = engine.encode_prompt("when do we stop?")
    eos = min(engine.eos_ids)
    free = reference_greedy(tiny_base, None, None, prompt, 12, engine.eos_ids)
    # a token's first occurrence, past the start if the greedy text has one (the tiny model's may repeat one token)
    stop_at = next((i for i, t in enumerate(free) if free.index(t) == i and i >= 1), 0)
    cases = {
        "eos_forced": SamplingParams(max_tokens=6, logit_bias={eos: 100.0}),
        "ignore_eos": SamplingParams(max_tokens=6, logit_bias={eos: 100.0}, ignore_eos=True),
        "min_tokens": SamplingParams(max_tokens=6, logit_bias={eos: 100.0}, min_tokens=3),
        "stop_token": SamplingParams(max_tokens=12, stop_token_ids=[free[stop_at]]),
        "stop_token_after_min": SamplingParams(max_tokens=12, stop_token_ids=[free[stop_at]], min_tokens=stop_at + 1),
    }

    async def run():
        return dict(zip(cases, await asyncio.gather(*(engine.generate(prompt, None, p) for p in cases.values()))))

    got = asyncio.run(run())
    assert got["eos_forced"].completion_tokens == 0 and got["eos_forced"].finish_reason == "stop"
    r = got["ignore_eos"]
    assert r.token_ids == [eos] * 6 and r.finish_reason == "length" and r.text == ""  # EOS is a special token
    r = got["min_tokens"]  # EOS banned for the first 3 tokens, then chosen at once
    assert r.completion_tokens == 3 and r.finish_reason == "stop" and eos not in r.token_ids
    r = got["stop_token"]
    assert r.token_ids == free[:stop_at] and r.finish_reason == "stop"
    # banned before min_tokens: the greedy path moves on to its second choice there, so only check the ban held
    r = got["stop_token_after_min"]
    assert len(r.token_ids) >= stop_at + 1 and free[stop_at] not in r.token_ids[: stop_at + 1]
    with pytest.raises(InvalidRequest, match="min_tokens"):
        asyncio.run(engine.generate(prompt, None, SamplingParams(max_tokens=2, min_tokens=3)))
    with pytest.raises(InvalidRequest, match="stop_token_ids"):
        asyncio.run(engine.generate(prompt, None, SamplingParams(max_tokens=2, stop_token_ids=[10**6])))


def test_structured_output_follows_schemas_regexes_and_choices_in_a_shared_batch(engine, tiny_base):
    from service.structured import Constraint, GrammarError

    prompt = engine.encode_prompt("answer in the required format")
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["answer", "n"], "additionalProperties": False}
    constraints = {
        "schema": Constraint("json_schema", schema),
        "regex": Constraint("regex", r"(yes|no), [0-9]{2}"),
        "choice": Constraint("choice", ["red", "green", "blue"]),
    }
    grammars = {k: engine.grammars.compile(c) for k, c in constraints.items()}

    async def run():
        free = engine.generate(prompt, None, SamplingParams(max_tokens=12))
        bound = [engine.generate(prompt, None, SamplingParams(max_tokens=60, grammar=g, temperature=t, seed=1))
                 for g in grammars.values() for t in (0.0, 1.0)]
        return await asyncio.gather(free, *bound)

    free, *bound = asyncio.run(run())
    # the unconstrained row in the same batch is untouched by the others' masks
    assert free.token_ids == reference_greedy(tiny_base, None, None, prompt, 12, engine.eos_ids)
    for (kind, _), res in zip([(k, t) for k in grammars for t in (0, 1)], bound):
        assert res.finish_reason == "stop", (kind, res.text)
        if kind == "schema":
            value = json.loads(res.text)
            assert set(value) == {"answer", "n"} and value["answer"] in ("yes", "no") and 0 <= value["n"] <= 99
        elif kind == "regex":
            assert re.fullmatch(r"(yes|no), [0-9]{2}", res.text), res.text
        else:
            assert res.text in ("red", "green", "blue")
    for bad in (Constraint("regex", "(unclosed"), Constraint("json_schema", {"type": "nonsense"}), Constraint("choice", [])):
        with pytest.raises(GrammarError):
            engine.grammars.compile(bad)


def test_prompt_logprobs_score_every_prompt_token_under_its_adapter(engine, tiny_base, tiny_factors, adapters):
    aid = next(a for a, ad in adapters.items() if ad.method == "loraxs")
    prompts = [engine.encode_prompt("score this prompt"), engine.encode_prompt("and this other one, longer")]

    async def run():
        return await asyncio.gather(
            engine.generate(prompts[0], None, SamplingParams(max_tokens=2, prompt_logprobs=2)),
            engine.generate(prompts[1], aid, SamplingParams(max_tokens=2, prompt_logprobs=0)),
            engine.generate(prompts[1], None, SamplingParams(max_tokens=4)),  # unscored, in the same prefill
        )

    scored_base, scored_adapter, plain = asyncio.run(run())
    for res, prompt, adapter, k in ((scored_base, prompts[0], None, 2), (scored_adapter, prompts[1], adapters[aid], 0)):
        with torch.no_grad():
            ref = torch.log_softmax(merged_model(tiny_base, tiny_factors, adapter)(torch.tensor([prompt])).logits[0].double(), -1)
        entries = res.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        for t, e in enumerate(entries[1:], start=1):
            assert e.token == prompt[t] and abs(e.logprob - float(ref[t - 1, prompt[t]])) < 1e-4
            assert [i for i, _ in e.top] == torch.topk(ref[t - 1], k).indices.tolist()
    assert plain.prompt_logprobs is None
    assert plain.token_ids == reference_greedy(tiny_base, None, None, prompts[1], 4, engine.eos_ids)


def test_identical_prompts_on_one_adapter_are_prefilled_once(engine, tiny_base, tiny_factors, adapters):
    aid = next(a for a, ad in adapters.items() if ad.method == "osora")
    prompt = engine.encode_prompt("the same question, asked three times")
    other = engine.encode_prompt("a different question")
    before = engine.stats()["prefills_shared"]

    async def run():
        return await asyncio.gather(
            engine.generate(prompt, aid, SamplingParams(max_tokens=8)),
            engine.generate(prompt, aid, SamplingParams(max_tokens=8, prompt_logprobs=1)),
            engine.generate(prompt, None, SamplingParams(max_tokens=8)),  # same text, no adapter: its own prefill
            engine.generate(other, aid, SamplingParams(max_tokens=8)),
            engine.generate(prompt, aid, SamplingParams(max_tokens=8, temperature=1.0, seed=5)),
        )

    same, scored, base_row, different, sampled = asyncio.run(run())
    want = reference_greedy(tiny_base, tiny_factors, adapters[aid], prompt, 8, engine.eos_ids)
    assert same.token_ids == scored.token_ids == want
    assert base_row.token_ids == reference_greedy(tiny_base, None, None, prompt, 8, engine.eos_ids)
    assert different.token_ids == reference_greedy(tiny_base, tiny_factors, adapters[aid], other, 8, engine.eos_ids)
    alone = asyncio.run(engine.generate(prompt, aid, SamplingParams(max_tokens=8, temperature=1.0, seed=5)))
    assert sampled.token_ids == alone.token_ids  # a copied row decodes like its own prefill
    with torch.no_grad():
        ref = torch.log_softmax(merged_model(tiny_base, tiny_factors, adapters[aid])(torch.tensor([prompt])).logits[0].double(), -1)
    assert all(abs(e.logprob - float(ref[t - 1, prompt[t]])) < 1e-4 for t, e in enumerate(scored.prompt_logprobs) if t)
    # all five arrived together on an idle engine: one prefill, the two repeats and the sampled one copied
    assert engine.stats()["prefills_shared"] - before >= 2


def test_a_steps_prompts_are_prefilled_in_calls_by_length(engine, tiny_base, tiny_factors, adapters, monkeypatch):
    """A long prompt admitted with short ones gets a prefill call of its own instead of padding theirs, the step's
    budget counts the tokens so computed (not all five padded to the long one), and every request still generates
    what it does alone (greedy) and scores its prompt as alone."""
    aid = next(a for a, ad in adapters.items() if ad.method == "loraxs")
    asyncio.run(engine.generate(engine.encode_prompt("warm"), aid, SamplingParams(max_tokens=1)))  # resident now
    long = engine.encode_prompt("a long question: " + "abc " * 25, raw=True)
    shorts = [engine.encode_prompt(t, raw=True) for t in ("hi", "what is 2 + 2?", "name a colour")]
    assert len(long) > max(map(len, shorts)) + 64 and len(long) + 6 <= engine.config.max_seq_len
    # room for the five split by length (two long, three short padded to the longest of them), not padded together
    engine.config.max_prefill_tokens = 2 * len(long) + 3 * max(map(len, shorts))
    assert engine.config.max_prefill_tokens < 3 * len(long)
    calls, gate = [], threading.Event()
    real = engine.runner.prefill

    def spy(prompts, *a, **k):
        calls.append(sorted(map(len, prompts)))
        if len(calls) == 1:  # hold the first step until the others wait, so they are admitted in one step
            gate.wait(10)
        return real(prompts, *a, **k)

    monkeypatch.setattr(engine.runner, "prefill", spy)
    requests = [(shorts[0], None, SamplingParams(max_tokens=6)), (long, aid, SamplingParams(max_tokens=6, prompt_logprobs=1)),
                (shorts[1], aid, SamplingParams(max_tokens=6)), (shorts[2], None, SamplingParams(max_tokens=6, prompt_logprobs=0)),
                (long, None, SamplingParams(max_tokens=6))]

    async def run():
        first = asyncio.ensure_future(engine.generate(shorts[0], None, SamplingParams(max_tokens=2)))
        while not calls:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(engine.generate(*r)) for r in requests]
        for _ in range(5000):
            if engine.stats()["waiting"] == len(requests) or any(t.done() for t in rest):
                break
            await asyncio.sleep(0.001)
        gate.set()
        return await asyncio.gather(first, *rest)

    results = asyncio.run(run())[1:]
    step = calls[1:]  # the five admitted together
    assert sorted(n for c in step for n in c) == sorted(len(p) for p, _, _ in requests)
    assert sorted(step) == sorted([[len(long)] * 2, sorted(map(len, shorts))])  # two calls: nothing padded to the long one
    for (prompt, adapter_id, params), res in zip(requests, results):
        adapter = adapters[adapter_id] if adapter_id else None
        assert res.token_ids == reference_greedy(tiny_base, tiny_factors, adapter, prompt, 6, engine.eos_ids)
        if params.prompt_logprobs is not None:
            with torch.no_grad():
                ref = torch.log_softmax(merged_model(tiny_base, tiny_factors, adapter)(torch.tensor([prompt])).logits[0].double(), -1)
            assert len(res.prompt_logprobs) == len(prompt)
            assert all(abs(e.logprob - float(ref[t - 1, prompt[t]])) < 1e-4 for t, e in enumerate(res.prompt_logprobs) if t)


def test_a_failing_prefill_fails_its_requests_and_the_engine_goes_on(engine, adapters, monkeypatch):
    aid = next(iter(adapters))
    prompt = engine.encode_prompt("this prefill breaks")
    real = engine.runner.prefill
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated failure inside the prefill")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "prefill", broken)
    with pytest.raises(EngineError, match="simulated failure"):  # not left waiting forever (bounded here)
        asyncio.run(asyncio.wait_for(engine.generate(prompt, aid, SamplingParams(max_tokens=3)), 30))
    wait_until(lambda: engine.stats()["active"] == 0, 5, what="the failed row to leave")
    assert all(res.refcount == 0 for res in engine.cache.resident.values())  # its adapter slot was released
    again = asyncio.run(engine.generate(prompt, aid, SamplingParams(max_tokens=3)))
    assert again.completion_tokens > 0 or again.finish_reason == "stop"
