"""OpenAI-compatible API: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{model}]; the Responses
API is served over chat completions (service/responses_api.py).

`model` is an adapter id (one of the caller's), or the base model's name for no adapter. Requests and
responses follow OpenAI's shapes, so the official clients work unchanged (base_url=http://host:port/v1,
api_key=<tenant key>); errors come in OpenAI's error shape with OpenAI's statuses (see service/errors.py).

Supported: prompt (a string, or a list of one string; tokenized as is, no chat template), messages (chat
template applied; text content parts are joined), max_tokens / max_completion_tokens, temperature (default 1,
as OpenAI's), top_p, seed, stop, presence_penalty, frequency_penalty, logit_bias, vLLM's top_k, min_p,
repetition_penalty, stop_token_ids, ignore_eos, min_tokens and priority, response_format (json_object, json_schema) and
vLLM's guided_json / guided_regex / guided_choice (service/structured.py), logprobs (completions: 0–20
alternatives, with echo the prompt's tokens scored too — what evaluation harnesses ask for a likelihood; chat:
logprobs + top_logprobs), echo, n (each choice its own batch row; choice i seeded with seed + i), stream
(server-sent events, `data: [DONE]` at the end) with stream_options.include_usage; chat: tools, tool_choice
(none, auto, required, a named function) and parallel_tool_calls, tool calls and tool results in the history
(service/tool_calls.py). Parameters this server cannot honour (best_of > 1, suffix, …) are refused with 400
instead of being silently ignored; `user`,
`metadata`, `store` are accepted and ignored. svdserve's extra `merged_adapters` (as on POST /generate, with
`model` = the base model's name) serves a merge of the caller's adapters.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from adapters_store import AdapterStore
from service import engine as eng
from service.auth import Auth, Caller, TenantCaller, app_auth, max_tokens_for
from service.errors import ApiError, engine_error_status, not_ready, openai_error_body, shutting_down
from service import logprobs as logprob_shapes
from service import merge_requests, structured, tool_calls, tool_format
from service.merges import MergeSpec
from service.sampling import MAX_LOGPROBS
from service.schemas import MAX_PREDICTION_CHARS, MAX_STOP_CHARS, MAX_STOP_SEQUENCES, MergedAdapters, SamplingControls
from service.tool_calls import ToolCallIn, ToolDefinition
from svd_adapters.log import get_logger

log = get_logger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SEED_MODULUS = 1 << 63
OWNED_BY_BASE = "svdserve"


# --- request bodies ------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = None


class _Common(SamplingControls):
    """Parameters both endpoints share. Unknown fields are refused (400), as OpenAI refuses them."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="an adapter id, or the base model's name (see GET /v1/models)")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="default 1; 0 = greedy")
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None  # accepted, ignored
    metadata: dict[str, Any] | None = None  # accepted, ignored
    store: bool | None = None  # accepted, ignored
    merged_adapters: MergedAdapters | None = Field(
        default=None, description="svdserve's extra (as LoRAX's): with model = the base model's name, these adapters "
        "merged into one for this request")

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, why) for each parameter set to a value this server cannot honour."""
        out = []
        return out


MAX_COMPLETION_CHOICES = 128  # prompts × n in one /v1/completions request


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="the text, tokenized as is (no chat template); or several texts, or token ids (one list or "
                    "several), as OpenAI and vLLM take them: each prompt gets n choices, indexed prompt × n + choice")
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="top alternatives per token (0–20)")
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        prompts = self.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            out.append(("prompt", "prompt must be a non-empty string or token list, or a non-empty list of them"))
        elif len(prompts) * (self.n or 1) > MAX_COMPLETION_CHOICES:
            out.append(("prompt", f"{len(prompts)} prompts × n={self.n or 1} choices is over this server's "
                                  f"{MAX_COMPLETION_CHOICES} choices per request; split the request"))
        if self.echo and self.stream and self.logprobs is not None:
            out.append(("echo", "echo with logprobs is answered whole, not streamed; drop stream or logprobs"))
        if self.best_of not in (None, 1):
            out.append(("best_of", "only best_of=1 is supported"))
        if self.suffix:
            out.append(("suffix", "suffix (insertion) is not supported"))
        return out

    def prompts(self) -> list[str | list[int]]:
        """The prompts asked for: texts, or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, refusal, … on history turns are harmless

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = None


