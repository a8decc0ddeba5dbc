"""vLLM's ways of naming adapters on the server's disk, so a deployment moving from `vllm serve --enable-lora` keeps
its flags and calls:

- `--lora-modules name=path ...` (or vLLM's JSON form, '{"name": …, "path": …}'; svdserve also takes a "tenant"
  there): at start-up each path (`service/lora_paths.py`: a PEFT LoRA directory or an adapter .safetensors file) is
  validated like an upload and stored as adapter `name`, so requests reach it as `model: name` or
  `adapter_id: name`. Stored already with the same bytes: kept; with other bytes: replaced (the path is the
  operator's word for what `name` is). A module that does not validate stops the server from starting.
- POST /v1/load_lora_adapter {lora_name, lora_path, load_inplace} and POST /v1/unload_lora_adapter {lora_name}: the
  same at runtime, for the caller's tenant, only when the server runs with --allow-runtime-lora-updating (vLLM's
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=True works too). With API keys on, paths must lie inside --lora-path-roots (a
  tenant must not make the server read arbitrary files); without keys (one user) anywhere, as in vLLM.
Adapters live in the store, not in one process: a load is seen by every replica sharing the store, and an unload
deletes the adapter (as DELETE /adapters/{id}).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from adapters_store import AdapterStore
from adapters_store.records import check_id
from service import adapter_intake
from service.auth import TenantCaller
from service.errors import ApiError, not_ready, shutting_down
from service.lora_paths import PEFT_CONFIG, parse_roots, read_adapter
from service.schemas import AdapterCreated
from service.tenants import DEFAULT_TENANT
from svd_adapters.log import get_logger

log = get_logger(__name__)

CONFIG_HINT = f"the file {PEFT_CONFIG} beside it (PEFT's save_pretrained writes both)"


@dataclass(frozen=True)
class LoraModule:
    name: str
    path: str
    tenant: str = DEFAULT_TENANT


def parse_lora_modules(specs: list[str] | tuple[str, ...]) -> list[LoraModule]:
    """`--lora-modules` entries: `name=path`, or JSON {"name", "path", "tenant"?, "base_model_name"?} (vLLM's
    base_model_name is accepted and unused: every adapter here is served on the one base). Raises ValueError."""
    modules: list[LoraModule] = []
    for spec in specs:
        spec = spec.strip()
        if spec.startswith("{"):
            try:
                raw: Any = json.loads(spec)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--lora-modules {spec!r} is not valid JSON: {exc}") from None
            unknown = set(raw) - {"name", "path", "tenant", "base_model_name"} if isinstance(raw, dict) else set()
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("path"), str) \
                    or unknown or not isinstance(raw.get("tenant", DEFAULT_TENANT), str):
                raise ValueError(f"--lora-modules {spec!r}: give a JSON object with string fields name and path "
                                 f"(optional: tenant, base_model_name){f'; unknown: {sorted(unknown)}' if unknown else ''}")
            module = LoraModule(raw["name"], raw["path"], raw.get("tenant", DEFAULT_TENANT))
        else:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules {spec!r}: give name=path (or vLLM's JSON form)")
            module = LoraModule(name, path)
        check_id(module.name, "--lora-modules name")
        check_id(module.tenant, "--lora-modules tenant")
        if any(m.name == module.name for m in modules):
            raise ValueError(f"--lora-modules names {module.name!r} twice")
        modules.append(module)
    return modules


def import_modules(state: Any, store: AdapterStore, modules: list[LoraModule]) -> None:
    """Store every `--lora-modules` entry (see the module doc); blocking, at start-up. Raises RuntimeError saying
    which module failed and why."""
    for m in modules:
        try:
            files = read_adapter(m.path, state.settings.max_upload_bytes)
            record, data = adapter_intake.validated(state, files.weights, files.config, m.name, m.tenant, CONFIG_HINT)
        except (ApiError, ValueError) as exc:  # AdapterValidationError is a ValueError
            raise RuntimeError(f"--lora-modules {m.name}={m.path}: {getattr(exc, 'message', exc)}") from None
        existing = store.get_record(m.name)
        if existing is not None and existing.tenant != m.tenant:
            raise RuntimeError(f"--lora-modules {m.name}: that id is tenant {existing.tenant!r}'s adapter, not "
                               f"{m.tenant!r}'s; choose another name")
        if existing is not None and existing.sha256 == record.sha256:
            log.info("lora module %s: stored already with these bytes (%s)", m.name, files.source)
            continue
        store.put(record, data, overwrite=existing is not None)
        state.auth.remember_owner(m.name, m.tenant)
        if existing is not None:
            state.engine.evict(m.name)  # the old bytes must not be served from a device slot
        log.info("lora module %s: %s from %s (%s, rank %d, %d bytes)", m.name, "replaced" if existing else "stored",
                 files.source, record.method, record.rank, record.size_bytes)


router = APIRouter(prefix="/v1", tags=["openai"])


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(description="the adapter id to store it under; requests then name it as `model`")
    lora_path: str = Field(description="a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) or an "
                                       "adapter .safetensors file, on the server")
    load_inplace: bool = Field(False, description="replace an adapter of yours already stored under lora_name")


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_int_id: int | None = Field(None, description="vLLM's numeric id; accepted and unused (ids are names here)")


class LoraAdapterLoaded(AdapterCreated):
    message: str


class LoraAdapterUnloaded(BaseModel):
    message: str
    adapter_id: str


def _runtime_updates(request: Request) -> tuple[Any, AdapterStore]:
    """The app's state and store, if runtime updates are on and the server is serving; else the 4xx/503 saying so."""
    st = request.app.state
    if not st.settings.allow_runtime_lora_updating:
        raise ApiError(403, "runtime_lora_updating_off",
                       "loading adapters from server paths is off on this server: start it with "
                       "--allow-runtime-lora-updating (or SVDSERVE_ALLOW_RUNTIME_LORA_UPDATING=1), or upload the files "
                       "with POST /adapters")
    if st.engine is None or st.store is None:
        raise not_ready()
    if not getattr(st.engine, "accepting", True):
        raise shutting_down()
    return st, st.store


