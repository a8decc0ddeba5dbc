"""Speculative decoding by prompt lookup: drafts from a request's own context, verified in one forward, and every
request ending with exactly the tokens (and log-probabilities) it gets without speculation."""
from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from _reliability import put_adapters
from adapters_store.disk import DiskStore
from service import engine as engine_module
from service.config import Settings
from service.engine import Engine, EngineConfig, SamplingParams, TextDelta
from service.metrics import Metrics
from service.speculative import SpeculativeConfig, propose
from service.structured import Constraint
from svd_adapters.adapter import random_adapter
from test_chunked_prefill import tokens

# --- the proposer ------------------------------------------------------------------------------------------


def test_propose_drafts_what_followed_the_latest_earlier_occurrence_of_the_suffix():
    ctx = [1, 2, 3, 4, 9, 9, 2, 3, 5, 6, 7, 2, 3]
    assert propose(ctx, 3, 4, 2) == [5, 6, 7]  # [2, 3] at 1 and at 6: the latest wins
    assert propose(ctx, 1, 4, 2) == [5]  # k caps the draft
    assert propose(ctx, 3, 4, 3) == []  # no earlier [7, 2, 3]
    # the longest suffix first: [4, 2, 3] occurs only early, [2, 3] later with another continuation
    assert propose([4, 2, 3, 8, 8, 2, 3, 6, 6, 4, 2, 3], 2, 4, 2) == [8, 8]
    assert propose([4, 2, 3, 8, 8, 2, 3, 6, 6, 4, 2, 3], 2, 2, 2) == [6, 6]
    assert propose([5, 6, 7, 5, 6], 4, 4, 2) == [7, 5, 6]  # fewer than k tokens follow: what there is
    assert propose([7, 7, 7], 2, 4, 2) == [7]  # overlapping occurrences; never the suffix itself
    assert propose([1, 2, 3], 4, 4, 1) == [] and propose([3], 4, 4, 1) == [] and propose([1, 2, 1], 0, 4, 1) == []
    assert propose([1, 2, 1], 3, 4, 1) == [2, 1]


def test_speculative_config_is_checked():
    for bad in (dict(tokens=-1), dict(ngram_min=0), dict(ngram_min=3, ngram_max=2), dict(max_batch=0),
                dict(backoff_max=-1), dict(prediction_tokens=-1)):
        with pytest.raises(ValueError):
            SpeculativeConfig(**bad).check()
    settings = Settings.from_env(speculative_tokens=5, speculative_ngram_max=3, speculative_max_batch=2,
                                 speculative_backoff_max=8, speculative_prediction_tokens=6)
    assert settings.speculative == SpeculativeConfig(tokens=5, ngram_max=3, ngram_min=2, max_batch=2, backoff_max=8,
                                                     prediction_tokens=6)
    assert [SpeculativeConfig(backoff_max=8).rest_after(m) for m in range(6)] == [0, 1, 2, 4, 8, 8]
    assert SpeculativeConfig(backoff_max=0).rest_after(3) == 0
    with pytest.raises(ValueError, match="ngram_min"):
        Settings.from_env(speculative_tokens=4, speculative_ngram_min=5)


