"""Plain LoRA (the baseline, and what PEFT imports become): ΔW = (α/r) B A, A: r×n, B: m×r. Params: r(m+n).

Init as PEFT: A kaiming-uniform(a=√5), B zeros, so the delta is exactly zero at init.
"""
from __future__ import annotations

import math

import torch

from svd_adapters.terms import DeltaTerms

NAME = "lora"


def param_shapes(m: int, n: int, r: int) -> dict[str, tuple[int, ...]]:
    return {"A": (r, n), "B": (m, r)}


def init_params(U_r: torch.Tensor, S_r: torch.Tensor, Vh_r: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    r, n = Vh_r.shape
    bound = 1.0 / math.sqrt(n)  # kaiming_uniform with a=√5 on an (r, n) weight
    A = (torch.rand(r, n, generator=generator) * 2 - 1) * bound
    return {"A": A, "B": torch.zeros(U_r.shape[0], r)}


def reference_params(p: dict[str, torch.Tensor], U_r: torch.Tensor, S_r: torch.Tensor, Vh_r: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """A = B = 0: a merge takes both factors themselves as each adapter's change (as LoRAX merges LoRAs)."""
    return {k: torch.zeros_like(v) for k, v in p.items()}


ALPHA_SCALED = "B"  # ΔW = (α/r)·B·A: a merge folds α/r into B so adapters of different α combine


def terms(p: dict[str, torch.Tensor], U_r: torch.Tensor, S_r: torch.Tensor, Vh_r: torch.Tensor, alpha: float) -> DeltaTerms:
    r = p["A"].shape[-2]
    return DeltaTerms(rank=0, A=p["A"], B=p["B"] * (alpha / r))
