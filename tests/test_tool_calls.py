"""Function calling: the text format (service/tool_format.py), and tools / tool_choice on /v1/chat/completions
through the app on the tiny base (service/tool_calls.py): grammar-held calls for "required" and a named
function, calls read back from free text for "auto", streamed and whole answers alike, bad input refused."""
from __future__ import annotations

import json
import random

import pytest

from adapters_store.disk import DiskStore
from service import tool_format as tf

WEATHER = {"name": "get_weather", "description": "The weather forecast for a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 12},
               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
               "required": ["city", "days"], "additionalProperties": False}}
ADD = {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": ADD}]
CHAT = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


# --- the text format -------------------------------------------------------------------------------------------


def test_plain_turns_write_tools_calls_and_results_into_the_chat():
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo, and 2 + 3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}},
            {"id": "c2", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        {"role": "tool", "tool_call_id": "c2", "content": "5"},
    ]
    turns = tf.plain_turns(history, [WEATHER, ADD])
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    system = turns[0]["content"]
    assert system.startswith("Be brief.\n\n") and "<tools>\n" in system
    listed = system.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line)["function"]["name"] for line in listed] == ["get_weather", "add"]
    assert turns[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}\n'
                                   '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>')
    assert turns[3]["content"] == "<tool_response>\nrain\n</tool_response>\n<tool_response>\n5\n</tool_response>"
    # without a system turn one is added; without tools the chat is untouched
    assert tf.plain_turns(CHAT, [ADD])[0]["role"] == "system"
    assert tf.plain_turns(CHAT, None) == CHAT
    # what the model writes is what parse reads back
    content, calls = tf.parse(turns[2]["content"])
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "days": 1}), ("add", {"a": 2, "b": 3})]


@pytest.mark.parametrize("call, message", [
    ({"function": {"name": "add", "arguments": "{a: 1}"}}, "not valid JSON"),
    ({"function": {"name": "add", "arguments": "[1]"}}, "must be a JSON object"),
    ({"name": "add"}, "a tool call is"),
])
def test_bad_history_calls_are_named(call, message):
    with pytest.raises(tf.ToolFormatError, match=message) as exc:
        tf.plain_turns([{"role": "assistant", "content": "", "tool_calls": [call]}], None)
    assert "messages[0].tool_calls[0]" in str(exc.value)


@pytest.mark.parametrize("tools, message", [
    ([], "non-empty list"),
    ([{"type": "retrieval"}], "only tools of type 'function'"),
    ([{"type": "function", "function": {"name": "bad name"}}], "is not a function name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "is not a function name"),
    ([{"type": "function", "function": ADD}, {"type": "function", "function": ADD}], "defined twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "must be a JSON schema"),
])
def test_bad_tools_are_refused_with_the_reason(tools, message):
    with pytest.raises(tf.ToolFormatError, match=message):
        tf.check_tools(tools)


CALL_A = tf.call_text("a", {"x": 1})
TEXTS = {
    "content only": ("Hello there.\n", "Hello there.", []),
    "content then calls": (f"Sure.\n{CALL_A}\n{tf.call_text('b', {})}", "Sure.", [("a", {"x": 1}), ("b", {})]),
    "calls only": (f"{CALL_A}\n", None, [("a", {"x": 1})]),
    "text after a call starts a new line": (f"One {CALL_A} two", "One\ntwo", [("a", {"x": 1})]),
    "a bad block stays text, spaces and all": ("x <tool_call>nope</tool_call> y", "x <tool_call>nope</tool_call> y", []),
    "arguments as a JSON string": ('<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>', None, [("a", {"x": 1})]),
    "spaces before the call's closing brace": ('<tool_call>{"name": "a", "arguments": {"x": {"y": 2}} }</tool_call>', None,
                                              [("a", {"x": {"y": 2}})]),
    "a block EOS cut before its closing tag": ('<tool_call>\n{"name": "a", "arguments": {}}\n', None, [("a", {})]),
    "a block max_tokens cut": ('ok <tool_call>\n{"name": "a", "argu', 'ok <tool_call>\n{"name": "a", "argu', []),
    "a lone tag prefix at the end": ("a <tool_c", "a <tool_c", []),
    "angle brackets that are not a tag": ("x < y <tool_cal> z", "x < y <tool_cal> z", []),
}


def streamed_in_pieces(text: str, incremental: bool, sizes: list[int], content: str | None):
    """(content, calls) as a CallStream fed text in pieces of these sizes gives them; checks on the way that what
    is shown is never taken back."""
    stream, shown, pieces = tf.CallStream(incremental), [], []
    at = 0
    for size in sizes:
        if at >= len(text):
            break
        piece, more = stream.feed(text[at:at + size])
        at += size
        shown.append(piece)
        pieces += more
        # nothing shown is ever part of a call: what is shown so far is a prefix of the final content
        assert (content or "").startswith("".join(shown))
    piece, more = stream.finish()
    return "".join(shown) + piece or None, tf.calls_of(pieces + more)


def splits(text: str, seed: str) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] * len(text)] + [[rng.randint(1, 6) for _ in range(len(text))] for _ in range(20)]


