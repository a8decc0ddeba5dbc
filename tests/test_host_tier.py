"""The host-memory tier of the adapter cache: an adapter evicted from its device slot comes back from RAM, without
the store and the validation, serves exactly what it served before, and never outlives a delete or a re-upload."""
from __future__ import annotations

import asyncio

import pytest
import torch

from _reliability import wait_until
from adapters_store.format import adapter_to_bytes
from adapters_store.records import record_for
from service.engine import Engine, EngineConfig, SamplingParams
from service.host_tier import HostTier, terms_bytes
from svd_adapters.adapter import random_adapter
from test_metrics import FlakyStore


class CountingStore(FlakyStore):
    """A disk store that can be taken down (`down`) and counts the blob fetches it answers."""

    def __init__(self, root):
        super().__init__(root)
        self.fetched: list[str] = []

    def get_blob(self, adapter_id, expect_sha256=None):
        blob = super().get_blob(adapter_id, expect_sha256)  # raises StoreUnavailable while down
        self.fetched.append(adapter_id)
        return blob


@pytest.fixture
def two_adapters(tiny_base, tiny_factors, tmp_path):
    """Two OSoRA adapters and a LoRA-XS one in a counting store, as (store, {id: (adapter, sha256)})."""
    store = CountingStore(tmp_path / "store")
    made = {}
    for i, (aid, method) in enumerate((("a", "osora"), ("b", "osora"), ("c", "loraxs"))):
        adapter = random_adapter(method, 4, tiny_factors, tiny_base.name, seed=300 + i, scale=2.0)
        blob = adapter_to_bytes(adapter)
        record = record_for(adapter, blob, aid)
        store.put(record, blob)
        made[aid] = (adapter, record.sha256)
    return store, made


def one_slot_engine(tiny_base, tiny_factors, store, **cfg) -> Engine:
    """One usable core slot (slot 0 is the zero adapter), so each new core adapter evicts the last."""
    eng = Engine(tiny_base, tiny_factors, store, EngineConfig(max_batch=2, max_rank=8, max_seq_len=64, core_slots=2,
                                                              lr_slots=2, prefix_cache_tokens=0, **cfg))
    eng.start()
    return eng


def generate(eng: Engine, prompt: list[int], aid: str, version: str | None) -> list[tuple[int, float]]:
    """Greedy tokens with their log-probabilities: equal floats mean the same terms computed the same logits."""
    res = asyncio.run(eng.generate(prompt, aid, SamplingParams(max_tokens=6, logprobs=0), version))
    return [(t, lp.logprob) for t, lp in zip(res.token_ids, res.logprobs, strict=True)]


