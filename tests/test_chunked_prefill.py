"""Chunked prefill: a long prompt arriving while other rows decode is prefilled a chunk per step, between their
decode steps, and still computes exactly what its adapter merged into the base computes."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from _reliability import put_adapters, wait_until
from adapters_store.disk import DiskStore
from service.engine import Engine, EngineConfig, SamplingParams
from svd_adapters.adapter import random_adapter
from test_engine import reference_greedy

CHUNK = 16


@pytest.fixture(scope="module")
def adapters(tiny_base, tiny_factors):
    return {aid: random_adapter(m, r, tiny_factors, tiny_base.name, seed=500 + i)
            for i, (aid, m, r) in enumerate((("os", "osora", 8), ("lx", "loraxs", 4), ("lo", "lora", 8)))}


@pytest.fixture
def stored(adapters, tmp_path):
    store = DiskStore(tmp_path / "store")
    return store, put_adapters(store, adapters)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Trace:
    """The runner's prefill and decode calls, in order: ("prefill", [(length, start), ...]) / ("decode", rows)."""

    def __init__(self, runner, decode_sleep: float = 0.0):
        self.calls: list[tuple] = []
        real_prefill, real_decode = runner.prefill, runner.decode

        def prefill(prompts, rows, *a, starts=None, **kw):
            self.calls.append(("prefill", [(len(p), (starts or [0] * len(prompts))[i]) for i, p in enumerate(prompts)]))
            return real_prefill(prompts, rows, *a, starts=starts, **kw)

        def decode(tokens, *a, **kw):
            self.calls.append(("decode", len(tokens)))
            if decode_sleep:
                time.sleep(decode_sleep)  # steps slow enough for a test to act between them
            return real_decode(tokens, *a, **kw)

        runner.prefill, runner.decode = prefill, decode


async def long_prompt_during_decode(eng, versions, running, long_prompt, long_adapter, max_tokens=6):
    """`running` (prompt, adapter) requests decode; once each has its first token, the long prompt arrives."""
    streams = [eng.stream(p, a, SamplingParams(max_tokens=40, ignore_eos=True), versions.get(a)) for p, a in running]
    firsts = [await s.__anext__() for s in streams]  # their first tokens: they are decoding now
    assert all(f for f in firsts)

    async def rest(s):
        async for item in s:
            last = item
        return last

    tails = [asyncio.ensure_future(rest(s)) for s in streams]
    long = await eng.generate(long_prompt, long_adapter, SamplingParams(max_tokens=max_tokens), versions.get(long_adapter))
    return long, [await t for t in tails]


@pytest.mark.parametrize("prefix_cache", [0, 512], ids=["no-prefix-cache", "prefix-cache"])
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny_base, tiny_factors, adapters, stored,
                                                                    prefix_cache):
    store, versions = stored
    eng = Engine(tiny_base, tiny_factors, store, EngineConfig(
        max_batch=4, max_rank=8, max_seq_len=160, core_slots=4, lr_slots=2, prefill_chunk_tokens=CHUNK,
        prefix_cache_tokens=prefix_cache, prefix_block_tokens=8))
    trace = Trace(eng.runner)
    eng.start()
    try:
        running = [(tokens(9, 1), "os"), (tokens(12, 2), None)]
        long_prompt = tokens(75, 3)
        if prefix_cache:  # its first 40 tokens were asked before: cached, so only 35 are computed (in 3 chunks)
            asyncio.run(eng.generate(long_prompt[:40] + tokens(3, 4), "lx", SamplingParams(max_tokens=1), versions["lx"]))
            trace.calls.clear()
        long, tails = asyncio.run(long_prompt_during_decode(eng, versions, running, long_prompt, "lx"))
    finally:
        eng.shutdown(drain=False)

    cached = 40 if prefix_cache else 0
    assert long.cached_tokens == cached
    # exact: the same tokens as the adapter merged into the base, for the long prompt and the rows it ran beside
    assert long.token_ids == reference_greedy(tiny_base, tiny_factors, adapters["lx"], long_prompt, 6, eng.eos_ids)
    for (p, a), tail in zip(running, tails):
        ref = reference_greedy(tiny_base, tiny_factors, adapters.get(a), p, 40, set())
        assert tail.token_ids == ref
    # the long prompt went in chunks of CHUNK tokens, each followed by a decode step of the running rows; its last
    # chunk (the rest) in the prefill that samples its first token
    chunks = [c for c in trace.calls if c[0] == "prefill" and len(c[1]) == 1 and c[1][0] not in ((9, 0), (12, 0))]
    starts = [c[1][0][1] for c in chunks]
    assert starts == list(range(cached, 75, CHUNK)), trace.calls
    assert [c[1][0][0] for c in chunks] == [min(CHUNK, 75 - s) for s in starts]
    at = [trace.calls.index(c) for c in chunks]
    for i, j in zip(at, at[1:]):
        assert ("decode", 2) in trace.calls[i + 1 : j]  # the running rows advanced between two chunks


