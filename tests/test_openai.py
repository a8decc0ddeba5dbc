"""The OpenAI-compatible API through the official `openai` client, against a real uvicorn server (tiny base).

One server for the module (auth on): tenant "acme" owns three adapters, tenant "other" one. The client talks
HTTP to 127.0.0.1 exactly as it would talk to api.openai.com.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from adapters_store.disk import DiskStore
from service.app import create_app
from service.config import Settings
from svd_adapters.base_model import tiny_tokenizer

ADMIN = "admin-" + "x" * 32
PROMPT = "Hello there"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
MAX_TOKENS_LIMIT = 64


class LiveServer:
    """uvicorn on a free 127.0.0.1 port in a background thread (lifespan included); stop() at teardown."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_config=None, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="module")
def live(tiny_base, tiny_factors, make_blob, tmp_path_factory):
    yield from live_server(tiny_base, tiny_factors, make_blob, tmp_path_factory)


def live_server(tiny_base, tiny_factors, make_blob, tmp_path_factory, max_seq_len: int = 512):
    """A live server with tenants acme (max_tokens limited) and other, and their adapters; yielded, then stopped."""
    store = DiskStore(tmp_path_factory.mktemp("openai-store"))
    settings = Settings(
        base="tiny", store=repr(store), device="cpu", max_batch=4, max_rank=8, max_seq_len=max_seq_len, core_slots=4,
        lr_slots=2, max_waiting=16, shutdown_timeout=5.0, auth="on", admin_key=ADMIN,
    )
    server = LiveServer(create_app(settings, base=tiny_base, factors=tiny_factors, store=store)).start()
    admin = {"Authorization": f"Bearer {ADMIN}"}
    keys = {}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for tenant, limits in (("acme", {"max_tokens": MAX_TOKENS_LIMIT}), ("other", {})):
            assert http.post("/admin/tenants", json={"tenant": tenant, **limits}, headers=admin).status_code == 201
            keys[tenant] = http.post(f"/admin/tenants/{tenant}/keys", headers=admin).json()["key"]
        uploads = [
            ("acme", "strong", make_blob("loraxs", rank=4, scale=50.0)),
            ("acme", "identity", make_blob("osora", rank=4, scale=0.0)),  # OSoRA at init: exactly the base
            ("acme", "sorsa-1", make_blob("sorsa", rank=2, seed=3)),
            ("other", "theirs", make_blob("lora", rank=4, seed=4)),
        ]
        for tenant, adapter_id, blob in uploads:
            resp = http.post(
                "/adapters", files={"file": ("a.safetensors", blob)}, data={"adapter_id": adapter_id},
                headers={"Authorization": f"Bearer {keys[tenant]}"},
            )
            assert resp.status_code == 201, resp.text
    server.keys = keys
    server.base_name = tiny_base.name
    yield server
    server.stop()
    store.close()


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    # strict: every response must validate against the client's own models of OpenAI's shapes
    with openai.OpenAI(base_url=live.url + "/v1", api_key=live.keys["acme"], max_retries=0, timeout=60,
                       _strict_response_validation=True) as c:
        yield c


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {live.keys['acme']}"}, timeout=60) as h:
        yield h


def generate_text(http, **body) -> dict:
    resp = http.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


# --- models ------------------------------------------------------------------------------------------------


def test_models_lists_the_base_and_only_the_callers_adapters(client, live):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == live.base_name
    assert sorted(ids[1:]) == ["identity", "sorsa-1", "strong"]  # not "theirs" (tenant "other")
    by_id = {m.id: m for m in models.data}
    assert by_id["strong"].object == "model" and by_id["strong"].owned_by == "acme" and by_id["strong"].created > 0
    assert by_id[live.base_name].owned_by == "svdserve"

    assert client.models.retrieve("strong").id == "strong"
    assert client.models.retrieve(live.base_name).id == live.base_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("theirs")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nothing-here")

    with openai.OpenAI(base_url=live.url + "/v1", api_key=live.keys["other"], max_retries=0) as other:
        assert [m.id for m in other.models.list().data] == [live.base_name, "theirs"]