def test_drafts_stop_where_the_request_must_and_only_for_small_batches(tiny_base, tiny_factors, tmp_path):
    eng = Engine(tiny_base, tiny_factors, DiskStore(tmp_path / "s"),
                 EngineConfig(max_batch=4, max_seq_len=20, speculative=SpeculativeConfig(tokens=4, max_batch=2)))
    try:
        def req(prompt, out, max_tokens=64):
            return SimpleNamespace(prompt=prompt, out=out, params=SamplingParams(max_tokens=max_tokens),
                                   finish_reason=None, spec_rest=0)

        loop = [1, 2, 3, 4, 5, 6]
        assert eng._drafts([req(loop, [1, 2])]) == [[3, 4, 5, 6]]
        assert eng._drafts([req(loop, [1, 2], max_tokens=4)]) == [[3]]  # 2 + draft + the step's own ≤ 4
        assert eng._drafts([req(loop, [1, 2], max_tokens=3)]) is None
        assert eng._drafts([req(loop * 2, [1, 2])]) == [[3, 4, 5, 6]]  # 14 fed: positions up to 19 < 20
        assert eng._drafts([req(loop * 3, [1, 2])]) is None  # at max_seq_len: no room
        assert eng._drafts([req(loop, [1, 2]), req([9, 8, 7], [6])]) == [[3, 4, 5, 6], []]
        assert eng._drafts([req(loop, [1, 2])] * 3) is None  # over speculative max_batch: plain decode steps
        resting = req(loop, [1, 2])
        resting.spec_rest = 2  # after rejected drafts: two steps without drafting, then drafts again
        assert [eng._drafts([resting]) for _ in range(3)] == [None, None, [[3, 4, 5, 6]]]
    finally:
        eng.shutdown(drain=False)


# --- the engine --------------------------------------------------------------------------------------------

METHODS = (("os", "osora", 4), ("xs", "loraxs", 8), ("so", "sorsa", 4), ("lo", "lora", 8))


@pytest.fixture(scope="module")
def adapters(tiny_base, tiny_factors):
    return {aid: random_adapter(m, r, tiny_factors, tiny_base.name, seed=900 + i)
            for i, (aid, m, r) in enumerate(METHODS)}


def engine(tiny_base, tiny_factors, store, spec: SpeculativeConfig | None = None, **cfg) -> Engine:
    settings = dict(max_batch=7, max_rank=8, max_seq_len=200, core_slots=4, lr_slots=3, prefix_cache_tokens=0)
    settings.update(cfg)
    eng = Engine(tiny_base, tiny_factors, store, EngineConfig(**settings, speculative=spec or SpeculativeConfig()))
    eng.start()
    return eng


async def streamed(eng, prompt, adapter, params, version):
    text, result = "", None
    async for item in eng.stream(prompt, adapter, params, version):
        if isinstance(item, TextDelta):
            text += item.text
        else:
            result = item
    return text, result


def run_all(eng, requests, versions):
    async def go():
        return await asyncio.gather(*[streamed(eng, p, a, sp, versions.get(a)) for p, a, sp in requests])
    return asyncio.run(go())


def requests_of_every_kind() -> list[tuple[list[int], str | None, SamplingParams]]:
    return [
        (tokens(12, 1), None, SamplingParams(max_tokens=30, ignore_eos=True, logprobs=2)),
        (tokens(9, 2), "os", SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.9, seed=4, logprobs=0)),
        (tokens(15, 3), "xs", SamplingParams(max_tokens=23, ignore_eos=True, repetition_penalty=1.3,
                                             frequency_penalty=0.5)),
        (tokens(7, 4), "so", SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.7, top_p=0.9, seed=9,
                                            logprobs=1)),
        (tokens(11, 5), "lo", SamplingParams(max_tokens=30, ignore_eos=True, top_k=5, temperature=1.0, seed=2)),
        (tokens(10, 6), None, SamplingParams(max_tokens=30, ignore_eos=True, min_tokens=5)),
    ]