@pytest.mark.parametrize("incremental", [False, True])
@pytest.mark.parametrize("name", list(TEXTS))
def test_parse_and_every_split_of_the_stream_agree(name, incremental):
    text, content, calls = TEXTS[name]
    got_content, got_calls = tf.parse(text, incremental)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    for sizes in splits(text, name):
        assert streamed_in_pieces(text, incremental, sizes, content) == (content, got_calls)


def test_incremental_calls_stream_their_arguments_as_written():
    """Held by the server's grammar, a call starts once its name is written and its arguments follow piece by
    piece, never including the call's own closing brace; a call max_tokens cut stays a call with what it got."""
    call = tf.call_text("write", {"path": "a.py", "body": "def f():\n    return {'x': 1}\n"})
    stream = tf.CallStream(incremental=True)
    pieces = []
    for ch in call:
        pieces += stream.feed(ch)[1]
    pieces += stream.finish()[1]
    assert pieces[0] == tf.CallPiece(True, "write", "") and all(not p.start for p in pieces[1:])
    assert len(pieces) > 20  # the arguments came in many pieces, as generated
    (whole,) = tf.calls_of(pieces)
    assert whole == tf.parse(call, incremental=True)[1][0] == tf.parse(call)[1][0]
    assert json.loads(whole.arguments) == {"path": "a.py", "body": "def f():\n    return {'x': 1}\n"}
    cut = call[:call.index("return")]
    assert tf.parse(cut, incremental=True) == (None, [tf.ToolCall("write", cut.split('"arguments": ')[1])])
    assert tf.parse(cut) == (cut, [])  # read whole, a cut block stays text
    for sizes in splits(cut, "cut"):
        assert streamed_in_pieces(cut, True, sizes, None) == tf.parse(cut, incremental=True)


# --- the API ------------------------------------------------------------------------------------------------------


def ask(client, **body):
    return client.post("/v1/chat/completions", json={"model": "tiny-random-llama", "messages": CHAT, "max_tokens": 160,
                                                      "temperature": 0, **body})


async def streamed(client, pieces_seen: list | None = None, **body) -> tuple[str | None, list[tuple[str, str]], str]:
    """A streamed answer assembled as the OpenAI client does: content, (name, arguments) per call, finish; the
    number of tool-call deltas appended to pieces_seen."""
    content, calls, finish, pieces = "", {}, None, 0
    with_stream = {**body, "stream": True}
    resp = await ask(client, **with_stream)
    assert resp.status_code == 200, resp.text
    for line in resp.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        choice = json.loads(line[6:])["choices"][0]
        delta = choice["delta"]
        content += delta.get("content") or ""
        for tc in delta.get("tool_calls") or []:
            # a call's first delta carries its id, type and name; later ones more of its arguments (as OpenAI's)
            assert ("id" in tc) == (tc["index"] not in calls), tc
            entry = calls.setdefault(tc["index"], ["", ""])
            entry[0] += tc["function"].get("name") or ""
            entry[1] += tc["function"].get("arguments") or ""
            if "id" in tc:
                assert tc["id"].startswith("call_") and tc["type"] == "function"
            pieces += 1
        finish = choice["finish_reason"] or finish
    if pieces_seen is not None:
        pieces_seen.append(pieces)
    return content or None, [tuple(calls[i]) for i in sorted(calls)], finish