# --- completions -------------------------------------------------------------------------------------------


def test_completion_shape_and_that_model_selects_the_adapter(client, http, live):
    resp = client.completions.create(model=live.base_name, prompt=PROMPT, max_tokens=8, temperature=0)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-") and resp.model == live.base_name
    assert resp.created > 0 and len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0 and choice.logprobs is None and choice.finish_reason in ("stop", "length")
    u = resp.usage
    assert u.prompt_tokens == len(PROMPT)  # raw prompt, no chat template (the tiny tokenizer is byte-level)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and 1 <= u.completion_tokens <= 8
    # the same as /generate with raw=True, greedy
    assert choice.text == generate_text(http, prompt=PROMPT, raw=True, max_tokens=8)["text"]

    # list-of-one prompt; an OSoRA adapter at init is exactly the base; a strong one changes the text
    assert client.completions.create(model="identity", prompt=[PROMPT], max_tokens=8, temperature=0).choices[0].text == choice.text
    strong = client.completions.create(model="strong", prompt=PROMPT, max_tokens=8, temperature=0)
    assert strong.model == "strong" and strong.choices[0].text != choice.text
    assert strong.choices[0].text == generate_text(http, adapter_id="strong", prompt=PROMPT, raw=True, max_tokens=8)["text"]


def test_completion_default_temperature_samples_and_a_seed_reproduces(client, live):
    kw = dict(model="sorsa-1", prompt=PROMPT, max_tokens=12, seed=1234)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    greedy = client.completions.create(model="sorsa-1", prompt=PROMPT, max_tokens=12, temperature=0)
    top_p_zero = client.completions.create(model="sorsa-1", prompt=PROMPT, max_tokens=12, top_p=0, seed=5)
    assert top_p_zero.choices[0].text == greedy.choices[0].text  # nucleus of mass 0 = the argmax


