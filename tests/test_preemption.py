"""Preemption by priority: with every row taken, a waiting request of a lower priority value takes the row of the
running request of the highest value, which goes back to the queue and resumes later with exactly the tokens it
would have generated unpaused (its keys and values recomputed, or reloaded from the prefix cache)."""
from __future__ import annotations

import asyncio

import pytest

from _reliability import put_adapters
from adapters_store.disk import DiskStore
from service.engine import Engine, EngineConfig, SamplingParams, TextDelta
from service.metrics import Metrics
from svd_adapters.adapter import random_adapter
from test_chunked_prefill import Trace, tokens


@pytest.fixture(scope="module")
def adapters(tiny_base, tiny_factors):
    return {aid: random_adapter(m, r, tiny_factors, tiny_base.name, seed=800 + i)
            for i, (aid, m, r) in enumerate((("os", "osora", 8), ("lo", "lora", 8)))}


def new_engine(tiny_base, tiny_factors, adapters, tmp_path, **cfg) -> tuple[Engine, dict[str, str], Trace]:
    store = DiskStore(tmp_path / "store")
    versions = put_adapters(store, adapters)
    settings = dict(max_batch=2, max_rank=8, max_seq_len=160, core_slots=4, lr_slots=3, prefix_block_tokens=8)
    settings.update(cfg)
    eng = Engine(tiny_base, tiny_factors, store, EngineConfig(**settings))
    trace = Trace(eng.runner, decode_sleep=0.004)
    eng.start()
    return eng, versions, trace


async def collect(stream) -> tuple[str, object]:
    text, result = "", None
    async for item in stream:
        if isinstance(item, TextDelta):
            text += item.text
        else:
            result = item
    return text, result


def run_alone(eng, versions, prompt, adapter, params):
    return asyncio.run(eng.generate(prompt, adapter, params, versions.get(adapter)))


@pytest.mark.parametrize("prefix_cache", [0, 512], ids=["recomputed", "from-prefix-cache"])
def test_a_lower_value_takes_the_row_of_the_newest_highest_and_it_resumes_exactly(
        tiny_base, tiny_factors, adapters, tmp_path, prefix_cache):
    eng, versions, trace = new_engine(tiny_base, tiny_factors, adapters, tmp_path, prefix_cache_tokens=prefix_cache)
    bulk = [(tokens(30, 1), "os", SamplingParams(max_tokens=40, ignore_eos=True, priority=5)),
            (tokens(25, 2), "lo", SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.8, seed=7, priority=5,
                                                 logprobs=1))]
    urgent = (tokens(12, 3), None, SamplingParams(max_tokens=6, ignore_eos=True, priority=0))

    async def scenario():
        streams = [eng.stream(p, a, sp, versions.get(a)) for p, a, sp in bulk]
        firsts = [await s.__anext__() for s in streams]  # both decoding: every row taken
        while min(len(r.out) for r in eng._active) < 8:
            await asyncio.sleep(0.005)
        tails = [asyncio.ensure_future(collect(s)) for s in streams]
        done = await eng.generate(urgent[0], urgent[1], urgent[2])
        still_running = [not t.done() for t in tails]
        return firsts, [await t for t in tails], done, still_running

    try:
        firsts, tails, done, still_running = asyncio.run(scenario())
        assert eng.counters["preempted"] == 1 and eng.counters["resumed"] == 1
        metrics = Metrics()
        metrics.attach(eng)
        text = metrics.exposition().decode()
        assert "svdserve_preemptions_total 1.0" in text and "svdserve_resumptions_total 1.0" in text
        # alone, unpaused: the same tokens (and the sampled one's same draws: its generator went on where it was)
        alone = [run_alone(eng, versions, p, a, sp) for p, a, sp in bulk]
        urgent_alone = run_alone(eng, versions, *urgent)
    finally:
        eng.shutdown(drain=False)
    assert done.token_ids == urgent_alone.token_ids and done.completion_tokens == 6
    assert all(still_running)  # the urgent one finished first: it did not wait for a 40-token request
    for first, (text, result), ref in zip(firsts, tails, alone):
        assert result.token_ids == ref.token_ids and len(result.token_ids) == 40
        assert first.text + text == ref.text  # the stream paused and went on: no token lost or repeated
    got = [lp.logprob for lp in tails[1][1].logprobs]
    want = [lp.logprob for lp in alone[1].logprobs]
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4
    # the newest of the highest value (the sampled one, submitted second) was the one put back
    # its resume: one prefill of its context (25 prompt tokens and 8+ generated: past every prompt's length)
    resumes = [(n, start) for kind, calls in trace.calls if kind == "prefill" for n, start in calls if n + start > 30]
    assert len(resumes) == 1, trace.calls
    if prefix_cache:  # its context came back from the prefix cache: only the rest (under one block) was computed
        assert resumes[0][1] >= 24 and resumes[0][0] <= 8, resumes
    else:
        assert resumes[0][1] == 0, resumes


