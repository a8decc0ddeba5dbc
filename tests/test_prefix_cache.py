"""The prefix cache: prompts that start like an earlier one on the same adapter reuse its keys and values, and
still compute exactly what a whole prefill computes."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from _reliability import wait_until
from adapters_store.disk import DiskStore
from adapters_store.format import adapter_to_bytes
from adapters_store.records import record_for
from service.engine import Engine, EngineConfig, SamplingParams
from service.prefix_cache import PrefixCache
from svd_adapters.adapter import random_adapter
from svd_adapters.runner import BatchedRunner
from test_engine import assert_decode_matches, merged_model, reference_greedy

METHODS = [("osora", 8), ("loraxs", 4), ("sorsa", 6), ("lora", 16)]


@pytest.fixture(scope="module")
def adapters(tiny_base, tiny_factors):
    return {f"{m}-r{r}": random_adapter(m, r, tiny_factors, tiny_base.name, seed=300 + i)
            for i, (m, r) in enumerate(METHODS)}


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prompts_continuing_cached_prefixes_match_each_adapter_merged(tiny_base, tiny_factors, adapters):
    """Rows of every method and a base row prefill their prompts whole; later prompts that extend them (on the same
    adapters, in other rows) copy the cached blocks and compute only the rest, in one call with a prompt that
    starts at 0. Every row's logits, and greedy decode after, equal its adapter merged into the base."""
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=12, max_seq_len=96, core_slots=4, lr_slots=3)
    cache = PrefixCache(runner, capacity_tokens=512, block_tokens=8)
    ads = list(adapters.values())
    core, lr = runner.place(ads, tiny_factors)
    core, lr = core + [0], lr + [0]
    shared = [tokens(n, seed=i) for i, n in enumerate((21, 30, 16, 40, 27))]
    first = runner.prefill(shared, list(range(5)), core, lr)
    for i, p in enumerate(shared):
        cache.store(runner.adapter_state(core[i], lr[i]), p, i)
    # later prompts: each shared one plus a tail of its own (rows 5..9), and a fresh one from 0 (row 10)
    later = [p + tokens(5 + 3 * i, seed=50 + i) for i, p in enumerate(shared)] + [tokens(13, seed=99)]
    slots_c, slots_l = core + [core[1]], lr + [lr[1]]
    starts = [cache.load(runner.adapter_state(c, l), p, 5 + i) for i, (p, c, l) in enumerate(zip(later, slots_c, slots_l))]
    B = cache.block
    assert starts == [len(p) // B * B for p in shared] + [0]  # whole blocks only (16 is exactly two)
    assert cache.hits == 5 and cache.misses == 1 and cache.reused_tokens == sum(starts)
    rows = list(range(5, 11))
    logits = runner.prefill([p[s:] for p, s in zip(later, starts)], rows, slots_c, slots_l, starts=starts)
    refs = [merged_model(tiny_base, tiny_factors, ads[i] if i < 4 else None) for i in range(5)] + [None]
    refs[5] = refs[1]
    with torch.no_grad():
        for i, p in enumerate(later):
            ref = refs[i](torch.tensor([p])).logits[0, -1]
            assert (logits[i] - ref).abs().max().item() <= 1e-4, f"row {i}"
        for i, p in enumerate(shared):  # the cached rows themselves were not disturbed
            assert (first[i] - refs[i](torch.tensor([p])).logits[0, -1]).abs().max().item() <= 1e-4
    # decode on: rows 5..10 moved to 0..5 (the engine keeps its rows compacted)
    for i, p in enumerate(later):
        runner.move_row(5 + i, i, len(p))
    full = torch.zeros(len(later), max(map(len, later)), logits.shape[-1])
    for i, p in enumerate(later):
        full[i, len(p) - 1] = logits[i]
    assert_decode_matches(runner, full, later, refs, runner.mapping(slots_c, slots_l), steps=3)


def test_a_continued_prompt_may_end_at_the_context_limit_beside_a_longer_one(tiny_base, tiny_factors):
    """Row 0's prompt fills the whole context while row 1's suffix is longer, so row 0 is padded to positions
    past the cache: the pads write nothing, and row 0's last token still sees its own keys."""
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=4, max_seq_len=48, core_slots=2, lr_slots=2)
    full = [tokens(48, seed=7), tokens(30, seed=8)]
    starts = [40, 4]
    runner.prefill([p[:s] for p, s in zip(full, starts)], [0, 1], [0, 0], [0, 0])
    logits = runner.prefill([p[s:] for p, s in zip(full, starts)], [0, 1], [0, 0], [0, 0], starts=starts)
    ref = merged_model(tiny_base, tiny_factors, None)
    with torch.no_grad():
        for i, p in enumerate(full):
            assert (logits[i] - ref(torch.tensor([p])).logits[0, -1]).abs().max().item() <= 1e-4, f"row {i}"
    with pytest.raises(ValueError, match="past max_seq_len"):
        runner.prefill([full[0][40:] + [5]], [0], [0], [0], starts=[40])