def test_penalties_logit_bias_and_vllm_sampling_extras_are_honoured(client, http, live):
    a_id = tiny_tokenizer().convert_tokens_to_ids("A")
    forced = client.completions.create(model="sorsa-1", prompt=PROMPT, max_tokens=5, temperature=0,
                                       logit_bias={str(a_id): 100})
    assert forced.choices[0].text == "AAAAA"
    kw = dict(presence_penalty=0.6, frequency_penalty=0.4, temperature=0)
    chat = client.chat.completions.create(model="sorsa-1", messages=CHAT, max_tokens=8,
                                          extra_body={"repetition_penalty": 1.3}, **kw)
    native = generate_text(http, adapter_id="sorsa-1", messages=CHAT, max_tokens=8, repetition_penalty=1.3, **kw)
    assert chat.choices[0].message.content == native["text"]  # the same parameters reach the same sampler
    eos = str(tiny_tokenizer().eos_token_id)
    long = client.completions.create(model="sorsa-1", prompt=PROMPT, max_tokens=5, temperature=0, logit_bias={eos: 100},
                                     extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 5 and long.choices[0].finish_reason == "length"
    extras = dict(top_k=3, min_p=0.1)
    a = client.completions.create(model="sorsa-1", prompt=PROMPT, max_tokens=8, seed=9, extra_body=extras)
    b = client.completions.create(model="sorsa-1", prompt=PROMPT, max_tokens=8, seed=9, extra_body=extras)
    assert a.choices[0].text == b.choices[0].text


def test_logprobs_in_openai_shapes_streamed_or_not(client, live):
    chat = client.chat.completions.create(model="strong", messages=CHAT, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens > 0
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.bytes == list(e.token.encode("utf-8"))
    streamed = []
    for chunk in client.chat.completions.create(model="strong", messages=CHAT, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model="strong", messages=CHAT, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content

    done = client.completions.create(model="strong", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    n = done.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n > 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    # keyed by token text: alternatives that decode alike (bytes of a split character: U+FFFD) share a key
    assert all(1 <= len(top) <= 2 and v <= 0 and max(top.values()) <= 0 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    tokens, offsets = [], []
    # the lenient client: the SDK types a streamed Completion's finish_reason as non-null (see the test below)
    with openai.OpenAI(base_url=live.url + "/v1", api_key=live.keys["acme"], max_retries=0, timeout=60) as lenient:
        for chunk in lenient.completions.create(model="strong", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                                stream=True):
            if chunk.choices and chunk.choices[0].logprobs:
                tokens += chunk.choices[0].logprobs.tokens
                offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == lp.tokens and offsets == lp.text_offset  # chunks go on from where the last one ended
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="strong", messages=CHAT, max_tokens=2, top_logprobs=2)
    assert exc.value.param == "top_logprobs"


def test_n_choices_each_seeded_with_seed_plus_index_streamed_or_not(client, live):
    kw = dict(model="strong", messages=CHAT, max_tokens=8, temperature=1.0, seed=42)
    many = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    texts = [c.message.content for c in many.choices]
    for i in range(3):  # choice i is the single request seeded 42 + i
        one = client.chat.completions.create(**{**kw, "seed": 42 + i})
        assert one.choices[0].message.content == texts[i]
    assert len(set(texts)) > 1
    singles = [client.chat.completions.create(**{**kw, "seed": 42 + i}).usage for i in range(3)]
    assert many.usage.prompt_tokens == singles[0].prompt_tokens  # the prompt counted once
    assert many.usage.completion_tokens == sum(u.completion_tokens for u in singles)

    parts, finish, usage = {0: "", 1: "", 2: ""}, {}, None
    for chunk in client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert [parts[i] for i in range(3)] == texts and set(finish) == {0, 1, 2}
    assert usage.completion_tokens == many.usage.completion_tokens

    greedy = client.completions.create(model="strong", prompt=PROMPT, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1] and greedy.choices[0].text == greedy.choices[1].text
    with openai.OpenAI(base_url=live.url + "/v1", api_key=live.keys["acme"], max_retries=0, timeout=60) as lenient:
        streamed = {0: "", 1: ""}
        for chunk in lenient.completions.create(model="strong", prompt=PROMPT, max_tokens=6, temperature=0, n=2, stream=True):
            for c in chunk.choices:
                streamed[c.index] += c.text
    assert streamed == {0: greedy.choices[0].text, 1: greedy.choices[1].text}


def test_several_prompts_and_token_prompts_in_one_completion_request(client, live):
    """OpenAI's and vLLM's batched /v1/completions: a list of prompts (texts or token ids), n choices each,
    choice i = prompt i // n; each choice is what that prompt alone gives, usage counts every prompt once."""
    prompts = ["Hello there", "Once upon a time", "1, 2, 3,"]
    kw = dict(model="strong", max_tokens=6, temperature=0)
    alone = [client.completions.create(prompt=p, **kw) for p in prompts]
    many = client.completions.create(prompt=prompts, n=2, **kw)
    assert [c.index for c in many.choices] == list(range(6))
    assert [c.text for c in many.choices] == [a.choices[0].text for a in alone for _ in range(2)]
    assert many.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert many.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)
    # token ids instead of text (the tiny tokenizer: one token a byte, see tiny_tokenizer), one list or several
    tok = tiny_tokenizer()
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    assert client.completions.create(prompt=ids[0], **kw).choices[0].text == alone[0].choices[0].text
    by_ids = client.completions.create(prompt=ids[1:], echo=True, **kw)
    assert [c.text for c in by_ids.choices] == [p + a.choices[0].text for p, a in zip(prompts[1:], alone[1:])]
    with openai.OpenAI(base_url=live.url + "/v1", api_key=live.keys["acme"], max_retries=0, timeout=60) as lenient:
        streamed, usage = {}, None
        for chunk in lenient.completions.create(prompt=prompts[:2], stream=True, stream_options={"include_usage": True}, **kw):
            for c in chunk.choices:
                streamed[c.index] = streamed.get(c.index, "") + c.text
            usage = chunk.usage or usage
    assert streamed == {0: alone[0].choices[0].text, 1: alone[1].choices[0].text}
    assert usage.prompt_tokens == alone[0].usage.prompt_tokens + alone[1].usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="outside this model's vocabulary"):
        client.completions.create(prompt=[5, 1 << 20], **kw)


def test_structured_output_response_format_and_vllm_guided_params(client, live):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}, "sure": {"type": "boolean"}},
              "required": ["colour", "sure"], "additionalProperties": False}
    chat = client.chat.completions.create(
        model="strong", messages=CHAT, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}})
    value = json.loads(chat.choices[0].message.content)
    assert value["colour"] in ("red", "green") and isinstance(value["sure"], bool)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="strong", messages=CHAT, max_tokens=40, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}) if c.choices)
    assert streamed == chat.choices[0].message.content
    done = client.completions.create(model="strong", prompt=PROMPT, max_tokens=10, temperature=0,
                                     extra_body={"guided_regex": "[a-c]{3}-[0-9]"})
    assert re.fullmatch("[a-c]{3}-[0-9]", done.choices[0].text)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="strong", prompt=PROMPT, max_tokens=4, extra_body={"guided_regex": "("})
    assert exc.value.param == "guided_regex" and exc.value.code == "invalid_output_constraint"


