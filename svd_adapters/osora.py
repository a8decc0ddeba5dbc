"""OSoRA (arXiv 2505.14350): trainable output scale O ∈ R^m (init ones) and singular values S ∈ R^r (init σ_r).

W' = W − U_r diag(σ_r) V_rᵀ + diag(O) U_r diag(S) V_rᵀ; exactly W at init. Params per matrix: m + r.
"""
from __future__ import annotations

import torch

from svd_adapters.terms import DeltaTerms

NAME = "osora"


def param_shapes(m: int, n: int, r: int) -> dict[str, tuple[int, ...]]:
    return {"O": (m,), "S": (r,)}


def init_params(U_r: torch.Tensor, S_r: torch.Tensor, Vh_r: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    return {"O": torch.ones(U_r.shape[0]), "S": S_r.clone()}


def reference_params(p: dict[str, torch.Tensor], U_r: torch.Tensor, S_r: torch.Tensor, Vh_r: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """The parameters where ΔW = 0 (the init): what a merge measures each adapter's change from."""
    return init_params(U_r, S_r, Vh_r)


ALPHA_SCALED = None  # no parameter is scaled by α/r


def terms(p: dict[str, torch.Tensor], U_r: torch.Tensor, S_r: torch.Tensor, Vh_r: torch.Tensor, alpha: float) -> DeltaTerms:
    return DeltaTerms(rank=S_r.shape[-1], C=torch.diag_embed(p["S"]), o=p["O"], d=-S_r, diagonal=True)
