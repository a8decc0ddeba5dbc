"""LoRA-XS (arXiv 2405.17604): a trainable r×r core R between frozen B = U_r and A = diag(σ_r) V_rᵀ.

ΔW = (α/r) U_r R diag(σ_r) V_rᵀ; R starts at N(0, 1e-5²), so the delta is ~0 at init. Params: r².
"""
from __future__ import annotations

import torch

from svd_adapters.terms import DeltaTerms

NAME = "loraxs"
INIT_STD = 1e-5


def param_shapes(m: int, n: int, r: int) -> dict[str, tuple[int, ...]]:
    return {"R": (r, r)}


def init_params(U_r: torch.Tensor, S_r: torch.Tensor, Vh_r: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    r = S_r.shape[0]
    return {"R": torch.randn(r, r, generator=generator) * INIT_STD}


def reference_params(p: dict[str, torch.Tensor], U_r: torch.Tensor, S_r: torch.Tensor, Vh_r: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """R = 0, where ΔW = 0 (the init's ~1e-5 noise left out): what a merge measures each adapter's change from."""
    return {"R": torch.zeros_like(p["R"])}


ALPHA_SCALED = "R"  # ΔW is linear in (α/r)·R: a merge folds α/r into R so adapters of different α combine


def terms(p: dict[str, torch.Tensor], U_r: torch.Tensor, S_r: torch.Tensor, Vh_r: torch.Tensor, alpha: float) -> DeltaTerms:
    r = S_r.shape[-1]
    return DeltaTerms(rank=r, C=(alpha / r) * p["R"] * S_r[..., None, :])