def test_echo_scores_the_prompt_as_evaluation_harnesses_ask(client, live):
    plain = client.completions.create(model="strong", prompt=PROMPT, max_tokens=3, temperature=0)
    # the lenient client: the SDK types token_logprobs as floats, while the first echoed token's is null (as OpenAI's
    # legacy API and vLLM answer it)
    lenient = openai.OpenAI(base_url=live.url + "/v1", api_key=live.keys["acme"], max_retries=0, timeout=60)
    done = lenient.completions.create(model="strong", prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1)
    c = done.choices[0]
    assert c.text == PROMPT + plain.choices[0].text
    lp = c.logprobs
    n_prompt = done.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + done.usage.completion_tokens
    assert "".join(lp.tokens[:n_prompt]) == PROMPT and lp.text_offset[0] == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    with lenient:
        streamed = "".join(ch.choices[0].text for ch in lenient.completions.create(
            model="strong", prompt=PROMPT, max_tokens=3, temperature=0, echo=True, stream=True) if ch.choices)
    assert streamed == c.text


def test_completion_stream_concatenates_to_the_full_text(client, live):
    full = client.completions.create(model="strong", prompt=PROMPT, max_tokens=10, temperature=0)
    # Not strict here: the SDK types a streamed Completion's finish_reason as non-null, while OpenAI itself
    # (and this server) sends null on every chunk but the last.
    with openai.OpenAI(base_url=live.url + "/v1", api_key=live.keys["acme"], max_retries=0, timeout=60) as lenient:
        chunks = list(lenient.completions.create(
            model="strong", prompt=PROMPT, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
        ))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


# --- chat --------------------------------------------------------------------------------------------------


def test_chat_completion_shape(client, http, live):
    resp = client.chat.completions.create(model="strong", messages=CHAT, max_tokens=8, temperature=0)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == "strong"
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == generate_text(http, adapter_id="strong", messages=CHAT, max_tokens=8)["text"]
    assert resp.usage.prompt_tokens > sum(len(m["content"]) for m in CHAT)  # the chat template wraps the turns
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

    # developer → system, text content parts joined, max_completion_tokens
    alt = client.chat.completions.create(
        model="strong",
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}],
        max_completion_tokens=8, temperature=0,
    )
    assert alt.choices[0].message.content == choice.message.content


