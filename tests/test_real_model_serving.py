"""The engine on the real default model (SmolLM2-135M-Instruct): structured output, sampling and logprobs on its
49k vocabulary and byte-level BPE, where the tiny model's one-byte tokens cannot show them."""
from __future__ import annotations

import asyncio
import json

import pytest

from adapters_store.disk import DiskStore
from adapters_store.format import adapter_to_bytes
from adapters_store.records import record_for
from service.engine import Engine, EngineConfig, SamplingParams
from service.structured import Constraint
from svd_adapters.adapter import random_adapter
from svd_adapters.base_model import load_base
from svd_adapters.factors import load_or_compute


@pytest.mark.real_model
def test_real_model_json_schema_sampling_and_logprobs(tmp_path):
    base = load_base("default")
    factors = load_or_compute(base.model, base.cache_dir)
    engine = Engine(base, factors, DiskStore(tmp_path / "store"),
                    EngineConfig(max_batch=4, max_rank=16, max_seq_len=256, core_slots=2, lr_slots=2))
    engine.start()
    try:
        prompt = engine.encode_prompt("What is the capital of France? Reply in JSON with the keys city and country.")
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                   "country": {"type": "string", "maxLength": 30}},
                  "required": ["city", "country"], "additionalProperties": False}
        grammar = engine.grammars.compile(Constraint("json_schema", schema))

        async def run():
            return await asyncio.gather(
                engine.generate(prompt, None, SamplingParams(max_tokens=40, grammar=grammar, logprobs=3)),
                engine.generate(prompt, None, SamplingParams(max_tokens=40, temperature=0.7, top_p=0.9, seed=3)),
                engine.generate(prompt, None, SamplingParams(max_tokens=40, temperature=0.7, top_p=0.9, seed=3)),
            )

        structured, a, b = asyncio.run(run())
        value = json.loads(structured.text)
        assert structured.finish_reason == "stop" and set(value) == {"city", "country"}
        assert "paris" in value["city"].lower() and "france" in value["country"].lower()
        assert len(structured.logprobs) == structured.completion_tokens
        assert all(e.logprob <= 0 and len(e.top) == 3 for e in structured.logprobs)
        assert a.token_ids == b.token_ids and a.completion_tokens > 0  # seeded nucleus sampling reproduces
    finally:
        engine.shutdown(drain=False)


@pytest.mark.real_model
def test_real_model_prefix_cache_answers_as_without_it(tmp_path):
    """A chat on the real model, turn by turn (each turn repeats the earlier ones and their answers), with and
    without the prefix cache: the same greedy answers, and the later turns take most of their prompt from it."""
    base = load_base("default")
    factors = load_or_compute(base.model, base.cache_dir)
    adapter = random_adapter("osora", 8, factors, base.name, seed=11)
    store = DiskStore(tmp_path / "store")
    blob = adapter_to_bytes(adapter)
    store.put(record_for(adapter, blob, "tenant-a"), blob)
    cfg = dict(max_batch=2, max_rank=16, max_seq_len=512, core_slots=2, lr_slots=2)
    engines = [Engine(base, factors, store, EngineConfig(**cfg, prefix_cache_tokens=n)) for n in (0, 4096)]
    for e in engines:
        e.start()
    try:
        for adapter_id in ("tenant-a", None):
            messages = [{"role": "system", "content": "You are a concise assistant for a bakery. Answer in one sentence."}]
            for turn, question in enumerate(("What bread is best for toast?", "And for sandwiches?", "Why?")):
                messages.append({"role": "user", "content": question})
                prompt = engines[0].encode_prompt(messages=messages)
                off, on = (asyncio.run(e.generate(prompt, adapter_id, SamplingParams(max_tokens=24))) for e in engines)
                assert on.token_ids == off.token_ids, (adapter_id, turn)
                assert off.cached_tokens == 0
                if turn:  # everything before this turn's question was cached, in 16-token blocks
                    assert on.cached_tokens >= on.prompt_tokens - 40, (adapter_id, turn, on.cached_tokens)
                messages.append({"role": "assistant", "content": on.text})
    finally:
        for e in engines:
            e.shutdown(drain=False)