class PredictionIn(BaseModel):
    """OpenAI's Predicted Outputs: text the answer is expected to repeat (a file being edited)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["content"] = "content"
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessageIn] = Field(min_length=1)
    prediction: PredictionIn | None = Field(
        default=None, description="expected output: drafted and verified by speculative decoding (the answer is the "
        "same, sooner where it repeats the prediction); usage.completion_tokens_details counts its tokens kept")
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDefinition] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description="'none', 'auto' (the default with tools), 'required', or "
        "{'type': 'function', 'function': {'name': …}} (see service/tool_calls.py)")
    parallel_tool_calls: bool | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        if self.prediction is not None and len(self.prediction.text()) > MAX_PREDICTION_CHARS:
            out.append(("prediction", f"a prediction has at most {MAX_PREDICTION_CHARS} characters"))
        for i, m in enumerate(self.messages):
            if m.tool_calls and m.role != "assistant":
                out.append((f"messages[{i}].tool_calls", "only assistant turns carry tool_calls"))
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type != "text" or part.text is None:
                        out.append((f"messages[{i}].content[{j}]", f"content parts of type {part.type!r} are not supported (text only)"))
        return out

    def tool_plan(self) -> tool_calls.ToolPlan | None:
        """The tools and how the answer may call them (400 for bad ones); None without tools."""
        plan = tool_calls.ToolPlan.of(self.tools, self.tool_choice, self.parallel_tool_calls)
        if plan is not None and plan.mode in ("required", "named") and super().constraint() is not None:
            raise _bad("tool_choice", f"tool_choice {self.tool_choice!r} already holds the output to tool calls; "
                       "drop response_format / guided_*, or use tool_choice 'auto'")
        return plan

    def chat(self, plan: tool_calls.ToolPlan | None = None) -> list[dict[str, str]]:
        """Turns for the chat template: developer → system, text parts joined, null content → "", the tools,
        tool calls and tool results written in the format of service/tool_format.py."""
        turns = []
        for m in self.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text or "" for p in (m.content or []))
            calls = [c.model_dump() for c in m.tool_calls] if m.tool_calls else None
            turns.append({"role": "system" if m.role == "developer" else m.role, "content": content,
                          "tool_calls": calls})
        try:
            return tool_format.plain_turns(turns, plan.functions if plan is not None else None)
        except tool_format.ToolFormatError as exc:
            raise _bad("messages", str(exc)) from None


# --- helpers -------------------------------------------------------------------------------------------------


def _bad(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, code, message, param=param)


def _check(body: _Common) -> list[str]:
    """Refuse unsupported parameters; the stop list, validated."""
    problems = body.unsupported()
    if problems:
        param, why = problems[0]
        raise _bad(param, why, "unsupported_parameter")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise _bad("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
    for s in stops:
        if not s:
            raise _bad("stop", "stop sequences must be non-empty")
        if len(s) > MAX_STOP_CHARS:
            raise _bad("stop", f"a stop sequence has at most {MAX_STOP_CHARS} characters")
    return stops


def _model_not_found(model: str) -> ApiError:
    # The same answer for a nonexistent adapter and another tenant's: existence is never revealed.
    return ApiError(
        404, "model_not_found",
        f"The model `{model}` does not exist or you do not have access to it. GET /v1/models lists yours.",
        param="model",
    )


def _the(request: Request) -> tuple[eng.Engine, AdapterStore, Auth]:
    st = request.app.state
    if st.engine is None or st.store is None:
        raise not_ready()
    if not getattr(st.engine, "accepting", True):
        raise shutting_down()
    return st.engine, st.store, app_auth(request)


async def _adapter_of(request: Request, caller: Any, body: _Common) -> tuple[str | MergeSpec | None, str | None]:
    """(None, None) for the base model, else (the caller's adapter id, its stored version); 404 otherwise; a
    merge of the caller's adapters for merged_adapters."""
    model = body.model
    if body.merged_adapters is not None:
        if model != request.app.state.base.name:
            raise _bad("model", "with merged_adapters, model is the base model's name "
                       f"({request.app.state.base.name!r}); the adapters to merge go in merged_adapters.ids")
        engine, _, _ = _the(request)
        return await merge_requests.resolve(request, caller, body.merged_adapters, engine.config.max_rank), None
    _, store, auth = _the(request)
    if model == request.app.state.base.name:
        return None, None
    allowed, version = await run_in_threadpool(auth.usable_version, store, caller, model)
    if not allowed:
        raise _model_not_found(model)
    return model, version


def _params(body: _Common, stops: list[str], max_tokens: int, logprobs: int | None, grammar: str | None,
            caller: Caller) -> eng.SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0.0:  # nucleus of mass 0: the most likely token, i.e. greedy
        temperature, top_p = 0.0, 1.0
    seed = None if body.seed is None else body.seed % SEED_MODULUS
    return eng.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stops,
                              logprobs=logprobs, grammar=grammar, prefix_scope=body.prefix_scope(caller.tenant),
                              tenant=caller.tenant, tenant_weight=caller.limits.weight or 1.0,
                              **body.sampling_controls())