def test_equal_priorities_never_preempt(tiny_base, tiny_factors, adapters, tmp_path):
    eng, versions, _ = new_engine(tiny_base, tiny_factors, adapters, tmp_path, prefix_cache_tokens=0)

    async def scenario():
        streams = [eng.stream(tokens(10, i), None, SamplingParams(max_tokens=30, ignore_eos=True)) for i in range(2)]
        for s in streams:
            await s.__anext__()
        tails = [asyncio.ensure_future(collect(s)) for s in streams]
        late = await eng.generate(tokens(10, 5), None, SamplingParams(max_tokens=3, ignore_eos=True))
        return [t.done() for t in tails], late

    try:
        finished_first, late = asyncio.run(scenario())
    finally:
        eng.shutdown(drain=False)
    assert eng.counters["preempted"] == 0 and all(finished_first) and late.completion_tokens == 3


def test_a_lower_value_whose_adapters_pool_is_full_preempts_the_slots_holder(tiny_base, tiny_factors, adapters,
                                                                             tmp_path):
    """One low-rank slot (lr_slots 2), held by a running priority-5 LoRA request, and rows to spare: a priority-0
    request on another LoRA adapter cannot be placed, so the holder is preempted, the slot takes the new adapter,
    and the holder resumes once it is done (its adapter back from host memory) with its unpaused tokens."""
    more = dict(adapters, lo2=random_adapter("lora", 8, tiny_factors, tiny_base.name, seed=899))
    eng, versions, _ = new_engine(tiny_base, tiny_factors, more, tmp_path, max_batch=4, lr_slots=2,
                                  prefix_cache_tokens=0)
    holder = (tokens(20, 4), "lo", SamplingParams(max_tokens=40, ignore_eos=True, priority=5))
    base_row = (tokens(20, 5), None, SamplingParams(max_tokens=40, ignore_eos=True, priority=5))
    urgent = (tokens(10, 6), "lo2", SamplingParams(max_tokens=5, ignore_eos=True, priority=0))

    async def scenario():
        streams = [eng.stream(p, a, sp, versions.get(a)) for p, a, sp in (holder, base_row)]
        for s in streams:
            await s.__anext__()
        tails = [asyncio.ensure_future(collect(s)) for s in streams]
        done = await eng.generate(urgent[0], urgent[1], urgent[2], versions["lo2"])
        return [t.done() for t in tails], [await t for t in tails], done

    try:
        finished_first, tails, done = asyncio.run(scenario())
        preempted = eng.counters["preempted"]
        alone = run_alone(eng, versions, *holder)
        urgent_alone = run_alone(eng, versions, *urgent)
        base_alone = run_alone(eng, versions, *base_row)
    finally:
        eng.shutdown(drain=False)
    assert preempted == 1 and not any(finished_first)  # only the slot's holder went back; the base row ran on
    assert done.token_ids == urgent_alone.token_ids
    assert tails[0][1].token_ids == alone.token_ids and tails[1][1].token_ids == base_alone.token_ids
