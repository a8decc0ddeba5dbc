"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

Served as a translation of chat completions (service/openai_api.py), so both answer alike: the request becomes a
chat request (instructions → the system turn, input items → turns: messages, function_call items → the assistant's
tool calls, function_call_output items → tool results; function tools flattened; text.format → response_format;
max_output_tokens → max_completion_tokens), and the answer becomes output items (a message of output_text, then
function_call items), or, streamed, Responses' typed events (response.created, response.output_item.added,
response.output_text.delta, response.function_call_arguments.delta, …, response.completed or
response.incomplete). A response cut by max_output_tokens is `incomplete` with reason max_output_tokens.

`store` (default true, as OpenAI's) keeps the response and its conversation in this replica's memory, the newest
MAX_STORED of them: GET /v1/responses/{id} returns it and `previous_response_id` continues the conversation (the
previous instructions are not carried over, as in OpenAI's). A replica that did not answer it does not know it
(400 saying so): behind a load balancer without affinity, send the conversation as input instead.
Not supported (400 saying so): built-in tools (web search, files, …), reasoning settings, background mode,
`include`, top_logprobs, truncation "auto".
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.auth import TenantCaller
from service.errors import ApiError
from service import openai_api

MAX_STORED = 4096  # responses kept per replica for GET and previous_response_id (oldest forgotten first)

router = APIRouter(prefix="/v1", tags=["openai"])


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")  # annotations, logprobs of an output_text sent back

    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="ignore")  # id, status of an output message sent back

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    call_id: str
    output: str


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = Field(description="function tools only; built-in tools are not served here")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")  # verbosity

    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    """What /v1/responses takes; unknown fields are refused (400), as OpenAI refuses them."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="an adapter id, or the base model's name (see GET /v1/models)")
    input: str | list[MessageItem | FunctionCallItem | FunctionCallOutputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None  # vLLM's extra
    stream: bool | None = False
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    previous_response_id: str | None = None
    store: bool | None = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: str | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    background: bool | None = None
    service_tier: str | None = None  # accepted, ignored

    def unsupported(self) -> tuple[str, str] | None:
        if self.truncation not in (None, "disabled"):
            return "truncation", "only truncation 'disabled' is supported: a conversation over the context is refused"
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            return "reasoning", "this model does not reason: drop reasoning"
        if self.include:
            return "include", "include is not supported"
        if self.top_logprobs:
            return "top_logprobs", "top_logprobs is not supported on /v1/responses; use /v1/chat/completions"
        if self.background:
            return "background", "background mode is not supported"
        return None


class StoredResponses:
    """Responses kept for GET and previous_response_id: (tenant, response, conversation) by id, newest MAX_STORED."""

    def __init__(self, limit: int = MAX_STORED) -> None:
        self._items: OrderedDict[str, tuple[str, dict[str, Any], list[dict[str, Any]]]] = OrderedDict()
        self._limit, self._lock = limit, threading.Lock()

    def put(self, tenant: str, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        with self._lock:
            self._items[response["id"]] = (tenant, response, conversation)
            while len(self._items) > self._limit:
                self._items.popitem(last=False)

    def get(self, tenant: str, rid: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        with self._lock:
            item = self._items.get(rid)
        return (item[1], item[2]) if item is not None and item[0] == tenant else None  # another tenant's: unknown

    def delete(self, tenant: str, rid: str) -> bool:
        with self._lock:
            if rid in self._items and self._items[rid][0] == tenant:
                del self._items[rid]
                return True
        return False


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, code, message, param=param)


def _turns(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The input items as chat messages: consecutive function calls become one assistant turn's tool calls."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    turns: list[dict[str, Any]] = []
    for item in body.input:
        if isinstance(item, MessageItem):
            turns.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            if turns and turns[-1]["role"] == "assistant" and turns[-1].get("tool_calls"):
                turns[-1]["tool_calls"].append(call)
            else:
                turns.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            turns.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return turns


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad("tool_choice", "tool_choice is 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": …}")


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    f = text.format if text is not None else None
    if f is None or f.type == "text":
        return None
    if f.type == "json_object":
        return {"type": "json_object"}
    if f.json_schema is None:
        raise _bad("text.format.schema", "a json_schema format needs its schema")
    spec = {"name": f.name or "response", "schema": f.json_schema, "strict": f.strict, "description": f.description}
    return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}


def _chat_request(body: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[openai_api.ChatCompletionRequest,
                                                                                  list[dict[str, Any]]]:
    """The chat request for `body` after `history` (a previous response's conversation), and the conversation it
    continues (without the instructions, which a later response does not inherit)."""
    conversation = history + _turns(body)
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + conversation
    raw: dict[str, Any] = {
        "model": body.model, "messages": messages, "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "stream": body.stream,
        "tool_choice": _tool_choice(body.tool_choice), "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body.text),
        "tools": [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)} for t in body.tools]
        if body.tools else None,
    }
    if body.stream:
        raw["stream_options"] = {"include_usage": True}
    try:
        return openai_api.ChatCompletionRequest.model_validate({k: v for k, v in raw.items() if v is not None}), conversation
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        raise _bad("input", f"{where}: {e['msg']}") from None


class _Translation:
    """Chat completion chunks in, Responses events out; the response object as it grows."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response, self.seq = response, 0
        self.message: int | None = None  # output index of the open message item
        self.calls: dict[int, int] = {}  # chat tool-call index → output index
        self.finish: str | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def _close_message(self) -> list[dict[str, Any]]:
        if self.message is None:
            return []
        i, self.message = self.message, None
        item = self.response["output"][i]
        part = item["content"][0]
        item["status"] = "completed"
        return [self._event("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                            text=part["text"], logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=i, content_index=0, part=part),
                self._event("response.output_item.done", output_index=i, item=item)]

    def opening(self) -> list[dict[str, Any]]:
        return [self._event("response.created", response=dict(self.response, output=[])),
                self._event("response.in_progress", response=dict(self.response, output=[]))]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if "error" in chunk:
            err = chunk["error"]
            return [self._event("error", code=err.get("code"), message=err.get("message"), param=err.get("param"))]
        if chunk.get("usage"):
            self.response["usage"] = _usage(chunk["usage"])
        out: list[dict[str, Any]] = []
        output = self.response["output"]
        for choice in chunk.get("choices", []):
            delta = choice.get("delta", {})
            if delta.get("content"):
                if self.message is None:
                    self.message = len(output)
                    output.append({"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "in_progress",
                                   "role": "assistant", "content": [{"type": "output_text", "text": "", "annotations": []}]})
                    item = output[self.message]
                    out += [self._event("response.output_item.added", output_index=self.message, item=_copy(item)),
                            self._event("response.content_part.added", item_id=item["id"], output_index=self.message,
                                        content_index=0, part={"type": "output_text", "text": "", "annotations": []})]
                item = output[self.message]
                item["content"][0]["text"] += delta["content"]
                out.append(self._event("response.output_text.delta", item_id=item["id"], output_index=self.message,
                                       content_index=0, delta=delta["content"], logprobs=[]))
            for tc in delta.get("tool_calls") or []:
                if tc["index"] not in self.calls:
                    out += self._close_message()
                    self.calls[tc["index"]] = len(output)
                    output.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": tc.get("id") or "",
                                   "name": tc.get("function", {}).get("name") or "", "arguments": "", "status": "in_progress"})
                    out.append(self._event("response.output_item.added", output_index=self.calls[tc["index"]],
                                           item=_copy(output[self.calls[tc["index"]]])))
                i = self.calls[tc["index"]]
                piece = (tc.get("function") or {}).get("arguments") or ""
                if piece:
                    output[i]["arguments"] += piece
                    out.append(self._event("response.function_call_arguments.delta", item_id=output[i]["id"],
                                           output_index=i, delta=piece))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return out

    def closing(self) -> list[dict[str, Any]]:
        out = self._close_message()
        for i in self.calls.values():
            item = self.response["output"][i]
            item["status"] = "completed"
            out += [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                arguments=item["arguments"]),
                    self._event("response.output_item.done", output_index=i, item=item)]
        _finish(self.response, self.finish)
        kind = "response.incomplete" if self.response["status"] == "incomplete" else "response.completed"
        return out + [self._event(kind, response=self.response)]


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(item))  # an event's snapshot, not the item that keeps growing