def test_blocks_are_keyed_by_adapter_state_and_tokens(tiny_base, tiny_factors, adapters):
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=4, max_seq_len=64, core_slots=3, lr_slots=2)
    cache = PrefixCache(runner, capacity_tokens=256, block_tokens=4)
    ads = list(adapters.values())
    core, lr = runner.place(ads[:2], tiny_factors)
    p = tokens(13, seed=1)
    runner.prefill([p], [0], core[:1], lr[:1])
    state = runner.adapter_state(core[0], lr[0])
    cache.store(state, p, 0)
    assert cache.stats()["prefix_cache_blocks_used"] == 3  # 13 tokens: three whole blocks of 4
    assert cache.load(runner.adapter_state(core[1], lr[1]), p, 1) == 0  # another adapter: nothing
    assert cache.load(runner.adapter_state(0, 0), p, 1) == 0  # no adapter: nothing
    assert cache.load(state, p[:2] + [p[2] + 1] + p[3:], 1) == 0  # differs in the first block
    assert cache.load(state, p[:6] + [p[6] + 1] + p[7:], 1) == 4  # differs in the second: the first still serves
    assert cache.load(state, p[:12], 1) == 8  # 12 tokens: the third block would leave none to compute
    assert cache.load(state, p, 1) == 12
    for kc, vc in zip(runner.k_cache, runner.v_cache):  # row 1 now holds row 0's first 12 positions, exactly
        assert torch.equal(kc[1, :, :12], kc[0, :, :12]) and torch.equal(vc[1, :, :12], vc[0, :, :12])
    # the same adapter written into its slot again (evicted and reloaded, or replaced): a new state, no reuse
    runner.write_core_slot(core[0], ads[0].terms(tiny_factors))
    assert runner.adapter_state(core[0], lr[0]) != state
    assert cache.load(runner.adapter_state(core[0], lr[0]), p, 1) == 0


def test_a_full_cache_evicts_least_recently_used_blocks_and_keeps_prefixes(tiny_base, tiny_factors):
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=4, max_seq_len=64, core_slots=2, lr_slots=2)
    cache = PrefixCache(runner, capacity_tokens=16, block_tokens=4)  # four blocks
    state = runner.adapter_state(0, 0)
    a, b, c = tokens(9, seed=1), tokens(9, seed=2), tokens(30, seed=3)
    runner.prefill([a, b, c], [0, 1, 2], [0] * 3, [0] * 3)
    cache.store(state, a, 0)  # 2 blocks
    cache.store(state, b, 1)  # 2 blocks: full
    assert cache.load(state, a, 3) == 8  # a is now the most recent
    cache.store(state, c, 2)  # 7 whole blocks, the pool holds 4: the first 4 of c, evicting b (the least recent)
    assert cache.evictions == 2 + 2
    assert cache.load(state, b, 3) == 0
    assert cache.load(state, c, 3) == 16
    for kc in runner.k_cache:  # what was loaded is c's own, not blocks that one store call handed around
        assert torch.equal(kc[3, :, :16], kc[2, :, :16])
    # two prompts stored in one call, the second evicting what the first just stored: only the second's blocks
    # are kept, and they hold its own keys and values
    cache.clear()
    cache.store_many([(state, a, 0), (state, c, 2)])
    assert cache.load_many([(state, a, 3), (state, c, 1)]) == [0, 16]
    for kc, vc in zip(runner.k_cache, runner.v_cache):
        assert torch.equal(kc[1, :, :16], kc[2, :, :16]) and torch.equal(vc[1, :, :16], vc[2, :, :16])
    with pytest.raises(ValueError, match="holds no block"):
        PrefixCache(runner, capacity_tokens=3, block_tokens=4)


