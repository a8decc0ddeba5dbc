"""OpenAI's Responses API through the official client (strict validation of every object and event), against a
live server on the tiny base: answers equal the chat completion of the same conversation, streams add up to the
answer, function calls and their outputs round-trip, stored responses continue conversations per tenant."""
from __future__ import annotations

import json

import openai
import pytest

from test_openai import client, http, live_server  # noqa: F401  (fixtures over `live`, defined here)


@pytest.fixture(scope="module")
def live(tiny_base, tiny_factors, make_blob, tmp_path_factory):
    """test_openai's live server (tenants acme and other, their adapters) with room for the tools' prompts."""
    yield from live_server(tiny_base, tiny_factors, make_blob, tmp_path_factory, max_seq_len=2048)

ADD = {"type": "function", "name": "add", "description": "Add two integers",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "required": ["a", "b"], "additionalProperties": False}}
CHAT_ADD = {"type": "function", "function": {k: v for k, v in ADD.items() if k != "type"}}


def chat_text(client, base: str, messages: list[dict], max_tokens: int, **kw) -> str:  # noqa: F811
    resp = client.chat.completions.create(model=base, messages=messages, max_completion_tokens=max_tokens,
                                          temperature=0, **kw)
    return resp.choices[0].message.content or ""


def test_an_answer_is_the_chat_completion_of_the_same_conversation(client, live):  # noqa: F811
    resp = client.responses.create(model=live.base_name, instructions="Be brief.", input="Name a colour.",
                                   max_output_tokens=12, temperature=0)
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == live.base_name
    ref = chat_text(client, live.base_name, [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Name a colour."}], 12)
    assert resp.output_text == ref and ref
    assert resp.usage.output_tokens <= 12 and resp.usage.input_tokens > 5
    if resp.usage.output_tokens == 12:  # cut by max_output_tokens, as OpenAI reports it
        assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    else:
        assert resp.status == "completed" and resp.incomplete_details is None
    adapted = client.responses.create(model="strong", input="Name a colour.", max_output_tokens=12, temperature=0)
    assert adapted.output_text != client.responses.create(model=live.base_name, input="Name a colour.",
                                                          max_output_tokens=12, temperature=0).output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="theirs", input="hi", max_output_tokens=2)  # another tenant's adapter


def test_a_stream_adds_up_to_the_answer(client, live):  # noqa: F811
    kw = dict(model=live.base_name, input=[{"role": "user", "content": "Name a colour."}], max_output_tokens=16,
              temperature=0)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == ("response.incomplete" if whole.status == "incomplete" else "response.completed")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 3 and "".join(deltas) == whole.output_text
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert done.text == whole.output_text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens


def test_function_calls_and_their_outputs_round_trip(client, live):  # noqa: F811
    base = live.base_name
    first = client.responses.create(model=base, input="What is 2 + 3?", tools=[ADD],
                                    tool_choice={"type": "function", "name": "add"}, max_output_tokens=60, temperature=0)
    (call,) = [o for o in first.output if o.type == "function_call"]
    args = json.loads(call.arguments)
    assert call.name == "add" and set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    ref = client.chat.completions.create(model=base, messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                         tools=[CHAT_ADD], tool_choice={"type": "function", "function": {"name": "add"}},
                                         max_completion_tokens=60, temperature=0)
    assert call.arguments == ref.choices[0].message.tool_calls[0].function.arguments

    events = list(client.responses.create(model=base, input="What is 2 + 3?", tools=[ADD], stream=True,
                                          tool_choice={"type": "function", "name": "add"}, max_output_tokens=60,
                                          temperature=0))
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (added,) = [e.item for e in events if e.type == "response.output_item.added"]
    assert added.type == "function_call" and added.name == "add" and added.call_id
    assert len(pieces) > 3 and "".join(pieces) == call.arguments
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == call.arguments

    # the tool's result, continuing the stored conversation: the same prompt as the whole history sent as input
    result = {"type": "function_call_output", "call_id": call.call_id, "output": str(args["a"] + args["b"])}
    follow = client.responses.create(model=base, previous_response_id=first.id, input=[result], tools=[ADD],
                                     tool_choice="none", max_output_tokens=8, temperature=0)
    explicit = client.responses.create(
        model=base, tools=[ADD], tool_choice="none", max_output_tokens=8, temperature=0,
        input=[{"role": "user", "content": "What is 2 + 3?"},
               {"type": "function_call", "call_id": call.call_id, "name": "add", "arguments": call.arguments}, result])
    assert follow.output_text == explicit.output_text and follow.usage.input_tokens == explicit.usage.input_tokens
    assert follow.usage.input_tokens > first.usage.input_tokens and follow.previous_response_id == first.id


def test_json_schema_format_holds_the_answer(client, live):  # noqa: F811
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}}, "required": ["colour"],
              "additionalProperties": False}
    resp = client.responses.create(model=live.base_name, input="Name a colour as JSON.", max_output_tokens=40,
                                   temperature=0, text={"format": {"type": "json_schema", "name": "c", "schema": schema}})
    assert resp.status == "completed" and set(json.loads(resp.output_text)) == {"colour"}


def test_stored_responses_are_the_callers(client, live):  # noqa: F811
    resp = client.responses.create(model=live.base_name, input="Hi", max_output_tokens=4, temperature=0)
    again = client.responses.retrieve(resp.id)
    assert again.id == resp.id and again.output_text == resp.output_text
    with openai.OpenAI(base_url=live.url + "/v1", api_key=live.keys["other"], max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(resp.id)
        with pytest.raises(openai.BadRequestError) as exc:  # nor continue it
            other.responses.create(model=live.base_name, previous_response_id=resp.id, input="and?", max_output_tokens=2)
        assert exc.value.body["param"] == "previous_response_id"
    unstored = client.responses.create(model=live.base_name, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)


@pytest.mark.parametrize("extra,param", [
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"truncation": "auto"}, "truncation"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
])
def test_what_is_not_served_is_refused_with_400(http, live, extra, param):  # noqa: F811
    resp = http.post("/v1/responses", json={"model": live.base_name, "input": "hi", "max_output_tokens": 2, **extra})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert param in (err["param"] or "") + err["message"], err