def check_weather(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "days"}, args
    assert isinstance(args["city"], str) and len(args["city"]) <= 12
    assert isinstance(args["days"], int) and 1 <= args["days"] <= 7


def check_add(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"a", "b"} and all(isinstance(v, int) and 0 <= v <= 99 for v in args.values()), args


@pytest.fixture
async def client(serve, tmp_path):
    store = DiskStore(tmp_path / "store")
    async with serve(store, max_seq_len=2048) as c:
        yield c
    store.close()


@pytest.mark.anyio
async def test_named_tool_choice_calls_that_function_with_valid_arguments(client):
    named = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    resp = await ask(client, **named)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    msg = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and msg["content"] is None
    assert len(msg["tool_calls"]) == 1 and msg["tool_calls"][0]["function"]["name"] == "get_weather"
    assert msg["tool_calls"][0]["id"].startswith("call_") and msg["tool_calls"][0]["type"] == "function"
    check_weather(msg["tool_calls"][0]["function"]["arguments"])
    # streamed: the same call (greedy), its name first and then its arguments in pieces as they were generated
    seen: list[int] = []
    assert await streamed(client, seen, **named) == (
        None, [("get_weather", msg["tool_calls"][0]["function"]["arguments"])], "tool_calls")
    assert seen[0] > 5


@pytest.mark.anyio
async def test_required_calls_one_of_the_tools_each_choice_and_one_call_without_parallel(client):
    checks = {"get_weather": check_weather, "add": check_add}
    seen = set()
    # sampled, 6 choices: every choice is one call or more, each to a tool, with arguments its schema allows (the
    # random model may go on calling until max_tokens cuts a call: its arguments then stop where they were cut, as
    # vLLM's do)
    resp = await ask(client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=7, n=6)
    assert resp.status_code == 200, resp.text
    for choice in resp.json()["choices"]:
        calls, content = choice["message"]["tool_calls"], choice["message"]["content"]
        assert content is None and calls
        if choice["finish_reason"] != "tool_calls":
            assert choice["finish_reason"] == "length"
            calls = calls[:-1]  # the cut one
        for call in calls:
            checks[call["function"]["name"]](call["function"]["arguments"])
            seen.add(call["function"]["name"])
    assert seen == {"get_weather", "add"}  # the grammar allows either: sampling reaches both
    # parallel_tool_calls false: exactly one call a choice
    resp = await ask(client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=7, n=6, parallel_tool_calls=False)
    assert all(len(c["message"]["tool_calls"]) == 1 for c in resp.json()["choices"])
    # streamed, greedy: what the whole answer says
    one = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    whole = (await ask(client, **one)).json()["choices"][0]["message"]["tool_calls"]
    content, calls, finish = await streamed(client, **one)
    assert (content, finish) == (None, "tool_calls")
    assert calls == [(c["function"]["name"], c["function"]["arguments"]) for c in whole]


@pytest.mark.anyio
async def test_auto_and_none_show_the_tools_and_read_calls_only_for_auto(client):
    auto = (await ask(client, tools=TOOLS)).json()
    none = (await ask(client, tools=TOOLS, tool_choice="none")).json()
    plain = (await ask(client)).json()
    # the tools are in the prompt either way (and not without them)
    assert auto["usage"]["prompt_tokens"] == none["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    # the random tiny model writes no call: auto's content is the text none answers, stripped as parse strips it
    text = none["choices"][0]["message"]["content"]
    assert auto["choices"][0]["message"]["content"] == (text.rstrip() or None)
    assert "tool_calls" not in auto["choices"][0]["message"]
    assert auto["choices"][0]["finish_reason"] == none["choices"][0]["finish_reason"]
    assert await streamed(client, tools=TOOLS) == (text.rstrip() or None, [], auto["choices"][0]["finish_reason"])


@pytest.mark.anyio
async def test_a_tool_conversation_is_served_in_the_format_it_is_written(client):
    history = CHAT + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "sunny"}'},
    ]
    resp = await ask(client, messages=history, tools=TOOLS, max_tokens=4)
    assert resp.status_code == 200, resp.text
    engine = client.app.state.engine
    expected = engine.encode_prompt(None, tf.plain_turns(history, [WEATHER, ADD]))
    assert resp.json()["usage"]["prompt_tokens"] == len(expected)
    text = engine.tokenizer.decode(expected)
    assert '<tool_response>\n{"forecast": "sunny"}\n</tool_response>' in text and '"arguments": {"city": "Paris"' in text