def test_engine_reuses_a_shared_prefix_per_adapter_and_generates_as_alone(tiny_base, tiny_factors, adapters, tmp_path):
    store = DiskStore(tmp_path / "store")
    for aid, a in adapters.items():
        blob = adapter_to_bytes(a)
        store.put(record_for(a, blob, aid), blob)
    cfg = EngineConfig(max_batch=4, max_rank=8, max_seq_len=200, core_slots=3, lr_slots=2, prefix_block_tokens=8)
    eng = Engine(tiny_base, tiny_factors, store, cfg)
    eng.start()
    try:
        system = "Answer in one short sentence."
        prompts = [eng.encode_prompt(messages=[{"role": "system", "content": system}, {"role": "user", "content": q}])
                   for q in ("what is 2 + 2?", "what is 3 + 5?", "what is 7 - 1?")]
        common = next(i for i, (x, y) in enumerate(zip(prompts[0], prompts[1])) if x != y)
        assert common >= 32
        aid = next(iter(adapters))

        def run(prompt, adapter_id, max_tokens=6, **kw):
            return asyncio.run(eng.generate(prompt, adapter_id, SamplingParams(max_tokens=max_tokens, **kw)))

        first = run(prompts[0], aid)
        second = run(prompts[1], aid)
        other_adapter = run(prompts[2], list(adapters)[1])
        scored = run(prompts[2], aid, prompt_logprobs=0)  # scored prompts are computed whole
        base = run(prompts[1], None)
        assert first.cached_tokens == 0
        assert second.cached_tokens == common // 8 * 8 > 0
        assert other_adapter.cached_tokens == 0 and scored.cached_tokens == 0 and base.cached_tokens == 0
        for res, prompt, adapter_id in ((first, prompts[0], aid), (second, prompts[1], aid),
                                        (other_adapter, prompts[2], list(adapters)[1]), (base, prompts[1], None)):
            adapter = adapters[adapter_id] if adapter_id else None
            assert res.token_ids == reference_greedy(tiny_base, tiny_factors, adapter, prompt, 6, eng.eos_ids)
        # the same prompt again: everything but its last token comes from the cache
        again = run(prompts[1], aid)
        assert again.cached_tokens == (len(prompts[1]) - 1) // 8 * 8 and again.token_ids == second.token_ids
        # a chat's next turn: the last prompt, its answer and a new question. The answer's keys and values were kept
        # when it finished (all but its last token's, which was never fed back)
        answer = run(prompts[1], aid, max_tokens=20)
        assert len(answer.token_ids) == 20
        follow = prompts[1] + answer.token_ids + eng.encode_prompt("and 4 + 4?", raw=True)
        turn = run(follow, aid)
        assert turn.cached_tokens == (len(prompts[1]) + 20 - 1) // 8 * 8 > len(prompts[1]) // 8 * 8
        assert turn.token_ids == reference_greedy(tiny_base, tiny_factors, adapters[aid], follow, 6, eng.eos_ids)
        stats = eng.stats()
        assert stats["prefix_cache_hits"] >= 2 and stats["prefix_cached_tokens"] >= second.cached_tokens + again.cached_tokens
        wait_until(lambda: eng.stats()["active"] == 0, 5, what="the batch to empty")
    finally:
        eng.shutdown(drain=False)
    off = Engine(tiny_base, tiny_factors, store, EngineConfig(max_batch=2, max_rank=8, max_seq_len=200, core_slots=3,
                                                             lr_slots=2, prefix_cache_tokens=0))
    off.start()
    try:
        res = asyncio.run(off.generate(prompts[1], aid, SamplingParams(max_tokens=6)))
        assert off.prefix is None and res.cached_tokens == 0 and res.token_ids == second.token_ids
        assert "prefix_cache_hits" not in off.stats()
    finally:
        off.shutdown(drain=False)