def test_tier_is_lru_by_bytes_and_keeps_versioned_keys_only(tiny_base, tiny_factors):
    terms = {s: random_adapter("osora", 4, tiny_factors, tiny_base.name, seed=s).terms(tiny_factors) for s in range(4)}
    size = terms_bytes(terms[0])
    assert size == sum(t.numel() * 4 for lt in terms[0].values() for t in (lt.terms.o, lt.terms.C, lt.terms.d)
                       if t is not None) > 0
    tier = HostTier(2 * size + size // 2)  # room for two
    assert tier.put("x", "osora", terms[0]) is False  # no version: its content is unknown
    assert tier.put("a@1", "osora", terms[0]) and tier.put("b@1", "osora", terms[1])
    assert tier.get("a@1").terms is terms[0]  # a is now the most recently used
    assert tier.put("c@1", "osora", terms[2])  # evicts b, the least recently used
    assert tier.get("b@1") is None and tier.get("a@1") is not None and tier.get("c@1") is not None
    assert tier.stats() == {"capacity_bytes": 2 * size + size // 2, "used_bytes": 2 * size, "entries": 2,
                            "hits": 3, "misses": 1, "evictions": 1}
    assert tier.put("a@2", "osora", terms[3])  # a second version of a: evicts a@1 (c was used after it)
    assert tier.newest("a") == "a@2" and tier.newest("c") == "c@1" and tier.newest("zz") is None
    assert tier.put("a@3", "osora", terms[0])  # evicts c
    assert tier.newest("c") is None and tier.newest("a") == "a@3"
    assert tier.drop("a") == 2 and tier.stats()["used_bytes"] == 0 and tier.stats()["entries"] == 0
    assert HostTier(size - 1).put("a@1", "osora", terms[0]) is False  # larger than the whole tier: not kept
    with pytest.raises(ValueError, match="≥ 0 bytes"):
        HostTier(-1)


def test_evicted_adapter_returns_from_host_memory_with_the_same_tokens(tiny_base, tiny_factors, two_adapters):
    store, made = two_adapters
    eng = one_slot_engine(tiny_base, tiny_factors, store)
    prompt = eng.encode_prompt("The quick brown fox", raw=True)
    try:
        first = {aid: generate(eng, prompt, aid, made[aid][1]) for aid in ("a", "b", "c")}  # each evicts the last
        assert store.fetched == ["a", "b", "c"] and eng.stats()["cache_evictions"] == 2
        assert len({tuple(t for t, _ in out) for out in first.values()}) == 3  # three different adapters served
        again = {aid: generate(eng, prompt, aid, made[aid][1]) for aid in ("a", "b", "c")}
        assert again == first  # from host memory, token for token
        assert store.fetched == ["a", "b", "c"]  # the store was not asked again
        stats = eng.stats()
        assert stats["cache_evictions"] == 5 and stats["host_cache_hits"] == 3 and stats["host_cache_entries"] == 3
        assert stats["host_cache_used_bytes"] == sum(terms_bytes(a.terms(tiny_factors)) for a, _ in made.values())
        assert stats["adapter_loads"] == 3  # loads are the store's: the host tier's placements are not counted
    finally:
        eng.shutdown(drain=False)

    off = one_slot_engine(tiny_base, tiny_factors, store, host_cache_bytes=0)
    store.fetched.clear()
    try:
        for aid in ("a", "b", "a"):
            generate(off, prompt, aid, made[aid][1])
        assert store.fetched == ["a", "b", "a"] and off.stats()["host_cache_hits"] == 0  # off: every return is a fetch
    finally:
        off.shutdown(drain=False)


def test_delete_and_reupload_never_serve_old_terms_from_host_memory(tiny_base, tiny_factors, two_adapters):
    store, made = two_adapters
    eng = one_slot_engine(tiny_base, tiny_factors, store)
    prompt = eng.encode_prompt("Once upon a time", raw=True)
    try:
        old = generate(eng, prompt, "a", made["a"][1])
        generate(eng, prompt, "b", made["b"][1])  # a leaves its device slot; its terms stay in host memory
        assert eng.host_tier.newest("a") == f"a@{made['a'][1]}"
        # a is replaced by other content: the API authorises the new version, whose key the tier does not hold
        new_adapter = random_adapter("osora", 4, tiny_factors, tiny_base.name, seed=999, scale=2.0)
        blob = adapter_to_bytes(new_adapter)
        record = record_for(new_adapter, blob, "a")
        store.put(record, blob, overwrite=True)
        new = generate(eng, prompt, "a", record.sha256)
        assert store.fetched[-1] == "a" and new != old
        # deleted: the engine forgets every version of it in both tiers
        eng.evict("a")
        wait_until(lambda: eng.host_tier.newest("a") is None
                   and "a" not in {k.partition("@")[0] for k in eng.cache.resident}, 5, what="both tiers to drop a")
    finally:
        eng.shutdown(drain=False)


def test_store_outage_serves_an_evicted_adapter_from_host_memory(tiny_base, tiny_factors, two_adapters):
    """With the store unreachable the API passes no version (service/auth.py usable_version): the newest copy the
    engine holds serves — a resident one, or now one in host memory — where the store would have failed it."""
    store, made = two_adapters
    eng = one_slot_engine(tiny_base, tiny_factors, store)
    prompt = eng.encode_prompt("Hello there", raw=True)
    try:
        ref = generate(eng, prompt, "a", made["a"][1])
        generate(eng, prompt, "b", made["b"][1])  # a is evicted from the device
        store.down = True
        assert generate(eng, prompt, "a", None) == ref
        with pytest.raises(Exception, match="unreachable"):  # never loaded here: nothing to fall back on
            generate(eng, prompt, "zz", None)
    finally:
        eng.shutdown(drain=False)
    off = one_slot_engine(tiny_base, tiny_factors, store, host_cache_bytes=0)
    store.down = False
    try:
        generate(off, prompt, "a", made["a"][1])
        generate(off, prompt, "b", made["b"][1])
        store.down = True
        with pytest.raises(Exception, match="unreachable"):  # without the tier the same request fails
            generate(off, prompt, "a", None)
    finally:
        off.shutdown(drain=False)


def test_low_rank_adapters_come_back_from_host_memory_too(tiny_base, tiny_factors, tmp_path):
    """SORSA / LoRA adapters (whose fetch and validation cost most) round-trip through the tier in their own pool."""
    store = CountingStore(tmp_path / "store")
    keys = {}
    for i, method in enumerate(("sorsa", "lora")):
        adapter = random_adapter(method, 4, tiny_factors, tiny_base.name, seed=400 + i, scale=2.0)
        blob = adapter_to_bytes(adapter)
        record = record_for(adapter, blob, method)
        store.put(record, blob)
        keys[method] = record.sha256
    eng = one_slot_engine(tiny_base, tiny_factors, store)
    prompt = eng.encode_prompt("Numbers: 1 2 3", raw=True)
    try:
        first = [generate(eng, prompt, m, keys[m]) for m in ("sorsa", "lora")]
        again = [generate(eng, prompt, m, keys[m]) for m in ("sorsa", "lora")]
        assert again == first and store.fetched == ["sorsa", "lora"] and eng.stats()["host_cache_hits"] == 2
        assert torch.is_tensor(eng.host_tier.get(f"lora@{keys['lora']}").terms["q_proj"].terms.A)
    finally:
        eng.shutdown(drain=False)


def test_an_adapter_in_host_memory_is_admitted_in_the_step_that_finds_it(tiny_base, tiny_factors, two_adapters):
    """No round trip through a loader thread or a later step: admission places it and admits its request at once,
    and never evicts the slot of a request admitted before it in the same step."""
    store, made = two_adapters
    eng = Engine(tiny_base, tiny_factors, store, EngineConfig(max_batch=4, max_rank=8, max_seq_len=64, core_slots=2,
                                                              lr_slots=2, prefix_cache_tokens=0))
    try:
        for aid in ("a", "b"):
            adapter, sha = made[aid]
            eng.host_tier.put(f"{aid}@{sha}", adapter.method, adapter.terms(tiny_factors))
        prompt = eng.encode_prompt("Hi", raw=True)
        eng.accepting = True  # takes requests; no engine thread: this test runs admission itself

        async def admit():
            reqs = [eng._submit(prompt, aid, SamplingParams(max_tokens=2), made[aid][1]) for aid in ("a", "b")]
            return reqs, eng._admit()

        (ra, rb), admitted = asyncio.run(admit())
        assert admitted == [ra] and ra.core_slot == 1  # placed from host memory and admitted in this very step
        # b needs the one core slot a holds (and a's request runs): b waits, in host memory's ready queue
        assert list(eng._waiting) == [rb] and f"b@{made['b'][1]}" in eng._ready
        assert store.fetched == [] and not eng._loading and eng.stats()["host_cache_hits"] == 2
    finally:
        eng.shutdown(drain=False)
