"""SORSA (arXiv 2409.00055): trainable principal factors U_p (m×r), S_p (r), V_p (n×r) over a frozen residual.

W' = W_res + U_p diag(S_p) V_pᵀ with W_res = W − U_r diag(σ_r) V_rᵀ; exactly W at init. Params: r(m+n+1).
ΔW = U_p diag(S_p) V_pᵀ − U_r diag(σ_r) V_rᵀ: a rank-r low-rank part (B = U_p diag(S_p), A = V_pᵀ), served per row
like LoRA, and the frozen subtraction as a core d-term (d = −σ_r), which reuses the shared projection h = V_rᵀx
instead of carrying V_r and U_r in every adapter's slot (half the bytes a decode step reads per SORSA row).
The orthonormal regularizer keeps U_p, V_p near orthonormal during training.
"""
from __future__ import annotations

import torch

from svd_adapters.terms import DeltaTerms

NAME = "sorsa"
GAMMA = 4e-4  # reference recipe: add grad of (γ / lr_peak)·R after clipping


def param_shapes(m: int, n: int, r: int) -> dict[str, tuple[int, ...]]:
    return {"U": (m, r), "S": (r,), "V": (n, r)}


def init_params(U_r: torch.Tensor, S_r: torch.Tensor, Vh_r: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    return {"U": U_r.clone(), "S": S_r.clone(), "V": Vh_r.T.contiguous()}


def reference_params(p: dict[str, torch.Tensor], U_r: torch.Tensor, S_r: torch.Tensor, Vh_r: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """The parameters where ΔW = 0 (the init): what a merge measures each adapter's change from."""
    return init_params(U_r, S_r, Vh_r)


ALPHA_SCALED = None  # no parameter is scaled by α/r


def terms(p: dict[str, torch.Tensor], U_r: torch.Tensor, S_r: torch.Tensor, Vh_r: torch.Tensor, alpha: float) -> DeltaTerms:
    return DeltaTerms(rank=S_r.shape[-1], A=p["V"].transpose(-1, -2), B=p["U"] * p["S"][..., None, :], d=-S_r)


def orthonormal_regularizer(params_by_module: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean over adapted layers of ‖U_pᵀU_p − I‖_F + ‖V_pᵀV_p − I‖_F (plain Frobenius norms)."""
    total = []
    for p in params_by_module:
        U, V = p["U"], p["V"]
        eye = torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
        total.append(torch.linalg.matrix_norm(U.T @ U - eye) + torch.linalg.matrix_norm(V.T @ V - eye))
    return torch.stack(total).mean()