def test_verified_drafts_give_every_request_its_unspeculated_tokens(tiny_base, tiny_factors, adapters, tmp_path,
                                                                    monkeypatch):
    """A mixed batch (base, OSoRA, LoRA-XS, SORSA, LoRA rows; greedy, seeded sampling with top_p / top_k,
    penalties, min_tokens, logprobs, a JSON schema), drafted by an oracle that knows each request's unspeculated answer and
    spoils one token of most drafts at a varying place: every request ends with the same tokens, text, stream and
    log-probabilities as without speculation, drafts were both kept and rejected, and none ran past max_tokens
    or the row's positions."""
    store = DiskStore(tmp_path / "store")
    versions = put_adapters(store, adapters)
    plain = engine(tiny_base, tiny_factors, store)
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer"}},
              "required": ["answer", "n"], "additionalProperties": False}
    grammar = plain.grammars.compile(Constraint("json_schema", schema))
    reqs = requests_of_every_kind() + [  # structured output: its grammar advanced token by token
        (tokens(8, 10), "xs", SamplingParams(max_tokens=40, temperature=1.0, seed=3, grammar=grammar))]
    try:
        reference = run_all(plain, reqs, versions)
    finally:
        plain.shutdown(drain=False)
    answers = {tuple(p): (len(p), res.token_ids, sp) for (p, _, sp), (_, res) in zip(reqs, reference)}
    asked = []

    def oracle(context, k, ngram_max, ngram_min):
        n, answer, params = next(v for key, v in answers.items() if tuple(context[: len(key)]) == key)
        done = len(context) - n
        assert context[n:] == answer[:done]  # the engine's own output so far is the unspeculated one
        assert 1 <= k <= 4 and done + k + 1 <= params.max_tokens and len(context) + k <= 200
        draft = answer[done : done + k]
        spoil = (done + len(asked)) % (k + 2)  # k or k+1: the whole draft is right
        if spoil < len(draft):
            draft[spoil] = (draft[spoil] + 1) % 256
        asked.append((len(draft), spoil))
        return draft

    monkeypatch.setattr(engine_module, "propose", oracle)
    spec = engine(tiny_base, tiny_factors, store, SpeculativeConfig(tokens=4, max_batch=7))
    try:
        got = run_all(spec, reqs, versions)
    finally:
        spec.shutdown(drain=False)  # joins the engine's thread: its last step's counters are in
    counters = dict(spec.counters)
    metrics = Metrics()
    metrics.attach(spec)
    exposition = metrics.exposition().decode()
    for (text, res), (ref_text, ref) in zip(got, reference):
        assert res.token_ids == ref.token_ids and res.text == ref.text == text == ref_text
        assert res.finish_reason == ref.finish_reason and res.completion_tokens == ref.completion_tokens
        if ref.logprobs is not None:
            assert len(res.logprobs) == len(ref.logprobs)
            for a, b in zip(res.logprobs, ref.logprobs):
                assert a.token == b.token and abs(a.logprob - b.logprob) <= 1e-4
                assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert counters["spec_steps"] > 0 and counters["steps"] < max(r.completion_tokens for _, r in reference)
    assert 0 < counters["spec_accepted_tokens"] < counters["spec_draft_tokens"] == sum(n for n, _ in asked)
    assert {spoil for n, spoil in asked if spoil < n} == {0, 1, 2, 3}  # rejected at every draft position
    assert json.loads(got[-1][1].text)["answer"] in ("yes", "no")
    assert f"svdserve_spec_decode_accepted_tokens_total {float(counters['spec_accepted_tokens'])}" in exposition