def _usage(results: list[eng.GenerationResult], n: int | None = None, predicted: bool = False) -> dict[str, Any]:
    """Prompts of n completions each (in that order): each prompt counted once, as OpenAI counts it; their tokens
    from the prefix cache in prompt_tokens_details.cached_tokens, as OpenAI reports its own prompt caching; with
    a prediction, its tokens kept and not in completion_tokens_details."""
    firsts = results[:: n or len(results)] if results else []
    prompt = sum(r.prompt_tokens for r in firsts)
    completion = sum(r.completion_tokens for r in results)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in firsts)}}
    if predicted:
        usage["completion_tokens_details"] = {
            "accepted_prediction_tokens": sum(r.accepted_prediction_tokens for r in results),
            "rejected_prediction_tokens": sum(r.rejected_prediction_tokens for r in results)}
    return usage


def _data(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def _choices(params: eng.SamplingParams, n: int) -> list[eng.SamplingParams]:
    """The n choices' parameters: choice i is seeded with seed + i, so a seeded request reproduces every choice."""
    if n == 1:
        return [params]
    return [replace(params, seed=None if params.seed is None else (params.seed + i) % SEED_MODULUS) for i in range(n)]


async def _all(works: list[Awaitable[Any]]) -> list[Any]:
    """Await every choice; the first failure cancels the others (freeing their batch rows) and is raised."""
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        return await asyncio.gather(*tasks)
    finally:
        await _cancel(tasks)


async def _cancel(tasks: list[asyncio.Future]) -> None:
    """Cancel the tasks still running and wait until they have stopped (their engine streams closed)."""
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def _run(request: Request, engine: eng.Engine, works: list[tuple[list[int], eng.SamplingParams]],
               adapter_id: str | None, version: str | None = None) -> list[eng.GenerationResult] | None:
    """Every (prompt ids, parameters) pair generated together; None if the client went away."""
    from service.app import _unless_disconnected  # service.app includes this router: import when first used

    generations = [engine.generate(ids, adapter_id, p, version) for ids, p in works]
    return await _unless_disconnected(request, _all(generations))


async def _merged(streams: list[AsyncIterator[Any]], firsts: list[Any]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, item) from every engine stream as items arrive, until each has given its result; an
    engine error from any of them is raised. Closing this closes every stream (their batch rows are freed)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, items: AsyncIterator[Any], first: Any) -> None:
        try:
            await queue.put((i, first))
            if not isinstance(first, eng.GenerationResult):
                async for item in items:
                    await queue.put((i, item))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts))]
    left = len(streams)
    try:
        while left:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, eng.GenerationResult):
                left -= 1
            yield i, item
    finally:
        await _cancel(tasks)
        for s in streams:
            await s.aclose()


