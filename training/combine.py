"""Several adapter files merged into one (`python -m training combine`): offline, what a request's
`merged_adapters` serves (PEFT's add_weighted_adapter, for these methods). The result is an ordinary adapter file
to upload: a merge used often is then loaded once like any adapter, with no merge work per cold load."""
from __future__ import annotations

import hashlib
from pathlib import Path

from adapters_store.format import adapter_to_bytes
from adapters_store.validate import load_adapter
from svd_adapters.base_model import load_base
from svd_adapters.factors import DEFAULT_R_MAX, load_or_compute
from svd_adapters.log import get_logger
from svd_adapters.merge import MergeOptions, merged_adapter

log = get_logger(__name__)


def combine_files(paths: list[Path], weights: list[float] | None, options: MergeOptions, base: str, out: Path,
                  seed: int | None = None, r_max: int = DEFAULT_R_MAX) -> dict:
    bm = load_base(base)
    factors = load_or_compute(bm.model, bm.cache_dir, r_max=r_max)
    adapters, digest = [], hashlib.sha256()
    for path in paths:  # fully validated, as an upload is: a foreign or corrupt file is a clear error
        blob = Path(path).read_bytes()
        digest.update(blob)
        try:
            adapters.append(load_adapter(blob, factors, base_model_name=bm.name))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if seed is None:  # DARE's drop from the inputs: the same files and settings give the same file
        seed = int(digest.hexdigest()[:15], 16)
    adapter = merged_adapter(adapters, weights, options, factors, seed=seed)
    blob = adapter_to_bytes(adapter)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(out)  # never a half-written adapter file
    log.info("combined %d adapters (%s) into a %s adapter of rank %d → %s", len(adapters), options.strategy,
             adapter.method, adapter.rank, out)
    return {"sources": [str(p) for p in paths], "weights": weights, "strategy": options.strategy,
            "method": adapter.method, "rank": adapter.rank, "trainable_params": adapter.trainable_params(),
            "bytes": len(blob), "out": str(out)}