def test_admission_counts_only_what_a_prompt_computes_past_its_cached_prefix(tiny_base, tiny_factors, adapters,
                                                                             tmp_path, monkeypatch):
    """Four prompts that share a long cached system prompt arrive together with a step budget smaller than their
    whole lengths: they are admitted in one step, since each computes only its own question."""
    store = DiskStore(tmp_path / "store")
    aid = next(iter(adapters))
    blob = adapter_to_bytes(adapters[aid])
    store.put(record_for(adapters[aid], blob, aid), blob)
    eng = Engine(tiny_base, tiny_factors, store, EngineConfig(max_batch=8, max_rank=8, max_seq_len=400, core_slots=2,
                                                              lr_slots=2, prefix_block_tokens=8))
    system = "You answer arithmetic questions with one number and nothing else, as briefly as you can. " * 2
    prompts = [eng.encode_prompt(messages=[{"role": "system", "content": system}, {"role": "user", "content": q}])
               for q in ("what is 2 + 2?", "what is 3 + 5?", "what is 7 - 1?", "what is 9 + 9?", "and 1 + 1?")]
    eng.start()
    try:
        asyncio.run(eng.generate(prompts[0], aid, SamplingParams(max_tokens=1)))  # caches the system prompt
        (resident,) = eng.cache.resident.values()  # an OSoRA adapter: a core slot
        state = (*eng.runner.adapter_state(resident.slot, 0), None)  # and no scope (no tenant, no cache_salt)
        cached = [eng.prefix.cached(state, p) for p in prompts[1:]]
        assert min(cached) >= 160
        eng.config.max_prefill_tokens = len(prompts[1]) + 3 * max(len(p) - c for p, c in zip(prompts[1:], cached))
        assert eng.config.max_prefill_tokens < 2 * min(map(len, prompts[1:]))  # whole prompts: one per step
        calls, gate = [], threading.Event()
        real = eng.runner.prefill

        def spy(ps, *a, **k):
            calls.append(len(ps))
            if len(calls) == 1:  # hold the first step until the others wait, so they are admitted in one step
                gate.wait(10)
            return real(ps, *a, **k)

        monkeypatch.setattr(eng.runner, "prefill", spy)

        async def run():
            first = asyncio.ensure_future(eng.generate(prompts[0], None, SamplingParams(max_tokens=2)))
            while not calls:
                await asyncio.sleep(0.001)
            rest = [asyncio.ensure_future(eng.generate(p, aid, SamplingParams(max_tokens=4))) for p in prompts[1:]]
            for _ in range(5000):
                if eng.stats()["waiting"] == len(rest):
                    break
                await asyncio.sleep(0.001)
            gate.set()
            return await asyncio.gather(first, *rest)

        results = asyncio.run(run())[1:]
        assert calls[1:] == [4]  # the four in one prefill call, after the first step's
        for p, c, res in zip(prompts[1:], cached, results):
            assert res.cached_tokens == c
            assert res.token_ids == reference_greedy(tiny_base, tiny_factors, adapters[aid], p, 4, eng.eos_ids)
    finally:
        eng.shutdown(drain=False)