def test_chat_stream_chunks_concatenate_to_the_greedy_text(client, live):
    full = client.chat.completions.create(model="sorsa-1", messages=CHAT, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="sorsa-1", messages=CHAT, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert len(chunks) >= 3
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id and c.model == "sorsa-1" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_raw_sse_framing(http, live):
    """data: lines with OpenAI chunk objects, the first delta carrying the role, and data: [DONE] last."""
    body = {"model": live.base_name, "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert set(first) >= {"id", "object", "created", "model", "choices"}
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["finish_reason"] is None and first["choices"][0]["index"] == 0
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["choices"][0]["delta"] == {}


# --- errors ------------------------------------------------------------------------------------------------


def test_unknown_and_foreign_models_are_not_found_alike(client):
    errors = {}
    for model in ("no-such-adapter", "theirs"):
        with pytest.raises(openai.NotFoundError) as exc:
            client.chat.completions.create(model=model, messages=CHAT, max_tokens=4)
        errors[model] = exc.value
        assert exc.value.code == "model_not_found" and exc.value.param == "model"
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=model, prompt=PROMPT, max_tokens=4)
    assert errors["theirs"].message.replace("theirs", "X") == errors["no-such-adapter"].message.replace("no-such-adapter", "X")


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"n": 129}, "n"),
        ({"temperature": 3.5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens"),  # over acme's per-request limit
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"not-a-token": 1.0}}, "logit_bias"),
        ({"extra_body": {"top_k": -2}}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"extra_body": {"best_of_luck": 1}}, "best_of_luck"),
    ],
)
def test_bad_parameters_are_bad_request(client, live, kwargs, param):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=live.base_name, messages=CHAT, **{"max_tokens": 4, **kwargs})
    assert exc.value.status_code == 400 and exc.value.param == param, exc.value.body
    assert exc.value.type == "invalid_request_error"


def test_completion_specific_bad_parameters(client, live):
    for kwargs in ({"prompt": []}, {"prompt": [[]]}, {"prompt": ["a"] * 65, "n": 2}, {"prompt": [5, 1 << 20]},
                   {"echo": True, "stream": True, "logprobs": 1}, {"logprobs": 21}, {"prompt": "x" * 600}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=live.base_name, **{"prompt": PROMPT, "max_tokens": 4, **kwargs})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=live.base_name, messages=[])


def test_error_body_is_openai_shaped_and_keys_are_checked(live):
    with httpx.Client(base_url=live.url, timeout=30) as h:
        assert h.post("/tokenize", json={"prompt": "hi"}).status_code == 401  # a tenant key is needed here too
        keyed = h.post("/tokenize", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {live.keys['acme']}"})
        assert keyed.status_code == 200 and keyed.json()["count"] > 0
        resp = h.post("/v1/completions", json={"model": "x", "prompt": "hi"})
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "code", "param"} and err["code"] == "missing_api_key"
        auth = {"Authorization": f"Bearer {live.keys['acme']}"}
        resp = h.post("/v1/completions", json={"model": live.base_name}, headers=auth)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    with openai.OpenAI(base_url=live.url + "/v1", api_key="sk-svd-0123456789abcdef_" + "n" * 43, max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with openai.OpenAI(base_url=live.url + "/v1", api_key=ADMIN, max_retries=0) as admin:
        with pytest.raises(openai.PermissionDeniedError):  # the admin key is for /admin only
            admin.models.list()


def test_async_client_and_concurrent_requests(live):
    import asyncio

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=live.keys["acme"], max_retries=0) as c:
            calls = [c.completions.create(model=m, prompt=PROMPT, max_tokens=6, temperature=0)
                     for m in ("strong", "identity", "sorsa-1", live.base_name)]
            return [r.choices[0].text for r in await asyncio.gather(*calls)]

    texts = asyncio.run(main())
    assert texts[1] == texts[3] and texts[0] != texts[3]


@pytest.mark.parametrize("n", [1, 3])
def test_client_disconnect_mid_stream_frees_the_batch_row(live, n):
    engine = live.app.state.engine
    before = engine.stats()
    body = {"model": "theirs", "prompt": "hi", "max_tokens": 480, "temperature": 0, "stream": True, "n": n}
    # tenant "other": no max_tokens limit
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {live.keys['other']}"}, timeout=30) as h:
        with h.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
        # leaving the block closes the connection mid-stream
    for _ in range(300):
        if engine.stats()["active"] == 0:
            break
        time.sleep(0.01)
    after = engine.stats()
    assert after["active"] == 0 and after["requests"] == before["requests"] + n  # every choice's row freed
    assert after["finished"] == before["finished"]  # cancelled, not run to max_tokens
    assert after["completion_tokens"] - before["completion_tokens"] < 480 * n
