"""The HTTP API: `create_app(settings)` builds the FastAPI app; its lifespan starts and stops the engine.

Endpoints: POST/GET /adapters, GET/DELETE /adapters/{id}, PUT/DELETE /adapters/{id}/pin, POST /generate, GET /health;
docs at /docs.
OpenAI-compatible /v1/... (service/openai_api.py); tenants, API keys and /admin/... (service/auth.py).
Everything blocking (store I/O, upload validation, tokenization, model loading) runs in a worker thread,
never on the event loop. Every error answers {"error": {"code", "message"}} (see service/errors.py).
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters_store import AdapterStore, open_store, validate_id
from adapters_store.base import AdapterExists
from adapters_store.records import ID_PATTERN
from adapters_store.peft_import import MAX_CONFIG_BYTES
from svd_adapters.threads import in_fresh_thread
from service import metrics as svc_metrics
from service import engine as eng
from service import logprobs as logprob_shapes
from service import adapter_intake, lora_modules, merge_requests, openai_api, responses_api, structured, tokenize_api
from service.auth import AuthMiddleware, TenantCaller, admin_router, build_auth, max_tokens_for
from service.config import Settings, resolve_device
from service.errors import ApiError, engine_error_body, error_response_for, not_ready, register_error_handlers, shutting_down
from service.merges import MergeSpec
from service.schemas import (
    AdapterCreated,
    AdapterInfo,
    AdapterList,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    PinState,
    StoreHealth,
    Usage,
)
from svd_adapters.base_model import BaseModel, load_base
from svd_adapters.factors import BaseFactors, load_or_compute
from svd_adapters.log import get_logger
from svd_adapters.methods import pool_of

log = get_logger(__name__)

# Multipart framing (boundaries, part headers, the adapter_id field) on top of the file itself.
UPLOAD_OVERHEAD_BYTES = 64 * 1024
ADAPTER_ID_PREFIX = "ad-"
CLIENT_CLOSED_REQUEST = 499  # logged for a client that disconnected before its answer (nobody receives it)
T = TypeVar("T")

EngineFactory = Callable[[BaseModel, BaseFactors, AdapterStore, "eng.EngineConfig"], "eng.Engine"]


def new_adapter_id() -> str:
    return f"{ADAPTER_ID_PREFIX}{secrets.token_hex(6)}"


def engine_config(settings: Settings) -> eng.EngineConfig:
    return eng.EngineConfig(
        max_batch=settings.max_batch,
        max_rank=settings.max_rank,
        max_seq_len=settings.max_seq_len,
        core_slots=settings.core_slots,
        lr_slots=settings.lr_slots,
        max_waiting=settings.max_waiting,
        prefix_cache_tokens=settings.prefix_cache_tokens,
        host_cache_bytes=settings.host_cache_mb << 20,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        fair_share=settings.fair_share,
        speculative=settings.speculative,
        device=resolve_device(settings.device),
        dtype=settings.dtype,
        cuda_graphs=settings.cuda_graphs,
        request_timeout=settings.request_timeout,
    )


def open_configured_store(settings: Settings) -> AdapterStore:
    if settings.store_is_redis:
        return open_store(settings.store, prefix=settings.redis_prefix)
    return open_store(settings.store)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse} for s in statuses}


class UploadSizeLimit:
    """Refuse a request body over its limit while it streams in, before it is read into memory or spooled.

    A Content-Length over the limit is answered at once; a body without one (chunked) is counted and cut off
    at the limit. POST `path` (and POST below it) may carry an adapter file of `max_file_bytes` plus multipart
    framing; any other request body at most `max_body_bytes` (None: not limited here).
    """

    def __init__(self, app: ASGIApp, path: str, max_file_bytes: int, max_body_bytes: int | None = None) -> None:
        self.app, self.path = app, path
        self.max_file_bytes = max_file_bytes
        self.max_body_bytes = max_body_bytes
        self.upload_limit = max_file_bytes + UPLOAD_OVERHEAD_BYTES

    def _is_upload(self, scope: Scope) -> bool:
        path = scope["path"].rstrip("/")
        return scope["method"] == "POST" and (path == self.path or path.startswith(self.path + "/"))

    def _too_large(self, size: int | None, upload: bool = True) -> ApiError:
        if not upload:
            got = f"this body is {size:,} bytes" if size is not None else "this body is larger than that"
            return ApiError(
                413, "too_large", f"this server accepts request bodies up to {self.max_body_bytes:,} bytes; {got}. "
                "Shorten the prompt or messages",
            )
        got = f"the upload is {size:,} bytes" if size is not None else "the upload is larger than that"
        return ApiError(
            413,
            "too_large",
            f"this server accepts adapter files up to {self.max_file_bytes:,} bytes; {got}. Use a smaller rank or "
            "fewer target_modules, or save in float16/bfloat16",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upload = scope["type"] == "http" and self._is_upload(scope)
        limit = self.upload_limit if upload else self.max_body_bytes
        if scope["type"] != "http" or limit is None:
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            err = self._too_large(int(length), upload)
            response = error_response_for(scope["path"], 413, err.code, err.message, {"Connection": "close"})  # /v1: OpenAI's shape
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._too_large(None, upload)  # an HTTPException: FastAPI lets it through body parsing
            return message

        await self.app(scope, limited_receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    base: BaseModel | None = None,
    factors: BaseFactors | None = None,
    store: AdapterStore | None = None,
    engine_factory: EngineFactory | None = None,
) -> FastAPI:
    """The app. `base`, `factors`, `store` are built from `settings` at startup unless given (tests, __main__).

    A given store stays open after shutdown (its owner closes it); one opened here is closed here.
    """
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st = app.state
        if st.base is None:
            log.info("loading base model %r", settings.base)
            st.base = await run_in_threadpool(in_fresh_thread, load_base, settings.base)
        if st.factors is None:
            where = Path(settings.factors_dir) if settings.factors_dir else st.base.cache_dir
            st.factors = await run_in_threadpool(in_fresh_thread, load_or_compute, st.base.model, where, settings.r_max)
        owns_store = st.store is None
        if owns_store:
            st.store = await run_in_threadpool(open_configured_store, settings)
        st.auth = await run_in_threadpool(build_auth, settings, st.store)  # tenants and keys live beside the adapters
        make = engine_factory or eng.Engine
        # Model and factor loads and the engine's build (its kernels' timing) on all cores, each in a thread that
        # then exits: only the engine thread may keep multi-core OpenMP workers (svd_adapters/threads.py).
        st.engine = await run_in_threadpool(in_fresh_thread, make, st.base, st.factors, st.store, engine_config(settings))
        st.metrics.attach(st.engine)  # engine observer: hooks run on the engine thread
        await run_in_threadpool(st.engine.start)
        log.info("serving %s (factors %s) with store %r", st.base.name, st.factors.fingerprint, st.store)
        try:
            if settings.lora_modules:  # vLLM's --lora-modules: validated and stored before the first request
                modules = lora_modules.parse_lora_modules(settings.lora_modules)
                await run_in_threadpool(lora_modules.import_modules, st, st.store, modules)
            yield
        finally:
            engine, st.engine = st.engine, None
            st.metrics.detach()
            await run_in_threadpool(engine.shutdown, True, settings.shutdown_timeout)
            auth, st.auth = st.auth, None
            auth.close()
            if owns_store:
                st.store.close()
                st.store = None

    app = FastAPI(
        title="svdserve",
        summary="Many tenants' tiny SVD-based adapters (OSoRA, LoRA-XS, SORSA, LoRA) on one resident base model",
        version="0.1.0",
        lifespan=lifespan,
        responses=_errors(422, 500),
    )
    app.state.settings = settings
    app.state.base, app.state.factors, app.state.store, app.state.engine = base, factors, store, None
    app.state.auth, app.state.started_at = None, time.time()
    register_error_handlers(app)
    app.add_middleware(
        UploadSizeLimit, path="/adapters", max_file_bytes=settings.max_upload_bytes, max_body_bytes=settings.max_request_bytes
    )
    app.add_middleware(AuthMiddleware)  # outside the size limit: an unauthenticated body is never read
    app.include_router(admin_router)
    app.include_router(openai_api.router)
    app.include_router(lora_modules.router)
    app.include_router(responses_api.router)
    app.include_router(tokenize_api.router)

    svc_metrics.install(app)  # GET /metrics; added after the other middleware, so it counts their answers too

    def running_engine(request: Request) -> eng.Engine:
        engine = request.app.state.engine
        if engine is None:
            raise not_ready()
        if not getattr(engine, "accepting", True):  # draining after SIGTERM: in-flight requests finish, new ones go elsewhere
            raise shutting_down()
        return engine

    def the_store(request: Request) -> AdapterStore:
        s = request.app.state.store
        if s is None:
            raise not_ready()
        return s

    def known_id(adapter_id: str) -> str:
        try:
            return validate_id(adapter_id)
        except ValueError:
            raise ApiError(404, "adapter_not_found", f"no adapter {adapter_id!r} (not a valid adapter id)") from None

    # --- adapters --------------------------------------------------------------------------------------------

    @app.post(
        "/adapters",
        status_code=201,
        response_model=AdapterCreated,
        responses=_errors(400, 409, 413, 503),
        tags=["adapters"],
        summary="Upload an adapter (the trainer's .safetensors file, or a PEFT LoRA with its config)",
    )
    async def upload_adapter(
        request: Request,
        caller: TenantCaller,
        file: Annotated[
            UploadFile,
            File(description="the adapter .safetensors file written by the trainer, or PEFT's adapter_model.safetensors"),
        ],
        adapter_id: Annotated[
            str | None, Form(description=f"id to store it under ({ID_PATTERN}); default: a new ad-<12 hex> id")
        ] = None,
        config: Annotated[
            UploadFile | None,
            File(description="only with a PEFT LoRA in `file`: its adapter_config.json (PEFT's save_pretrained output)"),
        ] = None,
    ) -> JSONResponse:
        """Validated completely (format, metadata, base fingerprint, shapes, finite values, fits this engine)
        before anything is written; 201 is answered only once the store holds it durably.

        With a `config` part, `file` is a PEFT LoRA: it is converted to an svdserve "lora" adapter (exactly the
        same delta; see adapters_store/peft_import.py for what is refused) and then validated and stored like
        any other upload."""
        store = the_store(request)
        running_engine(request)  # not started, or draining: refused before the file is read
        if adapter_id is None or adapter_id == "":
            adapter_id = new_adapter_id()
        try:
            validate_id(adapter_id)
        except ValueError as exc:
            raise ApiError(400, "invalid_adapter_id", str(exc)) from None
        try:
            blob = await file.read()
        finally:
            await file.close()
        peft_config: bytes | None = None
        if config is not None:
            try:
                peft_config = await config.read(MAX_CONFIG_BYTES + 1)  # over the cap: refused with a clear message
            finally:
                await config.close()
        st = request.app.state
        record, stored = await run_in_threadpool(adapter_intake.validated, st, blob, peft_config, adapter_id, caller.tenant)
        status = 201
        try:
            await run_in_threadpool(st.auth.put_for, store, caller, record, stored)  # the tenant's quota, then put
            log.info("stored adapter %s (%s, rank %d, %d bytes)", adapter_id, record.method, record.rank, record.size_bytes)
        except AdapterExists:
            # A retry of an upload whose answer was lost (e.g. a 503 after the write landed): the same tenant, id
            # and bytes are already durable, so the retry succeeds (200) instead of failing with 409.
            existing = await run_in_threadpool(store.get_record, adapter_id)
            if existing is None or existing.tenant != caller.tenant or existing.sha256 != record.sha256:
                raise
            record, status = existing, 200
        body = AdapterCreated.model_validate(record.model_dump(include=set(AdapterCreated.model_fields)))
        return JSONResponse(body.model_dump(), status_code=status, headers={"Location": f"/adapters/{adapter_id}"})

    @app.get("/adapters", response_model=AdapterList, responses=_errors(503), tags=["adapters"], summary="List adapters")
    async def list_adapters(request: Request, caller: TenantCaller) -> AdapterList:
        records = await run_in_threadpool(the_store(request).list, caller.tenant)
        return AdapterList(adapters=[AdapterInfo.from_record(r) for r in records], count=len(records))

    @app.get(
        "/adapters/{adapter_id}", response_model=AdapterInfo, responses=_errors(404, 503), tags=["adapters"], summary="One adapter"
    )
    async def get_adapter(request: Request, adapter_id: str, caller: TenantCaller) -> AdapterInfo:
        store = the_store(request)
        record = await run_in_threadpool(request.app.state.auth.owned_record, store, caller, known_id(adapter_id))
        if record is None:  # another tenant's adapter answers exactly like a nonexistent one
            raise ApiError(404, "adapter_not_found", f"no adapter {adapter_id!r}")
        return AdapterInfo.from_record(record)

    @app.delete(
        "/adapters/{adapter_id}", status_code=204, responses=_errors(404, 503), tags=["adapters"], summary="Delete an adapter"
    )
    async def delete_adapter(request: Request, adapter_id: str, caller: TenantCaller) -> Response:
        """Removed from the store, then from this replica's device cache (requests already running finish)."""
        if not await run_in_threadpool(adapter_intake.remove, request.app.state, the_store(request), caller.tenant,
                                       known_id(adapter_id)):
            raise ApiError(404, "adapter_not_found", f"no adapter {adapter_id!r}")
        return Response(status_code=204)

    @app.put("/adapters/{adapter_id}/pin", response_model=PinState, responses=_errors(404, 409, 503), tags=["adapters"],
             summary="Keep an adapter loaded on this replica (never evicted)")
    async def pin_adapter(request: Request, adapter_id: str, caller: TenantCaller) -> PinState:
        """Loads the adapter into a device slot now, if it is not there, and exempts it from LRU eviction on this
        replica until unpinned or deleted: its requests never wait for a cold load. At most half of a slot pool
        can be pinned (409 pin_limit beyond)."""
        return await set_pin(request, adapter_id, caller, True)

    @app.delete("/adapters/{adapter_id}/pin", response_model=PinState, responses=_errors(404, 503), tags=["adapters"],
                summary="Let a pinned adapter be evicted again")
    async def unpin_adapter(request: Request, adapter_id: str, caller: TenantCaller) -> PinState:
        return await set_pin(request, adapter_id, caller, False)

    async def set_pin(request: Request, adapter_id: str, caller: Any, pinned: bool) -> PinState:
        engine = running_engine(request)
        record = await run_in_threadpool(request.app.state.auth.owned_record, the_store(request), caller, known_id(adapter_id))
        if record is None:
            raise ApiError(404, "adapter_not_found", f"no adapter {adapter_id!r}")
        engine.pin(adapter_id, record.sha256, pool_of(record.method), pinned)
        log.info("%s adapter %s", "pinned" if pinned else "unpinned", adapter_id)
        return PinState(adapter_id=adapter_id, pinned=pinned)

    # --- generation ------------------------------------------------------------------------------------------

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        responses=_errors(400, 404, 429, 503),
        tags=["generation"],
        summary="Generate text with an adapter (or the base model when adapter_id is null)",
        response_description="the generation; with stream=true, text/event-stream events instead (see 'stream')",
    )
    async def generate(request: Request, body: GenerateRequest, caller: TenantCaller) -> GenerateResponse | Response:
        engine = running_engine(request)
        if body.max_tokens > settings.max_seq_len:
            raise ApiError(
                422, "validation_error", f"max_tokens: must be ≤ {settings.max_seq_len} (this server's max_seq_len)"
            )
        body.max_tokens = max_tokens_for(caller, body.max_tokens, explicit="max_tokens" in body.model_fields_set)
        target: str | MergeSpec | None = body.adapter_id
        allowed, version = (True, None) if body.adapter_id is None else await run_in_threadpool(
            request.app.state.auth.usable_version, the_store(request), caller, body.adapter_id
        )
        if body.merged_adapters is not None:
            target = await merge_requests.resolve(request, caller, body.merged_adapters, settings.max_rank)
        if not allowed:  # another tenant's adapter answers exactly like a nonexistent one
            raise ApiError(
                404, "adapter_not_found",
                f"adapter {body.adapter_id!r} not found; upload it with POST /adapters or list them with GET /adapters",
            )
        prompt_ids = await run_in_threadpool(engine.encode_prompt, body.prompt, body.chat(), body.raw)
        grammar = await structured.grammar_for(engine.grammars, body.constraint())
        params = eng.SamplingParams(
            max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop_list(),
            logprobs=body.logprobs, prompt_logprobs=body.prompt_logprobs, grammar=grammar,
            prefix_scope=body.prefix_scope(caller.tenant), tenant=caller.tenant,
            tenant_weight=caller.limits.weight or 1.0, **body.sampling_controls(),
            prediction=await engine.encode_prediction(body.prediction),
        )
        texts = logprob_shapes.token_texts(request)
        result_id = target.label if isinstance(target, MergeSpec) else target
        if body.stream:
            return await _stream_response(engine.stream(prompt_ids, target, params, version), result_id, texts)
        result = await _unless_disconnected(request, engine.generate(prompt_ids, target, params, version))
        if result is None:  # the client went away; its batch row is already freed
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return _response_of(result, result_id, texts)

    # --- health ----------------------------------------------------------------------------------------------

    @app.get("/health", response_model=HealthResponse, responses=_errors(503), tags=["service"], summary="Liveness and state")
    async def health(request: Request) -> HealthResponse:
        st = request.app.state
        engine = running_engine(request)
        store = the_store(request)
        store_ok = await run_in_threadpool(_ping, store)
        stats = await run_in_threadpool(engine.stats)
        return HealthResponse(
            status="ok" if store_ok else "degraded",
            base_model=st.base.name,
            factors_fingerprint=st.factors.fingerprint,
            device=str(getattr(getattr(engine, "config", None), "device", settings.device)),
            dtype=str(getattr(getattr(engine, "config", None), "dtype", settings.dtype)),
            store=StoreHealth(
                backend=_backend(store),
                location=_location(store),
                ok=store_ok,
            ),
            adapters_cached=_cached_count(stats),
            max_rank=settings.max_rank,
            max_seq_len=settings.max_seq_len,
            engine=_jsonable(stats),
        )

    return app


