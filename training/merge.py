"""Export: an adapter merged into its base as a plain HF model directory (`python -m training merge`).

The result loads with `AutoModelForCausalLM.from_pretrained(out)` anywhere, with no svdserve code: W ← W + ΔW
for every adapted linear, computed in float64.
"""
from __future__ import annotations

from pathlib import Path

from adapters_store.validate import load_adapter
from svd_adapters.base_model import load_base
from svd_adapters.factors import DEFAULT_R_MAX, load_or_compute
from svd_adapters.inject import merge_into
from svd_adapters.log import get_logger

log = get_logger(__name__)


def merge_to_dir(adapter_path: str | Path, base: str, out: str | Path, r_max: int = DEFAULT_R_MAX) -> Path:
    bm = load_base(base)
    factors = load_or_compute(bm.model, bm.cache_dir, r_max=r_max)
    adapter = load_adapter(Path(adapter_path).read_bytes(), factors, base_model_name=bm.name)
    merge_into(bm.model, adapter, factors)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bm.model.save_pretrained(out)
    bm.tokenizer.save_pretrained(out)
    log.info("merged %s adapter (rank %d) into %s → %s", adapter.method, adapter.rank, bm.name, out)
    return out