@pytest.mark.anyio
@pytest.mark.parametrize("body, param, message", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "is not 'none', 'auto', 'required'"),
    ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools[0].function.name", "should match pattern"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "'function'"),
    ({"tools": [{"type": "function", "function": ADD}] * 2}, "tools", "defined twice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": "add"}}, "tool_choice", "is not 'none', 'auto'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": 5}}}, "tool_choice", "is not 'none'"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [5]}, {"role": "user", "content": "hi"}]},
     "messages[0].tool_calls[0]", "valid dictionary"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "already holds the output"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nonsense"}}}}}],
      "tool_choice": "required"}, "tool_choice", "does not compile"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "{oops"}}]},
                   {"role": "user", "content": "hi"}]}, "messages", "not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "add"}}]}]}, "messages[0].tool_calls",
     "only assistant turns"),
])
async def test_bad_tools_answer_400_with_the_reason(client, body, param, message):
    resp = await ask(client, **body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and message in err["message"], err


# --- through the official client -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_client(tiny_base, tiny_factors, tmp_path_factory):
    import openai

    from service.app import create_app
    from service.config import Settings
    from test_openai import LiveServer

    store = DiskStore(tmp_path_factory.mktemp("tools-store"))
    settings = Settings(base="tiny", store=repr(store), device="cpu", max_batch=4, max_rank=8, max_seq_len=2048,
                        core_slots=4, lr_slots=2, max_waiting=16, shutdown_timeout=5.0)
    server = LiveServer(create_app(settings, base=tiny_base, factors=tiny_factors, store=store)).start()
    # strict: every response must validate against the client's own models of OpenAI's shapes
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60,
                       _strict_response_validation=True) as c:
        yield c
    server.stop()
    store.close()


