"""Single-adapter wrapping of an HF model's linears: used by the trainer and as the merge-free reference."""
from __future__ import annotations

import torch
from torch import nn

from svd_adapters.adapter import Adapter
from svd_adapters.factors import BaseFactors, ModuleFactors
from svd_adapters.methods import module_terms
from svd_adapters.terms import delta_forward, delta_weight


class AdaptedLinear(nn.Module):
    """y = W x (+ bias) + Δy(x), with Δy from the method's `DeltaTerms`; only the adapter tensors train."""

    def __init__(self, base: nn.Linear, factors: ModuleFactors, method: str, rank: int, alpha: float, params: dict[str, torch.Tensor]):
        super().__init__()
        self.base = base
        self.method, self.rank, self.alpha = method, rank, alpha
        self.register_buffer("U", factors.U[:, : max(rank, 1)].contiguous(), persistent=False)
        self.register_buffer("S", factors.S[: max(rank, 1)].contiguous(), persistent=False)
        self.register_buffer("Vh", factors.Vh[: max(rank, 1)].contiguous(), persistent=False)
        self.params = nn.ParameterDict({k: nn.Parameter(v.clone()) for k, v in params.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = ModuleFactors(self.U, self.S, self.Vh)
        terms = module_terms(self.method, dict(self.params), f, self.rank, self.alpha)
        return self.base(x) + delta_forward(x, terms, self.U, self.Vh).to(x.dtype)


def attach(model: nn.Module, adapter: Adapter, factors: BaseFactors) -> dict[str, AdaptedLinear]:
    """Replace each adapted linear with an AdaptedLinear holding a trainable copy of the adapter's tensors."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for name, params in adapter.params.items():
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if isinstance(base, AdaptedLinear):
            base = base.base
        mod = AdaptedLinear(base, factors.modules[name], adapter.method, adapter.rank, adapter.alpha, params)
        setattr(parent, child, mod)
        wrapped[name] = mod
    return wrapped


def detach(model: nn.Module) -> None:
    """Undo `attach`: put the untouched base linears back."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, AdaptedLinear):
            parent_name, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), child, mod.base)


def collect(adapter: Adapter, wrapped: dict[str, AdaptedLinear]) -> Adapter:
    """The adapter with the (trained) tensors read back from the wrapped modules."""
    params = {name: {k: v.detach().clone() for k, v in mod.params.items()} for name, mod in wrapped.items()}
    return Adapter(**{**adapter.__dict__, "params": params})


@torch.no_grad()
def merge_into(model: nn.Module, adapter: Adapter, factors: BaseFactors) -> None:
    """Fold the adapter into the model's weights in place (W ← W + ΔW): the reference for serving tests."""
    from svd_adapters.methods import merged_weight

    for name, params in adapter.params.items():
        lin = model.get_submodule(name)
        lin.weight.copy_(merged_weight(lin.weight, adapter.method, params, factors.modules[name], adapter.rank, adapter.alpha))


@torch.no_grad()
def merge_weighted_into(model: nn.Module, parts: list[tuple[Adapter, float]], factors: BaseFactors) -> None:
    """Fold several adapters, each scaled, into the model's weights in place (W ← W + Σ wᵢ ΔWᵢ, summed in float64
    and cast once): the reference for a linear merge."""
    names = {n for a, _ in parts for n in a.params}
    for name in names:
        lin = model.get_submodule(name)
        f = factors.modules[name]
        total = lin.weight.double()
        for a, w in parts:
            if name in a.params:
                total = total + w * delta_weight(module_terms(a.method, a.params[name], f, a.rank, a.alpha), f.U, f.Vh)
        lin.weight.copy_(total.to(lin.weight.dtype))