async def _chunks(
    streams: list[AsyncIterator[eng.TextDelta | eng.GenerationResult]],
    opening: list[dict[str, Any]],
    chunk: Callable[[int, eng.TextDelta], dict[str, Any] | None],
    finished: Callable[[int, eng.GenerationResult], dict[str, Any]],
    closing: Callable[[list[eng.GenerationResult]], list[dict[str, Any]]],
) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed answer in OpenAI's shape, the n choices' interleaved as they come. Every choice's
    first engine item is awaited before this returns, so errors before any text (queue full, unknown adapter, store
    down) keep their HTTP status; a later error ends the chunks with an error body (`{"error": …}`). Closing the
    iterator (a client that hangs up) closes the engine streams, which frees their batch rows."""
    from service.app import first_item  # service.app includes this router: import when first used

    try:
        firsts = await _all([first_item(s) for s in streams])
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    items = _merged(streams, firsts)

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        results: list[eng.GenerationResult | None] = [None] * len(streams)
        try:
            for obj in opening:
                yield obj
            async for i, item in items:
                if isinstance(item, eng.GenerationResult):
                    results[i] = item
                    yield finished(i, item)
                elif item.text or item.logprobs:
                    obj = chunk(i, item)
                    if obj is not None:  # None: held back (a tool call's block not yet closed)
                        yield obj
            for obj in closing([r for r in results if r is not None]):
                yield obj
        except eng.EngineError as exc:
            status, code = engine_error_status(exc)
            yield openai_error_body(status, code, str(exc))
        finally:
            await items.aclose()

    return chunks()


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> Response:
    """Server-sent events of `_chunks`, `data: [DONE]` after the last unless it was an error (the OpenAI client
    raises it)."""

    async def events() -> AsyncIterator[bytes]:
        failed = False
        try:
            async for obj in chunks:
                failed = "error" in obj
                yield _data(obj)
            if not failed:
                yield DONE
        finally:
            await chunks.aclose()  # a client that hung up: its engine streams close now, not when collected

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


# --- routes --------------------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", tags=["openai"])
CLIENT_CLOSED_REQUEST = 499


@router.post("/completions", summary="OpenAI-compatible text completion (raw prompt, no chat template)")
async def completions(request: Request, body: CompletionRequest, caller: TenantCaller) -> Any:
    engine, _, auth = _the(request)
    stops = _check(body)
    prompts = body.prompts()
    n = body.n or 1
    auth.charge_choices(caller, n * len(prompts))
    adapter_id, version = await _adapter_of(request, caller, body)
    explicit = body.max_tokens is not None
    max_tokens = max_tokens_for(caller, body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS, explicit)
    encoded = [await run_in_threadpool(engine.encode_prompt, p, None, True) if isinstance(p, str) else p for p in prompts]
    grammar = await structured.grammar_for(engine.grammars, body.constraint())
    params = _params(body, stops, max_tokens, body.logprobs, grammar, caller)
    if body.echo and body.logprobs is not None:  # the echoed prompt's tokens are scored too
        params = replace(params, prompt_logprobs=body.logprobs)
    # choice i = prompt i // n, its (i % n)-th choice, as OpenAI and vLLM index them
    works = [(ids, p) for ids in encoded for p in _choices(params, n)]
    prompt_ids = [ids for ids, _ in works]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    fingerprint = request.app.state.factors.fingerprint
    texts = logprob_shapes.token_texts(request)
    if body.echo:
        shown = [p if isinstance(p, str) else await run_in_threadpool(engine.tokenizer.decode, p) for p in prompts]
        echoed = [shown[i // n] for i in range(len(works))]
    else:
        echoed = [""] * len(works)
    offsets = [len(e) for e in echoed]  # where each choice's next streamed tokens start in its text

    def choice(i: int, text: str, finish: str | None, entries: list[eng.TokenLogprob] | None = None,
               prompt_entries: list[eng.TokenLogprob | None] | None = None) -> dict[str, Any]:
        lp = None
        if entries is not None and body.logprobs is not None:
            if prompt_entries is not None:  # echo: the prompt's tokens first, from the text's start
                lp = logprob_shapes.completion(entries, texts, 0, prompt_ids[i], prompt_entries)
            else:
                lp = logprob_shapes.completion(entries, texts, offsets[i])
                offsets[i] += sum(len(t) for t in lp["tokens"])
        return {"index": i, "text": text, "finish_reason": finish, "logprobs": lp}

    def envelope(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "system_fingerprint": fingerprint, "choices": choices, **extra}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        streams = [engine.stream(ids, adapter_id, p, version) for ids, p in works]
        opening = [envelope([choice(i, echoed[i], None)]) for i in range(len(works))] if body.echo else []
        return _sse(await _chunks(
            streams, opening,
            lambda i, d: envelope([choice(i, d.text, None, d.logprobs)]),
            lambda i, result: envelope([choice(i, "", result.finish_reason)]),
            lambda results: [envelope([], usage=_usage(results, n))] if include_usage else [],
        ))
    results = await _run(request, engine, works, adapter_id, version)
    if results is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return envelope([choice(i, echoed[i] + r.text, r.finish_reason, r.logprobs, r.prompt_logprobs)
                     for i, r in enumerate(results)], usage=_usage(results, n))


@router.post("/chat/completions", summary="OpenAI-compatible chat completion (the base model's chat template)")
async def chat_completions(request: Request, body: ChatCompletionRequest, caller: TenantCaller) -> Any:
    answer = await chat(request, body, caller)
    return _sse(answer) if body.stream else answer


async def chat(request: Request, body: ChatCompletionRequest, caller: Caller) -> Any:
    """A chat completion: the chat.completion object, or with `stream` its chunks (`_chunks`), or a 499 Response
    for a client that left; what /v1/chat/completions answers and /v1/responses translates."""
    engine, _, auth = _the(request)
    stops = _check(body)
    auth.charge_choices(caller, body.n or 1)
    plan = body.tool_plan()
    adapter_id, version = await _adapter_of(request, caller, body)
    prompt_ids = await run_in_threadpool(engine.encode_prompt, None, body.chat(plan), False)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if requested is None:  # OpenAI's default: as much as the context allows
        max_tokens = max_tokens_for(caller, max(1, engine.config.max_seq_len - len(prompt_ids)), explicit=False)
    else:
        max_tokens = max_tokens_for(caller, requested, explicit=True, param=param)
    # a response_format or guided_* asked for beside tool_choice "auto" holds the whole answer instead; where the
    # tools' own grammar holds it, calls are well formed and stream piece by piece
    asked = body.constraint()
    held = plan.constraint() if plan is not None and asked is None else None
    incremental = held is not None
    grammar = await structured.grammar_for(engine.grammars, asked or held)
    params = _params(body, stops, max_tokens, (body.top_logprobs or 0) if body.logprobs else None, grammar, caller)
    if body.prediction is not None:
        params.prediction = await engine.encode_prediction(body.prediction.text())
    predicted = body.prediction is not None
    choices = _choices(params, body.n or 1)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    fingerprint = request.app.state.factors.fingerprint
    texts = logprob_shapes.token_texts(request)

    def logprobs(entries: list[eng.TokenLogprob] | None) -> dict[str, Any] | None:
        return logprob_shapes.chat(entries, texts) if body.logprobs and entries is not None else None

    def envelope(obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": obj, "created": created, "model": body.model,
                "system_fingerprint": fingerprint, "choices": choices, **extra}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def delta(i: int, d: dict[str, Any], finish: str | None = None,
                  entries: list[eng.TokenLogprob] | None = None) -> dict[str, Any]:
            return envelope("chat.completion.chunk",
                            [{"index": i, "delta": d, "finish_reason": finish, "logprobs": logprobs(entries)}])

        streams = [engine.stream(prompt_ids, adapter_id, p, version) for p in choices]
        # with tools read as calls: content as it can be shown, calls as they are written
        readers = ([tool_calls.StreamedChoice(incremental) for _ in choices]
                   if plan is not None and plan.reads_calls else None)

        def chunk(i: int, d: eng.TextDelta) -> dict[str, Any] | None:
            if readers is None:
                return delta(i, {"content": d.text}, None, d.logprobs)
            sent = readers[i].feed(d.text, d.logprobs)
            return None if sent is None else delta(i, sent[0], None, sent[1])

        def finished(i: int, result: eng.GenerationResult) -> dict[str, Any]:
            if readers is None:
                return delta(i, {}, result.finish_reason)
            last, entries, reason = readers[i].finish(result.finish_reason)
            return delta(i, last, reason, entries if entries else None)

        return await _chunks(
            streams, [delta(i, {"role": "assistant", "content": ""}) for i in range(len(choices))], chunk, finished,
            lambda results: [envelope("chat.completion.chunk", [], usage=_usage(results, predicted=predicted))]
            if include_usage else [],
        )
    results = await _run(request, engine, [(prompt_ids, p) for p in choices], adapter_id, version)
    if results is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    out = []
    for i, r in enumerate(results):
        msg, reason = tool_calls.message(plan, r, incremental)
        out.append({"index": i, "message": msg, "finish_reason": reason, "logprobs": logprobs(r.logprobs)})
    return envelope("chat.completion", out, usage=_usage(results, predicted=predicted))


def _model_entry(model_id: str, created: float, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(created), "owned_by": owned_by}


@router.get("/models", summary="The base model and the caller's adapters, as OpenAI models")
async def list_models(request: Request, caller: TenantCaller) -> dict[str, Any]:
    _, store, _ = _the(request)
    records = await run_in_threadpool(store.list, caller.tenant)
    base = request.app.state.base.name
    data = [_model_entry(base, request.app.state.started_at, OWNED_BY_BASE)]
    data += [_model_entry(r.adapter_id, r.created_at, r.tenant) for r in records if r.adapter_id != base]
    return {"object": "list", "data": data}


@router.get("/models/{model:path}", summary="One model: the base model or one of the caller's adapters")
async def get_model(request: Request, model: str, caller: TenantCaller) -> dict[str, Any]:
    _, store, auth = _the(request)
    if model == request.app.state.base.name:
        return _model_entry(model, request.app.state.started_at, OWNED_BY_BASE)
    record = await run_in_threadpool(auth.owned_record, store, caller, model)
    if record is None:
        raise _model_not_found(model)
    return _model_entry(record.adapter_id, record.created_at, record.tenant)


__all__ = ["router", "CompletionRequest", "ChatCompletionRequest"]
