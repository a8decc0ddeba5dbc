"""Taking an adapter in and letting one go: what every way of adding one shares (POST /adapters, `--lora-modules` at
start-up, vLLM's /v1/load_lora_adapter) and what every way of removing one does (DELETE /adapters/{id},
/v1/unload_lora_adapter).

`validated` checks an adapter completely (format, metadata, base fingerprint, shapes, finite values, fits this
engine; a PEFT LoRA is converted first) and returns the record and the exact bytes to store; nothing is written.
Both functions block (validation, store I/O): call them from a worker thread.
"""
from __future__ import annotations

from typing import Any

from adapters_store import AdapterStore, record_for
from adapters_store.format import adapter_to_bytes
from adapters_store.peft_import import looks_like_peft, peft_to_adapter
from adapters_store.records import AdapterRecord
from adapters_store.validate import AdapterValidationError, load_adapter
from service.errors import ApiError
from svd_adapters.log import get_logger
from svd_adapters.threads import single_core

log = get_logger(__name__)


def validated(state: Any, blob: bytes, peft_config: bytes | None, adapter_id: str, tenant: str,
              config_hint: str = "the multipart part 'config' (file=adapter_model.safetensors, config=adapter_config.json)",
              ) -> tuple[AdapterRecord, bytes]:
    """The record and bytes to store for `blob` (the trainer's file, or with `peft_config` a PEFT LoRA's
    adapter_model.safetensors), validated against the app's base (`state`: app.state); `config_hint` says where a
    PEFT adapter's missing config goes. Raises AdapterValidationError or ApiError (4xx) saying what is wrong."""
    single_core()  # a worker thread: see svd_adapters/threads.py
    settings = state.settings
    data = blob
    if peft_config is not None:  # a PEFT LoRA: converted, then validated like any other upload
        converted = peft_to_adapter(blob, peft_config, state.factors, state.base.name, max_bytes=settings.max_upload_bytes)
        data = adapter_to_bytes(converted)
    # 2·max_rank is only an early bound (refused before tensors are decoded): LoRA may use up to 2·max_rank in the
    # low-rank pool; check_servable then applies this engine's exact per-method limit.
    try:
        adapter = load_adapter(data, state.factors, base_model_name=state.base.name, max_bytes=settings.max_upload_bytes,
                               max_rank=2 * settings.max_rank)
    except AdapterValidationError as exc:
        if peft_config is None and exc.code == "bad_metadata" and looks_like_peft(blob):
            raise AdapterValidationError(
                "peft_config_required", f"this is a PEFT adapter_model.safetensors; send its adapter_config.json too, as {config_hint}",
            ) from None
        if peft_config is not None and exc.code == "too_large":
            raise AdapterValidationError(
                "too_large",
                f"converted to svdserve's float32 format this PEFT adapter is {len(data):,} bytes, over this server's "
                f"limit of {settings.max_upload_bytes:,} bytes; use a smaller rank or fewer target_modules",
            ) from None
        raise
    try:
        state.engine.check_servable(adapter)
    except ValueError as exc:
        raise ApiError(400, "not_servable", str(exc)) from None
    return record_for(adapter, data, adapter_id, tenant=tenant), data


def remove(state: Any, store: AdapterStore, tenant: str, adapter_id: str) -> bool:
    """Delete `tenant`'s adapter from the store, then from this replica's device cache (requests already running
    finish). False when there is none (another tenant's counts as none: it is left alone)."""
    record = store.get_record(adapter_id)
    if record is not None and record.tenant != tenant:
        return False
    deleted = record is not None and store.delete(adapter_id)
    state.auth.remember_owner(adapter_id, None)
    if state.engine is not None:
        state.engine.evict(adapter_id)  # also when the store had no record: a stale cached copy must go
    if deleted:
        log.info("deleted adapter %s", adapter_id)
    return deleted
