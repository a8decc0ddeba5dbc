"""The engine on the real default model (SmolLM2-135M-Instruct): structured output, sampling and logprobs on its
49k vocabulary and byte-level BPE, where the tiny model's one-byte tokens cannot show them."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from adapters_store.disk import DiskStore
from adapters_store.format import adapter_to_bytes
from adapters_store.records import record_for
from service.engine import Engine, EngineConfig, SamplingParams
from service.structured import Constraint
from svd_adapters.adapter import random_adapter
from svd_adapters.base_model import load_base
from svd_adapters.factors import load_or_compute


@contextmanager
def running_engine(tmp_path, max_seq_len: int) -> Iterator[Engine]:
    """An engine on the default model with an empty disk store, shut down afterwards."""
    base = load_base("default")
    factors = load_or_compute(base.model, base.cache_dir)
    engine = Engine(base, factors, DiskStore(tmp_path / "store"),
                    EngineConfig(max_batch=4, max_rank=16, max_seq_len=max_seq_len, core_slots=2, lr_slots=2))
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown(drain=False)


@pytest.mark.real_model
def test_real_model_json_schema_sampling_and_logprobs(tmp_path):
    with running_engine(tmp_path, max_seq_len=256) as engine:
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


@pytest.mark.real_model
def test_real_model_merged_adapters_generate_what_the_merged_weights_generate(tmp_path):
    """A linear merge of an OSoRA, a LoRA-XS and a SORSA adapter, and a TIES merge of two OSoRA adapters, on the
    real model, in one batch with a plain adapter: each generates the tokens, with the probabilities, of its
    reference weights."""
    from _reliability import put_adapters
    from service.merges import MergeSpec
    from svd_adapters import merge as merging
    from svd_adapters.inject import merge_into
    from test_merged_adapters import greedy, weighted_model

    base = load_base("default")
    factors = load_or_compute(base.model, base.cache_dir)
    # moved as much as a trained adapter moves these weights (the tiny model's default noise would swamp this model)
    noise = {"osora": 0.02, "loraxs": 0.05, "sorsa": 0.01}
    adapters = {aid: random_adapter(m, 8, factors, base.name, seed=40 + i, scale=noise)
                for i, (aid, m) in enumerate((("os", "osora"), ("lx", "loraxs"), ("so", "sorsa"), ("os2", "osora")))}
    store = DiskStore(tmp_path / "store")
    versions = put_adapters(store, adapters)
    linear = MergeSpec(tuple((i, versions[i]) for i in ("os", "lx", "so")), (0.7, 1.0, 0.5), merging.MergeOptions())
    ties = MergeSpec(tuple((i, versions[i]) for i in ("os", "os2")), (1.0, 1.0), merging.MergeOptions("ties", 0.5))
    engine = Engine(base, factors, store, EngineConfig(max_batch=4, max_rank=16, max_seq_len=256, core_slots=4,
                                                       lr_slots=3))
    engine.start()
    try:
        prompt = engine.encode_prompt("Write one sentence about the sea.")

        async def run():
            p = SamplingParams(max_tokens=8, logprobs=0)
            return await asyncio.gather(engine.generate(prompt, linear, p), engine.generate(prompt, ties, p),
                                        engine.generate(prompt, "lx", p, versions["lx"]))

        results = asyncio.run(run())
    finally:
        engine.shutdown(drain=False)
    ties_adapter = merging.parameter_merge([adapters["os"], adapters["os2"]], ties.weights, ties.options, factors)
    ties_model = weighted_model(base, factors, [])
    merge_into(ties_model, ties_adapter, factors)
    refs = [weighted_model(base, factors, [(adapters["os"], 0.7), (adapters["lx"], 1.0), (adapters["so"], 0.5)]),
            ties_model, weighted_model(base, factors, [(adapters["lx"], 1.0)])]
    for res, ref in zip(results, refs):
        tokens, logprobs = greedy(ref, prompt, 8, engine.eos_ids)
        assert res.token_ids == tokens
        assert max(abs(lp.logprob - want) for lp, want in zip(res.logprobs, logprobs)) <= 1e-4


@pytest.mark.real_model
def test_real_model_speculative_decoding_answers_as_without_it_in_fewer_steps(tmp_path):
    """Prompt lookup on the real model, on answers that quote their prompt (the base and an OSoRA adapter in one
    batch, greedy; then a seeded sampled one): the same tokens as without speculation, many drafted tokens kept,
    and the greedy answers in far fewer decode steps."""
    from service.speculative import SpeculativeConfig

    base = load_base("default")
    factors = load_or_compute(base.model, base.cache_dir)
    adapter = random_adapter("osora", 16, factors, base.name, seed=12, scale=0.02)
    store = DiskStore(tmp_path / "store")
    blob = adapter_to_bytes(adapter)
    record = record_for(adapter, blob, "quote")
    store.put(record, blob)
    text = ("The library opens at nine in the morning and closes at six in the evening. On Sundays it is closed. "
            "Books can be borrowed for three weeks and renewed twice online.")
    runs = {}
    for name, spec in (("off", SpeculativeConfig()), ("on", SpeculativeConfig(tokens=4))):
        engine = Engine(base, factors, store, EngineConfig(max_batch=4, max_rank=16, max_seq_len=512, core_slots=2,
                                                           lr_slots=1, prefix_cache_tokens=0, speculative=spec))
        engine.start()
        try:
            prompt = engine.encode_prompt(messages=[{"role": "user", "content": "Copy the sentences of this text "
                                                     f"that talk about opening hours, word for word:\n\n{text}"}])

            async def greedy():
                return await asyncio.gather(engine.generate(prompt, None, SamplingParams(max_tokens=48)),
                                            engine.generate(prompt, "quote", SamplingParams(max_tokens=48),
                                                            record.sha256))

            answers = [r.token_ids for r in asyncio.run(greedy())]
            counters = dict(engine.counters)
            sampled = asyncio.run(engine.generate(prompt, None, SamplingParams(max_tokens=48, temperature=0.5, seed=1)))
            runs[name] = (answers + [sampled.token_ids], counters)
        finally:
            engine.shutdown(drain=False)
    assert runs["on"][0] == runs["off"][0]
    assert "nine in the morning" in base.tokenizer.decode(runs["on"][0][0])  # it did quote
    on = runs["on"][1]
    assert on["spec_accepted_tokens"] > 0.4 * on["spec_draft_tokens"] > 0
    assert on["steps"] < 0.7 * runs["off"][1]["steps"]


@pytest.mark.real_model
def test_real_model_fills_a_forced_tool_call_from_the_question(tmp_path):
    """tool_choice required / named on SmolLM2: the tools rendered into the prompt (service/tool_format.py) and the
    grammar holding the answer to a call (service/tool_calls.py) — the model picks the arguments from the question."""
    from service import tool_format
    from service.tool_calls import ToolPlan

    with running_engine(tmp_path, max_seq_len=512) as engine:
        weather = {"name": "get_weather", "description": "Get the weather forecast for a city", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
            "additionalProperties": False}}
        add = {"name": "add", "description": "Add two integers", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"], "additionalProperties": False}}
        tools = [{"type": "function", "function": weather}, {"type": "function", "function": add}]
        ask = [{"role": "user", "content": "What's the weather in Paris?"}]
        prompt = engine.encode_prompt(None, tool_format.plain_turns(ask, [weather, add]))
        choices = ["required", {"type": "function", "function": {"name": "get_weather"}}]
        grammars = [engine.grammars.compile(ToolPlan.of(tools, c, False).constraint()) for c in choices]

        async def run():
            return await asyncio.gather(*(engine.generate(prompt, None, SamplingParams(max_tokens=60, grammar=g))
                                          for g in grammars))

        for result in asyncio.run(run()):
            content, calls = tool_format.parse(result.text)
            assert result.finish_reason == "stop" and content is None, result.text
            assert calls == [tool_format.ToolCall("get_weather", '{"city": "Paris"}')], result.text
