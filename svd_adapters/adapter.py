"""An adapter in memory: method, rank, alpha, and per-module trainable tensors tied to one base fingerprint."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch

from svd_adapters.factors import TARGET_MODULES, BaseFactors
from svd_adapters.methods import get_method, init_module, module_terms, param_count
from svd_adapters.terms import DeltaTerms


@dataclass
class Adapter:
    method: str
    rank: int
    alpha: float
    base_model: str
    base_fingerprint: str
    target_modules: tuple[str, ...] = TARGET_MODULES  # short names (q_proj, ...)
    params: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # qualified module name → tensors

    def trainable_params(self) -> int:
        return sum(t.numel() for p in self.params.values() for t in p.values())

    def expected_shapes(self, factors: BaseFactors) -> dict[str, dict[str, tuple[int, ...]]]:
        """Module → param → shape for this method, rank and targets on these factors (memoized: every upload
        and cold load validates against it; do not modify the result)."""
        def compute() -> dict[str, dict[str, tuple[int, ...]]]:
            method = get_method(self.method)
            return {name: method.param_shapes(*factors.modules[name].shape, self.rank)
                    for name in selected_modules(factors, self.target_modules)}

        return factors.memo(("expected_shapes", self.method, self.rank, tuple(self.target_modules)), compute)

    def terms(self, factors: BaseFactors) -> dict[str, LayerTerms]:
        """Serving form: per module kind (q_proj, ...), its layers and their `DeltaTerms` stacked on a leading
        layer dim, computed in one batched call per kind (an adapter load is ~7 small ops, not ~200)."""
        kinds: dict[str, list[str]] = {}
        for name in self.params:
            kinds.setdefault(name.rsplit(".", 1)[-1], []).append(name)
        method = get_method(self.method)
        out: dict[str, LayerTerms] = {}
        for kind, names in kinds.items():
            names.sort(key=layer_index)
            params = {k: torch.stack([self.params[n][k] for n in names]) for k in self.params[names[0]]}
            out[kind] = LayerTerms([layer_index(n) for n in names], method.terms(params, *factors.stacked(tuple(names), self.rank), alpha=self.alpha))
        return out

    def module_terms(self, factors: BaseFactors) -> dict[str, DeltaTerms]:
        """Per qualified module name, unstacked (merging, references)."""
        return {
            name: module_terms(self.method, p, factors.modules[name], self.rank, self.alpha)
            for name, p in self.params.items()
        }


@dataclass
class LayerTerms:
    layers: list[int]
    terms: DeltaTerms  # every tensor has a leading dim over `layers`


def slot_pool(terms: dict[str, LayerTerms]) -> str:
    """The slot pool serving these terms: "lr" when they carry low-rank factors (SORSA, LoRA, most merges), else
    "core" (OSoRA, LoRA-XS, a merge of LoRA-XS adapters)."""
    return "lr" if any(lt.terms.A is not None for lt in terms.values()) else "core"


_LAYER = re.compile(r"\.layers\.(\d+)\.")


@functools.lru_cache(maxsize=1 << 16)  # the same few hundred module names, for every adapter loaded
def layer_index(name: str) -> int:
    found = _LAYER.search(name)
    if found is None:
        raise ValueError(f"module {name!r} has no '.layers.N.' part; only decoder-layer linears are adapted")
    return int(found.group(1))


def selected_modules(factors: BaseFactors, target_modules: tuple[str, ...]) -> list[str]:
    return [name for name in factors.modules if name.rsplit(".", 1)[-1] in target_modules]


def new_adapter(
    method: str,
    rank: int,
    factors: BaseFactors,
    base_model: str,
    alpha: float | None = None,
    target_modules: tuple[str, ...] = TARGET_MODULES,
    seed: int = 0,
) -> Adapter:
    """A freshly initialised adapter (zero or ~zero delta), as the trainer starts from."""
    get_method(method)
    if method != "lora" and rank > factors.r_max:
        raise ValueError(f"rank {rank} exceeds the base factors' r_max {factors.r_max}")
    gen = torch.Generator().manual_seed(seed)
    params = {
        name: init_module(method, factors.modules[name], rank, generator=gen)
        for name in selected_modules(factors, target_modules)
    }
    return Adapter(
        method=method,
        rank=rank,
        alpha=float(alpha if alpha is not None else rank),
        base_model=base_model,
        base_fingerprint=factors.fingerprint,
        target_modules=tuple(target_modules),
        params=params,
    )


def random_adapter(method: str, rank: int, factors: BaseFactors, base_model: str, seed: int = 0,
                   scale: float | dict[str, float] | None = None) -> Adapter:
    """A stand-in for a trained adapter (benchmarks, tests): initialised, then moved by Gaussian noise of
    `scale` (a number, or per method) so its delta is clearly non-zero."""
    adapter = new_adapter(method, rank, factors, base_model, seed=seed)
    if isinstance(scale, dict):
        scale = scale[method]
    if scale is None:
        scale = DEFAULT_NOISE[method]
    gen = torch.Generator().manual_seed(1000 + seed)
    for params in adapter.params.values():
        for k, v in params.items():
            params[k] = v + scale * torch.randn(v.shape, generator=gen)
    return adapter


# Noise that moves each method's output clearly but not chaotically on the tiny test model.
DEFAULT_NOISE = {"osora": 0.1, "loraxs": 2.0, "sorsa": 0.05, "lora": 0.1}


def expected_param_count(method: str, factors: BaseFactors, rank: int, target_modules: tuple[str, ...] = TARGET_MODULES) -> int:
    return sum(param_count(method, *factors.modules[n].shape, rank) for n in selected_modules(factors, target_modules))
