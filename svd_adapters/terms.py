"""The one delta form every method is served and trained through.

For a frozen base linear W (m×n) with top-r SVD factors U_r, σ_r, V_r and shared projection h = V_rᵀx:

    Δy = o ⊙ (U_r (C h)) + U_r (d ⊙ h) + B (A x)

- core part   (C: r×r, o: m, d: r): OSoRA (C = diag S, o = O, d = −σ_r) and LoRA-XS (C = (α/r) R diag σ_r).
- low-rank part (A: k×n, B: m×k): plain LoRA (k = r) and SORSA (k = r: its principal factors; its frozen
  −U_r σ_r V_rᵀ is the d-term, d = −σ_r, with no C).

Each method only maps its trainable tensors to `DeltaTerms`; merge, training forward and the batched
serving forward are written once, here and in `batched_linear.py`. Methods' `terms` broadcast over leading
dims, so the serving path builds the terms of every layer of a module kind in one call (layers stacked).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DeltaTerms:
    rank: int  # r: how many leading singular pairs the core part uses
    C: torch.Tensor | None = None  # r×r
    o: torch.Tensor | None = None  # m
    d: torch.Tensor | None = None  # r
    A: torch.Tensor | None = None  # k×n
    B: torch.Tensor | None = None  # m×k
    diagonal: bool = False  # C is diagonal by construction (OSoRA's diag S): the CPU kernels read its diagonal only

    @property
    def has_core(self) -> bool:
        return self.C is not None or self.d is not None


def delta_weight(terms: DeltaTerms, U: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """ΔW (m×n) = diag(o) U_r C V_rᵀ + U_r diag(d) V_rᵀ + B A, from the factors U (m×R), Vh (R×n)."""
    r = terms.rank
    U_r, Vh_r = U[:, :r].double(), Vh[:r].double()
    m, n = U.shape[0], Vh.shape[1]
    dw = torch.zeros(m, n, dtype=torch.float64, device=U.device)
    if terms.C is not None:
        core = U_r @ terms.C.double() @ Vh_r
        dw += core * terms.o.double()[:, None] if terms.o is not None else core
    if terms.d is not None:
        dw += (U_r * terms.d.double()) @ Vh_r
    if terms.A is not None:
        dw += terms.B.double() @ terms.A.double()
    return dw


def delta_forward(x: torch.Tensor, terms: DeltaTerms, U: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """Δy for inputs x (..., n) with a single adapter; differentiable (the trainer's forward)."""
    r = terms.rank
    out = None
    if terms.has_core:
        h = x @ Vh[:r].T
        u = U[:, :r]
        if terms.C is not None:
            g = (h @ terms.C.T) @ u.T
            out = g * terms.o if terms.o is not None else g
        if terms.d is not None:
            sub = (h * terms.d) @ u.T
            out = sub if out is None else out + sub
    if terms.A is not None:
        lr = (x @ terms.A.T) @ terms.B.T
        out = lr if out is None else out + lr
    return out if out is not None else torch.zeros(*x.shape[:-1], U.shape[0], dtype=x.dtype, device=x.device)
