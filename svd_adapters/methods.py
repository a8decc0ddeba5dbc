"""Registry of adapter methods: each is a module exposing param_shapes / init_params / terms."""
from __future__ import annotations

import math
from types import ModuleType

import torch

from svd_adapters import lora, loraxs, osora, sorsa
from svd_adapters.factors import ModuleFactors
from svd_adapters.terms import DeltaTerms, delta_weight

METHODS: dict[str, ModuleType] = {m.NAME: m for m in (osora, loraxs, sorsa, lora)}
# Which slot pool of the batched forward serves a method (svd_adapters.batched_linear): r×r cores or low-rank A/B.
CORE_METHODS = ("osora", "loraxs")
LOWRANK_METHODS = ("sorsa", "lora")


def pool_of(method: str) -> str:
    return "core" if method in CORE_METHODS else "lr"


def get_method(name: str) -> ModuleType:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


def param_count(method: str, m: int, n: int, r: int) -> int:
    return sum(math.prod(s) for s in get_method(method).param_shapes(m, n, r).values())


def init_module(method: str, f: ModuleFactors, r: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    return get_method(method).init_params(*f.top(r), generator=generator)


def module_terms(method: str, params: dict[str, torch.Tensor], f: ModuleFactors, r: int, alpha: float) -> DeltaTerms:
    return get_method(method).terms(params, *f.top(r), alpha=alpha)


def merged_weight(W: torch.Tensor, method: str, params: dict[str, torch.Tensor], f: ModuleFactors, r: int, alpha: float) -> torch.Tensor:
    """W + ΔW, computed in float64 and returned in W's dtype."""
    dw = delta_weight(module_terms(method, params, f, r, alpha), f.U, f.Vh)
    return (W.double() + dw).to(W.dtype)