def _usage(u: dict[str, Any]) -> dict[str, Any]:
    return {"input_tokens": u["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": u.get("prompt_tokens_details", {}).get("cached_tokens", 0),
                                     "cache_write_tokens": 0},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"]}


def _finish(response: dict[str, Any], finish: str | None) -> None:
    cut = finish == "length"
    response["status"] = "incomplete" if cut else "completed"
    response["incomplete_details"] = {"reason": "max_output_tokens"} if cut else None
    response["completed_at"] = None if cut else time.time()
    for item in response["output"]:
        if item["status"] == "in_progress":
            item["status"] = "incomplete" if cut else "completed"


def _skeleton(body: ResponsesRequest, rid: str) -> dict[str, Any]:
    return {
        "id": rid, "object": "response", "created_at": time.time(), "status": "in_progress", "error": None,
        "incomplete_details": None, "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "model": body.model, "output": [], "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "reasoning": None, "store": body.store is not False,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)}
        if body.text and body.text.format else {"format": {"type": "text"}},
        "tool_choice": body.tool_choice or "auto", "tools": [t.model_dump() for t in body.tools or []],
        "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled", "usage": None,
        "user": body.user, "metadata": body.metadata or {},
    }


def _assistant_turn(response: dict[str, Any]) -> dict[str, Any]:
    """The response's output as the assistant's chat turn, for the conversation a later response continues."""
    text = "".join(p["text"] for it in response["output"] if it["type"] == "message" for p in it["content"])
    calls = [{"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}}
             for it in response["output"] if it["type"] == "function_call"]
    return {"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}


def _stored(request: Request) -> StoredResponses:
    st = request.app.state
    if getattr(st, "responses", None) is None:
        st.responses = StoredResponses()
    return st.responses


@router.post("/responses", summary="OpenAI's Responses API, served as a translation of chat completions")
async def create_response(request: Request, body: ResponsesRequest, caller: TenantCaller) -> Any:
    problem = body.unsupported()
    if problem is not None:
        raise _bad(problem[0], problem[1], "unsupported_parameter")
    stored = _stored(request)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = stored.get(caller.tenant, body.previous_response_id)
        if previous is None:
            raise _bad("previous_response_id", f"no stored response {body.previous_response_id!r} on this server (it "
                       "keeps the newest responses made with store: true, per replica); send the conversation as input")
        history = previous[1] + [_assistant_turn(previous[0])]
    chat_body, conversation = _chat_request(body, history)
    rid = f"resp_{uuid.uuid4().hex}"
    response = _skeleton(body, rid)
    answer = await openai_api.chat(request, chat_body, caller)

    def keep(final: dict[str, Any]) -> None:
        if body.store is not False:
            stored.put(caller.tenant, final, conversation)

    if body.stream:
        return _events(answer, _Translation(response), keep)
    if isinstance(answer, Response):  # the client left
        return answer
    (choice,) = answer["choices"]
    msg = choice["message"]
    if msg.get("content"):
        response["output"].append({"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "in_progress",
                                   "role": "assistant",
                                   "content": [{"type": "output_text", "text": msg["content"], "annotations": []}]})
    for call in msg.get("tool_calls") or []:
        response["output"].append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                                   "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                                   "status": "in_progress"})
    response["usage"] = _usage(answer["usage"])
    _finish(response, choice["finish_reason"])
    keep(response)
    return response


def _events(chunks: AsyncIterator[dict[str, Any]], tr: _Translation, keep: Any) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        try:
            for ev in tr.opening():
                yield _sse(ev)
            async for chunk in chunks:
                for ev in tr.feed(chunk):
                    yield _sse(ev)
                    if ev["type"] == "error":
                        return
            for ev in tr.closing():
                yield _sse(ev)
            keep(tr.response)
        finally:
            await chunks.aclose()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def _unknown(rid: str) -> ApiError:
    return ApiError(404, "not_found", f"no stored response {rid!r} on this server", param="response_id")


@router.get("/responses/{response_id}", summary="A stored response")
async def get_response(request: Request, response_id: str, caller: TenantCaller) -> dict[str, Any]:
    found = _stored(request).get(caller.tenant, response_id)
    if found is None:
        raise _unknown(response_id)
    return found[0]


@router.delete("/responses/{response_id}", summary="Forget a stored response")
async def delete_response(request: Request, response_id: str, caller: TenantCaller) -> dict[str, Any]:
    if not _stored(request).delete(caller.tenant, response_id):
        raise _unknown(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}