def test_a_short_prompt_or_an_idle_engine_is_not_chunked(tiny_base, tiny_factors, adapters, stored):
    store, versions = stored
    eng = Engine(tiny_base, tiny_factors, store, EngineConfig(max_batch=4, max_rank=8, max_seq_len=160, core_slots=4,
                                                              lr_slots=2, prefill_chunk_tokens=CHUNK))
    trace = Trace(eng.runner)
    eng.start()
    try:
        long_prompt = tokens(75, 5)
        alone = asyncio.run(eng.generate(long_prompt, "os", SamplingParams(max_tokens=4), versions["os"]))
        assert [c for c in trace.calls if c[0] == "prefill"] == [("prefill", [(75, 0)])]  # nothing to interleave with
        trace.calls.clear()
        short, _ = asyncio.run(long_prompt_during_decode(eng, versions, [(tokens(9, 1), None)], tokens(CHUNK, 6), "os", 4))
        assert ("prefill", [(CHUNK, 0)]) in trace.calls  # at the chunk size: whole
        assert eng.stats()["prefilling_in_chunks"] == 0
    finally:
        eng.shutdown(drain=False)
    assert alone.token_ids == reference_greedy(tiny_base, tiny_factors, adapters["os"], long_prompt, 4, eng.eos_ids)


def test_chunks_off_and_a_cancelled_chunked_prompt_frees_its_row_and_adapter(tiny_base, tiny_factors, adapters, stored):
    store, versions = stored
    off = Engine(tiny_base, tiny_factors, store, EngineConfig(max_batch=4, max_rank=8, max_seq_len=160, core_slots=4,
                                                              lr_slots=2, prefill_chunk_tokens=0))
    trace = Trace(off.runner)
    off.start()
    try:
        asyncio.run(long_prompt_during_decode(off, versions, [(tokens(9, 1), None)], tokens(75, 3), "lx"))
        assert ("prefill", [(75, 0)]) in trace.calls  # off: whole, even beside decoding rows
    finally:
        off.shutdown(drain=False)

    eng = Engine(tiny_base, tiny_factors, store, EngineConfig(max_batch=4, max_rank=8, max_seq_len=160, core_slots=4,
                                                              lr_slots=2, prefill_chunk_tokens=CHUNK))
    Trace(eng.runner, decode_sleep=0.02)
    eng.start()

    async def cancel_midway():
        s = eng.stream(tokens(9, 1), None, SamplingParams(max_tokens=60, ignore_eos=True))
        await s.__anext__()
        task = asyncio.ensure_future(eng.generate(tokens(120, 7), "lo", SamplingParams(max_tokens=4), versions["lo"]))
        for _ in range(500):  # until it is being prefilled in chunks
            if eng._partial is not None and eng._partial.done > 0:
                break
            await asyncio.sleep(0.005)
        assert eng._partial is not None and 0 < eng._partial.done < 120
        task.cancel()  # the client went away
        for _ in range(500):
            if eng._partial is None:
                break
            await asyncio.sleep(0.005)
        async for _ in s:
            pass

    try:
        asyncio.run(cancel_midway())
        wait_until(eng.idle, 5, what="the engine to retire the last row")  # its answer can arrive a step before
        assert eng._partial is None
        (res,) = [r for k, r in eng.cache.resident.items() if k.startswith("lo@")]
        assert res.refcount == 0  # its adapter slot can be evicted again
        # the engine serves on, the same prompt whole and exact
        again = asyncio.run(eng.generate(tokens(120, 7), "lo", SamplingParams(max_tokens=4), versions["lo"]))
        assert again.token_ids == reference_greedy(tiny_base, tiny_factors, adapters["lo"], tokens(120, 7), 4, eng.eos_ids)
    finally:
        eng.shutdown(drain=False)
