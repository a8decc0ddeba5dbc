"""The engine on the real default model (SmolLM2-135M-Instruct): structured output, sampling and logprobs on its
49k vocabulary and byte-level BPE, where the tiny model's one-byte tokens cannot show them."""
from __future__ import annotations

import asyncio
import json

import pytest

from adapters_store.disk import DiskStore
from service.engine import Engine, EngineConfig, SamplingParams
from service.structured import Constraint
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