def test_an_agent_loop_through_the_openai_client(openai_client):
    """Call → run the tool → send its result back → the next answer, as an agent framework drives it."""
    named = {"type": "function", "function": {"name": "add"}}
    resp = openai_client.chat.completions.create(model="tiny-random-llama", messages=CHAT, tools=TOOLS, tool_choice=named,
                                                 max_tokens=80, temperature=0)
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls" and msg.content is None
    (call,) = msg.tool_calls
    assert call.type == "function" and call.function.name == "add" and call.id.startswith("call_")
    check_add(call.function.arguments)
    args = json.loads(call.function.arguments)

    stream = openai_client.chat.completions.create(model="tiny-random-llama", messages=CHAT, tools=TOOLS,
                                                   tool_choice=named, max_tokens=80, temperature=0, stream=True)
    pieces = [tc for c in stream if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert {p.index for p in pieces} == {0} and pieces[0].id and pieces[0].function.name == "add"
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments and len(pieces) > 3

    history = CHAT + [msg.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": str(args["a"] + args["b"])}]
    follow = openai_client.chat.completions.create(model="tiny-random-llama", messages=history, tools=TOOLS,
                                                   tool_choice="none", max_tokens=8, temperature=0)
    assert follow.choices[0].message.tool_calls is None and follow.usage.prompt_tokens > resp.usage.prompt_tokens


@pytest.mark.anyio
async def test_parameters_with_their_own_definitions_as_pydantic_writes_them(client):
    """Nested models give a schema with $defs and "#/$defs/…" references; two tools may both define "Place"."""
    from pydantic import BaseModel as Model, Field

    class Place(Model):
        city: str = Field(max_length=10)

    class Trip(Model):
        start: Place
        end: Place

    class Place2(Model):  # another "Place", as a second tool would define it
        country: str = Field(max_length=10)

    class Visit(Model):
        where: Place2

    trip, visit = Trip.model_json_schema(), Visit.model_json_schema()
    visit["$defs"] = {"Place": visit["$defs"].pop("Place2")}
    visit["properties"]["where"]["$ref"] = "#/$defs/Place"
    assert "$defs" in trip and trip["properties"]["start"] == {"$ref": "#/$defs/Place"}
    tools = [{"type": "function", "function": {"name": "plan_trip", "parameters": trip}},
             {"type": "function", "function": {"name": "visit", "parameters": visit}}]
    for name, model in (("plan_trip", Trip), ("visit", Visit)):
        resp = await ask(client, tools=tools, tool_choice={"type": "function", "function": {"name": name}},
                         max_tokens=200)
        assert resp.status_code == 200, resp.text
        (call,) = resp.json()["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == name
        model.model_validate_json(call["function"]["arguments"])  # the arguments follow the nested models


@pytest.mark.anyio
async def test_streamed_calls_carry_every_tokens_logprobs(client):
    """Tokens held back while a call block is open still send their log-probabilities (with the call's delta)."""
    body = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "add"}}, "logprobs": True,
            "top_logprobs": 2, "stream": True, "stream_options": {"include_usage": True}}
    resp = await ask(client, **body)
    events = [json.loads(line[6:]) for line in resp.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    entries = [e for ev in events for c in ev["choices"] for e in (c.get("logprobs") or {}).get("content") or []]
    usage = events[-1]["usage"]
    assert len(entries) == usage["completion_tokens"] > 0 and all(len(e["top_logprobs"]) == 2 for e in entries)
    whole = (await ask(client, **{**body, "stream": False, "stream_options": None})).json()["choices"][0]
    assert [e["token"] for e in entries] == [e["token"] for e in whole["logprobs"]["content"]]


@pytest.mark.anyio
@pytest.mark.parametrize("parallel", [True, False])
async def test_auto_lets_the_model_write_freely_but_holds_an_opened_call_to_the_tools(client, parallel):
    """tool_choice auto's grammar, token by token on the served tokenizer: any text may end the answer, but once
    "<tool_call>" is written only a well-formed call of one of the tools may follow (without parallel calls,
    nothing after it)."""
    from service.tool_calls import ToolPlan

    engine = client.app.state.engine
    grammar = engine.grammars.compile(ToolPlan.of(TOOLS, "auto", parallel).constraint())
    eos = engine.tokenizer.eos_token_id

    def walk(text: str):
        """(the matcher after text, or None if a token of it was refused)"""
        m = engine.grammars.matcher(grammar)
        for tok in engine.tokenizer.encode(text, add_special_tokens=False):
            if not bool(m.allowed(engine.grammars.vocab_size)[tok // 32] >> (tok % 32) & 1):
                return None
            m.advance(tok)
        return m

    def may_end(m) -> bool:
        return bool(m.allowed(engine.grammars.vocab_size)[eos // 32] >> (eos % 32) & 1)

    call = tf.call_text("add", {"a": 2, "b": 3})
    assert may_end(walk("No call needed: 2 < 3, <b>bold</b>."))
    assert may_end(walk(f"Let me add them.\n{call}"))
    assert walk('<tool_call>\n{"name": "subtract"') is None  # not a tool
    assert walk('<tool_call>\n{"name": "add", "arguments": {"a": "two"') is None  # not its schema
    assert walk('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3, "c": 4') is None  # no extra keys
    assert walk("<tool_call>\nplain words") is None
    assert not may_end(walk('<tool_call>\n{"name": "add", "arguments": {"a": 2')) # an open call must close
    second = walk(f"{call}\n{tf.call_text('get_weather', {'city': 'Oslo', 'days': 2})}")
    assert (second is not None) == parallel
    assert (walk(f"{call} and some text after") is not None) == parallel