@router.post("/load_lora_adapter", response_model=LoraAdapterLoaded,
             summary="vLLM's runtime LoRA loading: store the adapter at a server path under a name")
async def load_lora_adapter(request: Request, body: LoadLoraAdapterRequest, caller: TenantCaller) -> LoraAdapterLoaded:
    st, store = _runtime_updates(request)
    try:
        name = check_id(body.lora_name, "lora_name")
    except ValueError as exc:
        raise ApiError(400, "invalid_adapter_id", str(exc), param="lora_name") from None
    settings = st.settings
    # With keys on, only inside the configured roots (none configured: no path is readable); one user: anywhere.
    roots = parse_roots(settings.lora_path_roots) if settings.lora_path_roots or settings.auth_enabled else None

    def load() -> LoraAdapterLoaded:
        files = read_adapter(body.lora_path, settings.max_upload_bytes, roots)
        record, data = adapter_intake.validated(st, files.weights, files.config, name, caller.tenant, CONFIG_HINT)
        existing = store.get_record(name)
        if existing is not None and not (body.load_inplace and existing.tenant == caller.tenant):
            raise ApiError(400, "adapter_exists", f"The lora adapter {name!r} has already been loaded; pass "
                           "load_inplace: true to replace it, or choose another lora_name", param="lora_name")
        if existing is None:
            st.auth.put_for(store, caller, record, data)  # within the tenant's adapter quota
        else:
            store.put(record, data, overwrite=True)
            st.engine.evict(name)
        log.info("%s adapter %s from %s (%s, rank %d)", "replaced" if existing else "loaded", name, files.source,
                 record.method, record.rank)
        fields = record.model_dump(include=set(AdapterCreated.model_fields))
        return LoraAdapterLoaded(message=f"Success: LoRA adapter '{name}' added successfully.", **fields)

    return await run_in_threadpool(load)


@router.post("/unload_lora_adapter", response_model=LoraAdapterUnloaded,
             summary="vLLM's runtime LoRA unloading: delete the adapter (as DELETE /adapters/{id})")
async def unload_lora_adapter(request: Request, body: UnloadLoraAdapterRequest, caller: TenantCaller) -> LoraAdapterUnloaded:
    st, store = _runtime_updates(request)
    missing = ApiError(404, "adapter_not_found", f"The lora adapter {body.lora_name!r} cannot be found.", param="lora_name")
    try:
        name = check_id(body.lora_name, "lora_name")
    except ValueError:
        raise missing from None
    if not await run_in_threadpool(adapter_intake.remove, st, store, caller.tenant, name):
        raise missing
    return LoraAdapterUnloaded(message=f"Success: LoRA adapter '{name}' removed successfully.", adapter_id=name)