def test_an_adapters_cached_prefixes_outlive_its_eviction_and_not_its_replacement(tiny_base, tiny_factors, adapters,
                                                                                 tmp_path):
    """Keyed by the adapter's content (id@sha256, as the API asks for it), a prefix cached on an adapter serves it
    again after the adapter was evicted and loaded back (its slot rewritten); a re-upload under the same id is
    other weights, and reuses nothing. Greedy tokens equal the adapter's own merged reference throughout."""
    from adapters_store.records import sha256_hex

    store = DiskStore(tmp_path / "store")
    aid, other = list(adapters)[:2]
    blob = adapter_to_bytes(adapters[aid])
    store.put(record_for(adapters[aid], blob, aid), blob)
    eng = Engine(tiny_base, tiny_factors, store, EngineConfig(max_batch=2, max_rank=8, max_seq_len=200, core_slots=3,
                                                              lr_slots=2, prefix_block_tokens=8))
    prompt = eng.encode_prompt(messages=[{"role": "system", "content": "Answer in one short sentence."},
                                         {"role": "user", "content": "what is 2 + 2?"}])
    eng.start()
    try:
        def run(version):
            return asyncio.run(eng.generate(prompt, aid, SamplingParams(max_tokens=6, logprobs=0), version))

        want = reference_greedy(tiny_base, tiny_factors, adapters[aid], prompt, 6, eng.eos_ids)
        first = run(sha256_hex(blob))
        eng.evict(aid)
        wait_until(lambda: not any(k.startswith(aid) for k in eng.cache.resident), 5, what="the eviction")
        loads = eng.stats()["adapter_loads"]
        again = run(sha256_hex(blob))
        assert eng.stats()["adapter_loads"] == loads + 1  # really loaded back
        assert first.cached_tokens == 0 and again.cached_tokens == (len(prompt) - 1) // 8 * 8
        assert first.token_ids == again.token_ids == want
        # and the same distributions at every step, from the cached keys and values as from its own
        assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(first.logprobs, again.logprobs))
        # the same id, other weights
        new = adapters[other]
        new_blob = adapter_to_bytes(new)
        store.put(record_for(new, new_blob, aid), new_blob, overwrite=True)
        replaced = run(sha256_hex(new_blob))
        assert replaced.cached_tokens == 0
        assert any(abs(a.logprob - b.logprob) > 1e-3 for a, b in zip(first.logprobs, replaced.logprobs))
        assert replaced.token_ids == reference_greedy(tiny_base, tiny_factors, new, prompt, 6, eng.eos_ids)
    finally:
        eng.shutdown(drain=False)


def test_identical_prompts_of_two_scopes_in_one_step_keep_their_own_cache_counts(tiny_base, tiny_factors, tmp_path,
                                                                                monkeypatch):
    """Tenant a's prompt is cached; a and b send it again and are admitted in the same step. Identical prompts
    of one scope share a prefill; across scopes they do not, so b reports nothing of a's cache (and still gets
    the same tokens)."""
    eng = Engine(tiny_base, tiny_factors, DiskStore(tmp_path / "store"),
                 EngineConfig(max_batch=4, max_rank=8, max_seq_len=200, core_slots=2, lr_slots=2, prefix_block_tokens=8))
    prompt = eng.encode_prompt("Tell me about the bakery opening hours, please.")
    scoped = {t: SamplingParams(max_tokens=4, prefix_scope=f"{t}\x00") for t in ("a", "b")}
    eng.start()
    try:
        assert asyncio.run(eng.generate(prompt, None, scoped["a"])).cached_tokens == 0
        calls, gate = [], threading.Event()
        real = eng.runner.prefill

        def spy(ps, *a, **k):
            calls.append(len(ps))
            if len(calls) == 1:
                gate.wait(10)
            return real(ps, *a, **k)

        monkeypatch.setattr(eng.runner, "prefill", spy)

        async def run():
            hold = asyncio.ensure_future(eng.generate(eng.encode_prompt("hold"), None, SamplingParams(max_tokens=1)))
            while not calls:
                await asyncio.sleep(0.001)
            both = [asyncio.ensure_future(eng.generate(prompt, None, scoped[t])) for t in ("a", "a", "b")]
            for _ in range(5000):
                if eng.stats()["waiting"] == 3:
                    break
                await asyncio.sleep(0.001)
            gate.set()
            return await asyncio.gather(hold, *both)

        _, a1, a2, b = asyncio.run(run())
        assert a1.cached_tokens == a2.cached_tokens == (len(prompt) - 1) // 8 * 8 > 0
        assert b.cached_tokens == 0
        assert a1.token_ids == a2.token_ids == b.token_ids
        assert eng.stats()["prefills_shared"] >= 1  # a's two shared one prefill; b had its own
    finally:
        eng.shutdown(drain=False)