def _response_of(result: eng.GenerationResult, adapter_id: str | None, texts: logprob_shapes.TokenTexts) -> GenerateResponse:
    return GenerateResponse(
        text=result.text,
        adapter_id=adapter_id,
        finish_reason=result.finish_reason,
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
            cached_tokens=result.cached_tokens,
            accepted_prediction_tokens=result.accepted_prediction_tokens,
            rejected_prediction_tokens=result.rejected_prediction_tokens,
        ),
        logprobs=None if result.logprobs is None else logprob_shapes.native(result.logprobs, texts),
        prompt_logprobs=None if result.prompt_logprobs is None else logprob_shapes.native(result.prompt_logprobs, texts),
    )


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, cancelling it (None) if the client disconnects first, so its batch row is not wasted.

    The request body has been read already, so the next ASGI message can only be http.disconnect.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():  # cancelled because the client left
            return None
        raise  # this handler itself is being cancelled: pass it on
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def first_item(items: AsyncIterator[Any]) -> Any:
    """Await an engine stream's first item before answering: errors raised before any text keep their status."""
    try:
        return await items.__anext__()
    except StopAsyncIteration:
        raise ApiError(500, "engine_error", "the engine ended the stream without a result") from None


def _sse(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


async def _stream_response(items: AsyncIterator[Any], adapter_id: str | None, texts: logprob_shapes.TokenTexts) -> Response:
    """Server-sent events. The first item is awaited before answering, so errors that come before any text
    (queue full, unknown adapter, store down) still get their HTTP status; later ones become an 'error' event."""
    first = await first_item(items)

    async def events() -> AsyncIterator[bytes]:
        item = first
        try:
            while True:
                if isinstance(item, eng.GenerationResult):
                    yield _sse("done", _response_of(item, adapter_id, texts).model_dump_json())
                    return
                delta = {"text": item.text}
                if item.logprobs:
                    delta["logprobs"] = logprob_shapes.native(item.logprobs, texts)
                yield _sse("delta", json.dumps(delta, ensure_ascii=False))
                item = await items.__anext__()
        except eng.EngineError as exc:
            yield _sse("error", json.dumps(engine_error_body(exc), ensure_ascii=False))
        finally:
            await items.aclose()  # a disconnected client's row is freed at once

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _ping(store: AdapterStore) -> bool:
    try:
        return bool(store.ping())
    except Exception:  # a ping never fails the health check itself
        return False


def _backend(store: AdapterStore) -> str:
    return "redis" if type(store).__name__ == "RedisStore" else "disk"


def _location(store: AdapterStore) -> str:
    return str(getattr(store, "url", None) or getattr(store, "root", None) or repr(store))


def _cached_count(stats: dict[str, Any]) -> int | None:
    for key in ("adapters_cached", "cached_adapters", "cached"):
        value = stats.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, (list, dict, set, tuple)):
            return len(value)
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