def test_prompt_lookup_speeds_up_a_repeating_generation_and_changes_no_token(tiny_base, tiny_factors, adapters,
                                                                           tmp_path):
    """The real proposer on the tiny model, whose greedy answers soon repeat themselves: most decode steps are
    speculative, they keep drafted tokens, and the answers equal the unspeculated ones — also where the prefix
    cache keeps a finished answer's keys (only positions the row was fed) and a stop string ends a request in the
    middle of a draft."""
    store = DiskStore(tmp_path / "store")
    versions = put_adapters(store, adapters)
    reqs = [(tokens(20, 7) * 2, None, SamplingParams(max_tokens=60, ignore_eos=True)),
            (tokens(16, 8), "os", SamplingParams(max_tokens=60, ignore_eos=True)),
            (tokens(16, 9), "so", SamplingParams(max_tokens=60, ignore_eos=True, logprobs=0))]
    results = {}
    for name, spec in (("off", None), ("on", SpeculativeConfig(tokens=5, max_batch=4))):
        eng = engine(tiny_base, tiny_factors, store, spec, prefix_cache_tokens=1024, prefix_block_tokens=8)
        try:
            first = run_all(eng, reqs, versions)
            # the same again, each with a stop string cut from its first answer's middle
            stopped = [(p, a, SamplingParams(max_tokens=60, ignore_eos=True, stop=[res.text[25:28]]))
                       for (p, a, _), (_, res) in zip(reqs, first)]
            second = run_all(eng, stopped, versions)
        finally:
            eng.shutdown(drain=False)
        results[name] = (first, second, dict(eng.counters))
    off, on = results["off"], results["on"]
    for got, want in zip(on[0] + on[1], off[0] + off[1]):
        assert got[1].token_ids == want[1].token_ids and got[0] == want[0] == got[1].text
        assert got[1].finish_reason == want[1].finish_reason
    assert all(res.finish_reason == "stop" and len(res.token_ids) < 60 for _, res in on[1])
    counters = on[2]
    assert counters["spec_accepted_tokens"] > 0.5 * counters["spec_draft_tokens"] > 0
    assert counters["steps"] < 0.6 * off[2]["steps"]  # the same tokens in fewer steps
    assert off[2]["spec_steps"] == 0


def test_rows_whose_drafts_keep_failing_rest_from_drafting_and_keep_their_tokens(tiny_base, tiny_factors, adapters,
                                                                                 tmp_path, monkeypatch):
    """Drafts that are always wrong (a token the model never picks here): with back-off a row drafts after 1, 2,
    4, 4, … plain steps, so few steps are speculative; without it every step is. Tokens are the same throughout."""
    store = DiskStore(tmp_path / "store")
    versions = put_adapters(store, adapters)
    reqs = [(tokens(12, 20 + i), a, SamplingParams(max_tokens=40, ignore_eos=True)) for i, a in enumerate((None, "xs"))]
    off = engine(tiny_base, tiny_factors, store)
    try:
        want = run_all(off, reqs, versions)
    finally:
        off.shutdown(drain=False)
    never = {t for _, res in want for t in res.token_ids}
    wrong = next(t for t in range(tiny_base.model.config.vocab_size) if t not in never)
    monkeypatch.setattr(engine_module, "propose", lambda context, k, *_: [wrong] * k)
    counts = {}
    for backoff in (0, 4):
        eng = engine(tiny_base, tiny_factors, store, SpeculativeConfig(tokens=3, max_batch=4, backoff_max=backoff))
        try:
            got = run_all(eng, reqs, versions)
        finally:
            eng.shutdown(drain=False)
        counts[backoff] = dict(eng.counters)
        assert [res.token_ids for _, res in got] == [res.token_ids for _, res in want]
    assert counts[0]["spec_accepted_tokens"] == counts[4]["spec_accepted_tokens"] == 0
    # every step verified a useless draft (but the last: a request's last token leaves no room for one)
    assert counts[0]["spec_steps"] == counts[0]["steps"] - 1
    # with back-off each row drafts at its steps 1, 3, 6, 11, 16, …: 9 of its 39 (the two rows need not align)
    assert 2 * 8 * 3 <= counts[4]["spec_draft_tokens"] <= 2 * 10 * 3 < 0.3 * counts[0]["spec_draft_tokens"]
    assert counts[4]["spec_steps"] <= 20 < counts[0]["spec_steps"]


