"""A request's `merged_adapters` (POST /generate, and the /v1 routes as an extra) resolved to a `MergeSpec`: the
caller's adapters with their stored versions pinned, checked servable on this server before anything is fetched."""
from __future__ import annotations

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from service.auth import Caller
from service.errors import ApiError, not_ready
from service.merges import MergeSpec
from service.schemas import MergedAdapters
from svd_adapters.merge import check_mergeable


async def resolve(request: Request, caller: Caller, merged: MergedAdapters, max_rank: int) -> MergeSpec:
    """404 for an adapter the caller cannot use, 503 when the store is down, 400 saying why this server cannot
    serve the merge (methods or ranks the strategy cannot combine, more low-rank rows than a slot holds)."""
    state = request.app.state
    if state.store is None:
        raise not_ready()
    records = await run_in_threadpool(state.auth.usable_records, state.store, caller, merged.ids, "merged_adapters")
    try:
        check_mergeable([r.method for r in records], [r.rank for r in records], merged.options(), max_rank)
    except ValueError as exc:
        raise ApiError(400, "invalid_merge", f"merged_adapters: {exc}") from None
    return MergeSpec(tuple((r.adapter_id, r.sha256) for r in records), merged.resolved_weights(), merged.options())