def test_requests_joining_speculative_steps_mid_way_and_a_chunked_prompt_keep_their_tokens(
        tiny_base, tiny_factors, adapters, tmp_path):
    """Continuous batching with speculation: requests arrive at different steps, one with a long prompt prefilled in
    chunks (in the row past the speculating ones) while the others take speculative steps; each ends with the
    tokens of a plain engine's run."""
    store = DiskStore(tmp_path / "store")
    versions = put_adapters(store, adapters)
    reqs = [(tokens(20, 11) * 2, "os", SamplingParams(max_tokens=50, ignore_eos=True)),
            (tokens(14, 12), None, SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.8, seed=5)),
            (tokens(90, 13), "so", SamplingParams(max_tokens=30, ignore_eos=True)),  # chunked: 90 > 24
            (tokens(12, 14) * 3, "lo", SamplingParams(max_tokens=40, ignore_eos=True))]
    plain = engine(tiny_base, tiny_factors, store)
    try:
        reference = [asyncio.run(plain.generate(p, a, sp, versions.get(a))).token_ids for p, a, sp in reqs]
    finally:
        plain.shutdown(drain=False)
    spec = engine(tiny_base, tiny_factors, store, SpeculativeConfig(tokens=3, max_batch=4), prefill_chunk_tokens=24)

    async def staggered():
        tasks = []
        for p, a, sp in reqs:
            tasks.append(asyncio.ensure_future(spec.generate(p, a, sp, versions.get(a))))
            # the next one joins a few steps later (or once the others are done)
            while spec.counters["steps"] < 3 * len(tasks) and not all(t.done() for t in tasks):
                await asyncio.sleep(0.002)
        return [(await t).token_ids for t in tasks]

    try:
        got = asyncio.run(staggered())
    finally:
        spec.shutdown(drain=False)
    counters = dict(spec.counters)
    assert got == reference
    assert counters["prefill_chunks"] > 0 and counters["spec_accepted_tokens"] > 0


# --- predicted outputs ------------------------------------------------------------------------------------------


def test_propose_predicted_follows_the_prediction_from_where_the_answer_is():
    from service.speculative import propose_predicted

    def draft(pred, out, start, k, prompt=(1, 2)):
        return propose_predicted(pred, list(out), list(prompt) + list(out), start, k, 4, 2)

    pred = [10, 11, 12, 13, 14, 15, 16, 17]
    # the answer so far is the prediction's start: its next tokens
    assert draft(pred, [10], 0, 3) == ([11, 12, 13], 1)
    assert draft(pred, [10, 11, 12], 1, 8) == ([13, 14, 15, 16, 17], 3)
    # the answer left the prediction (an edit) and came back: drafts resume after the rejoining tokens (≥ 2 of them)
    assert draft(pred, [10, 11, 99, 98, 14, 15], 1, 2) == ([16, 17], 6)
    assert draft(pred, [10, 11, 99, 98, 15], 1, 2) == ([], 1)  # one token in common is not enough
    assert draft(pred, [10, 11, 99], 1, 3) == ([], 1)  # nothing of it matches: no draft
    assert draft(pred, [10, 11, 12, 13, 14, 15, 16, 17], 0, 3) == ([], 0)  # the prediction is used up
    # repeated n-grams: the first match at or after where the last draft began, else the first anywhere
    rep = [5, 6, 7, 5, 6, 8]
    assert draft(rep, [9, 5, 6], 0, 1) == ([7], 2)
    assert draft(rep, [9, 5, 6], 3, 1) == ([8], 5)
    assert draft(rep, [9, 5, 6], 6, 1) == ([7], 2)  # none ahead: the first anywhere


def test_a_prediction_drafts_even_with_prompt_lookup_off_and_never_changes_a_token(tiny_base, tiny_factors, adapters,
                                                                                   tmp_path):
    """Requests predicting their answer exactly, with an edit in its middle, and wrongly, beside one without a
    prediction, on an engine whose prompt lookup is off: every answer is its unspeculated one; an exact prediction
    is kept whole in few steps, an edited one around its edit, a wrong one (no two tokens in a row in common with
    the answer) is never drafted from; usage counts them."""
    store = DiskStore(tmp_path / "store")
    versions = put_adapters(store, adapters)
    # seeded sampling: the tiny model's greedy answers repeat one token, which would hide an edit
    reqs = [(tokens(10, 30 + i), a, SamplingParams(max_tokens=40, ignore_eos=True, temperature=1.0, seed=i))
            for i, a in enumerate((None, "os", "xs", "so"))]
    plain = engine(tiny_base, tiny_factors, store)
    try:
        want = [res for _, res in run_all(plain, reqs, versions)]
    finally:
        plain.shutdown(drain=False)
    exact = list(want[0].token_ids)
    edited = list(want[1].token_ids)
    edited[15:18] = [(t + 1) % 256 for t in edited[15:18]]
    wrong = [(t + 7) % 256 for t in want[2].token_ids]
    predicted = [(p, a, replace(sp, prediction=pred)) for (p, a, sp), pred in zip(reqs, (exact, edited, wrong, None))]
    eng = engine(tiny_base, tiny_factors, store, SpeculativeConfig(tokens=0, max_batch=4, prediction_tokens=8))
    try:
        got = [res for _, res in run_all(eng, predicted, versions)]
        steps = eng.counters["steps"]
        alone = run_all(eng, predicted[:1], versions)[0][1]  # the exact prediction alone
        alone_steps = eng.counters["steps"] - steps
    finally:
        eng.shutdown(drain=False)
    assert [r.token_ids for r in got] == [r.token_ids for r in want] and alone.token_ids == want[0].token_ids
    # 39 tokens after the prefill's: drafts of 8 kept whole, each step adding its own token (the last drafts less)
    assert got[0].accepted_prediction_tokens >= 30 and got[0].rejected_prediction_tokens == 0
    assert alone_steps <= 6
    assert 15 <= got[1].accepted_prediction_tokens < 35 and got[1].rejected_prediction_tokens >= 1
    assert got[2].accepted_prediction_tokens == got[2].rejected_prediction_tokens == 0  # never met: never drafted
    assert got[3].accepted_prediction_tokens == got[3].rejected_prediction_tokens == 0
    # the engine's counts (Prometheus: svdserve_spec_decode_prediction_*_tokens_total) are the requests' sums
    everyone = got + [alone]
    assert eng.counters["spec_prediction_draft_tokens"] == sum(
        r.accepted_prediction_tokens + r.rejected_prediction_tokens for r in everyone)
    # (a request's last kept token may end it: its usage counts it, the engine's step does not)
    kept = sum(r.accepted_prediction_tokens for r in everyone)
    assert kept - len(everyone) <= eng.counters["spec_prediction_accepted_tokens"] <= kept
    metrics = Metrics()
    metrics.attach(eng)
    text = metrics.exposition().decode()
    assert (f"svdserve_spec_decode_prediction_accepted_tokens_total "
            f"{float(eng.counters['spec_prediction_accepted_tokens'])}") in text


@pytest.mark.anyio
async def test_predicted_outputs_through_the_apis(serve, tmp_path):
    """OpenAI's `prediction` on /v1/chat/completions and /generate's `prediction`: the same answer, and usage says
    how much of the prediction was kept."""
    store = DiskStore(tmp_path / "store")
    async with serve(store, max_seq_len=256) as client:
        chat = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "Say something."}],
                "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        first = (await client.post("/v1/chat/completions", json=chat)).json()
        text = first["choices"][0]["message"]["content"]
        again = (await client.post("/v1/chat/completions", json={**chat, "prediction": {"type": "content", "content": text}})).json()
        assert again["choices"][0]["message"]["content"] == text
        details = again["usage"]["completion_tokens_details"]
        assert details["accepted_prediction_tokens"] > 10 and "completion_tokens_details" not in first["usage"]
        native = {"prompt": "Say something.", "max_tokens": 30, "ignore_eos": True}
        base = (await client.post("/generate", json=native)).json()
        resp = (await client.post("/generate", json={**native, "prediction": base["text"]})).json()
        assert resp["text"] == base["text"] and resp["usage"]["accepted_prediction_tokens"] > 10
        assert base["usage"]["accepted_prediction_tokens"] == 0
        too_long = await client.post("/v1/chat/completions", json={**chat, "prediction": {"content": "x" * 70000}})
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prediction"
    store.close()
