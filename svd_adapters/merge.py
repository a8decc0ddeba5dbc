"""Several adapters merged into one, as a request asks (LoRAX's `merged_adapters`): the math, no serving state.

Strategies:

- **linear** — task arithmetic on the weights: ΔW = Σ wᵢ ΔWᵢ, exactly, for any mix of methods and ranks. All
  LoRA-XS: the cores add (C = Σ wᵢ Cᵢ, the smaller ranks padded: U_r of rank r is the first r columns of any larger
  one), a core slot of the largest rank. Otherwise a low-rank slot: the core methods' parts become one block
  B_c = Σ wᵢ (oᵢ ⊙ U Cᵢ) over A_c = V_rᵀ (one block however many OSoRA / LoRA-XS adapters: they share V_r), each
  SORSA / LoRA adds its own rows (wᵢ Bᵢ, Aᵢ), and the frozen subtractions (OSoRA's and SORSA's −σ_r) add as one
  d-term. It fits when those rows are at most the slot's 2 × max_rank.
- **ties**, **dare_linear**, **dare_ties** — element by element on each adapter's change of its own parameters
  (θᵢ − θ₀, θ₀ where ΔW = 0: OSoRA's O = 1 and S = σ_r, SORSA's initial factors, LoRA-XS's R = 0, LoRA's A = B = 0
  as LoRAX takes them), so every adapter must be one method at one rank. TIES (Yadav et al. 2023) keeps each
  change's `density` largest entries, elects a sign per entry (`total`: of the summed changes, `frequency`: of
  the most entries) and averages the weighted changes that agree with it; DARE (Yu et al. 2023) keeps each entry
  with probability `density` and rescales by 1/density, then sums (dare_linear) or elects and averages as TIES
  (dare_ties). Each tensor's drop is seeded by the caller's seed (a digest of the merge) and the tensor's name, so
  every replica builds the same adapter whatever order it reads the modules in.
  These are not linear in ΔW (OSoRA's and SORSA's ΔW are products of their parameters).

LoRA-XS and LoRA fold their α/r into R and B before a parameter merge, so adapters trained with different α combine
(the merged adapter has α = r).

`merge` gives slot terms (what the engine serves); `merged_adapter` gives the same merge as one adapter file's
contents (`python -m training combine`).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from svd_adapters.adapter import Adapter, LayerTerms, layer_index
from svd_adapters.factors import BaseFactors
from svd_adapters.methods import CORE_METHODS, get_method
from svd_adapters.terms import DeltaTerms

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
MAX_SOURCES = 16
MERGED = "merged"  # the method label of a merge that is no single method's adapter (a linear one but all-LoRA-XS)


@dataclass(frozen=True)
class MergeOptions:
    strategy: str = "linear"
    density: float = 1.0  # ties / dare: the fraction of each change's entries kept
    majority_sign_method: str = "total"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown merge strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density is the fraction of entries kept, in (0, 1]; got {self.density}")
        if self.majority_sign_method not in SIGN_METHODS:
            raise ValueError(f"unknown majority_sign_method {self.majority_sign_method!r}; choose total or frequency")


@dataclass
class Merged:
    method: str  # the sources' method for a parameter merge or an all-LoRA-XS linear one, else MERGED
    terms: dict[str, LayerTerms]  # serving form, as `Adapter.terms`
    lowrank_rows: int  # rows of a low-rank slot it fills (0: it is a core adapter)


def lowrank_rows(methods: Sequence[str], ranks: Sequence[int]) -> int:
    """Low-rank slot rows a linear merge of these adapters fills (0: it goes to a core slot)."""
    if all(m == "loraxs" for m in methods):
        return 0
    core = max((r for m, r in zip(methods, ranks) if m in CORE_METHODS), default=0)
    return core + sum(r for m, r in zip(methods, ranks) if m not in CORE_METHODS)


def check_mergeable(methods: Sequence[str], ranks: Sequence[int], options: MergeOptions, max_rank: int) -> None:
    """ValueError saying why a server with this max_rank cannot serve the merge of adapters of these methods and
    ranks (before any is fetched: the API answers 400 with it)."""
    if not 1 <= len(methods) <= MAX_SOURCES:
        raise ValueError(f"a merge takes 1 to {MAX_SOURCES} adapters, got {len(methods)}")
    if options.strategy == "linear":
        check_rows(lowrank_rows(methods, ranks), max_rank)
    else:
        _check_one_kind(methods, ranks, options.strategy)


def check_rows(rows: int, max_rank: int) -> None:
    """ValueError unless a low-rank slot of a server with this max_rank (2 × max_rank rows) holds a linear merge
    filling `rows`."""
    cap = 2 * max_rank
    if rows > cap:
        raise ValueError(
            f"a linear merge of these adapters needs {rows} low-rank rows (the largest OSoRA / LoRA-XS rank plus "
            f"every SORSA and LoRA rank), over this server's {cap} (2 × max_rank {max_rank}); merge fewer SORSA / "
            "LoRA adapters, or start the server with a larger --max-rank")


def _check_one_kind(methods: Sequence[str], ranks: Sequence[int], strategy: str) -> None:
    kinds = sorted({f"{m} rank {r}" for m, r in zip(methods, ranks)})
    if len(kinds) > 1:
        raise ValueError(
            f"{strategy} merges each parameter entry by entry, so every adapter must be one method at one rank; "
            f"got {', '.join(kinds)}; use merge_strategy 'linear' (any mix of methods and ranks) instead")


def _check_weights(adapters: Sequence[Adapter], weights: Sequence[float]) -> None:
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")


def merge(adapters: Sequence[Adapter], weights: Sequence[float], options: MergeOptions, factors: BaseFactors,
          max_rank: int, seed: int = 0) -> Merged:
    """The adapters merged with these weights (one per adapter), ready for a slot of a server with `max_rank`."""
    _check_weights(adapters, weights)
    check_mergeable([a.method for a in adapters], [a.rank for a in adapters], options, max_rank)
    if options.strategy == "linear":
        return linear([(a.method, a.terms(factors)) for a in adapters], weights, factors)
    adapter = parameter_merge(adapters, weights, options, factors, seed)
    return Merged(adapter.method, adapter.terms(factors), 0 if adapter.method in CORE_METHODS else adapter.rank)


def merged_adapter(adapters: Sequence[Adapter], weights: Sequence[float], options: MergeOptions,
                   factors: BaseFactors, seed: int = 0) -> Adapter:
    """The merge as one adapter (a file to upload; `python -m training combine`): ties / dare → an adapter of the
    sources' method and rank; linear → for LoRA-XS adapters of one rank their summed cores (ΔW is linear in R), for
    any other mix a plain LoRA carrying ΔW = Σ wᵢ ΔWᵢ exactly: its rank is the merge's low-rank rows plus its
    d-term's (U_r diag(d) over V_rᵀ), the most of any module kind, the others zero-padded."""
    _check_weights(adapters, weights)
    if options.strategy != "linear":
        return parameter_merge(adapters, weights, options, factors, seed)
    first = adapters[0]
    if all(a.method == "loraxs" and a.rank == first.rank for a in adapters):
        names = sorted({n for a in adapters for n in a.params})
        params = {n: {"R": sum(w * _folded(a, n, "R", "R") for a, w in zip(adapters, weights) if n in a.params)}
                  for n in names}
        return _like(first, "loraxs", first.rank, adapters, params)
    merged = linear([(a.method, a.terms(factors)) for a in adapters], weights, factors)
    blocks: dict[str, tuple[list[int], torch.Tensor, torch.Tensor]] = {}
    for kind, lt in merged.terms.items():
        t, layers = lt.terms, lt.layers
        A, B = t.A, t.B
        if t.C is not None or t.d is not None:
            U, _, Vh = factors.stacked(tuple(_module_names(factors, kind)[li] for li in layers), t.rank)
        if t.C is not None:  # all LoRA-XS of several ranks: U_r C over V_rᵀ
            A, B = Vh, U @ t.C
        if t.d is not None:  # the frozen subtractions: U_r diag(d) over V_rᵀ
            A, B = torch.cat([A, Vh], dim=-2), torch.cat([B, U * t.d[:, None, :]], dim=-1)
        blocks[kind] = (layers, A, B)
    rank = max(A.shape[-2] for _, A, _ in blocks.values())
    params: dict[str, dict[str, torch.Tensor]] = {}
    for kind, (layers, A, B) in blocks.items():
        pad = rank - A.shape[-2]
        A = torch.nn.functional.pad(A, (0, 0, 0, pad))
        B = torch.nn.functional.pad(B, (0, pad))
        for j, li in enumerate(layers):
            params[_module_names(factors, kind)[li]] = {"A": A[j].contiguous(), "B": B[j].contiguous()}
    return _like(first, "lora", rank, adapters, params)


def _like(first: Adapter, method: str, rank: int, adapters: Sequence[Adapter],
          params: dict[str, dict[str, torch.Tensor]]) -> Adapter:
    """A merged adapter on the sources' base, covering every module any of them adapts (α = r: scale 1)."""
    targets = tuple(sorted({t for a in adapters for t in a.target_modules}))
    return Adapter(method=method, rank=rank, alpha=float(rank), base_model=first.base_model,
                   base_fingerprint=first.base_fingerprint, target_modules=targets, params=params)


# ---------- linear: ΔW = Σ wᵢ ΔWᵢ, on slot terms ----------

def linear(sources: Sequence[tuple[str, dict[str, LayerTerms]]], weights: Sequence[float],
           factors: BaseFactors) -> Merged:
    """Exact weighted sum of the sources' deltas, from their slot terms ((method, `Adapter.terms`) each)."""
    methods = [m for m, _ in sources]
    if all(m == "loraxs" for m in methods):
        return Merged("loraxs", _summed_cores([t for _, t in sources], weights), 0)
    out: dict[str, LayerTerms] = {}
    for kind in sorted({k for _, t in sources for k in t}):
        parts = [(w, t[kind]) for (_, t), w in zip(sources, weights) if kind in t]
        out[kind] = _lowrank_kind(kind, parts, factors)
    rows = max(lt.terms.A.shape[-2] for lt in out.values())
    return Merged(MERGED, out, rows)


def _union_layers(parts: Sequence[tuple[float, LayerTerms]]) -> tuple[list[int], list[torch.Tensor]]:
    """The sorted union of the parts' layers, and each part's positions in it."""
    layers = sorted({li for _, lt in parts for li in lt.layers})
    pos = {li: j for j, li in enumerate(layers)}
    return layers, [torch.tensor([pos[li] for li in lt.layers]) for _, lt in parts]


def _summed_cores(sources: Sequence[dict[str, LayerTerms]], weights: Sequence[float]) -> dict[str, LayerTerms]:
    out: dict[str, LayerTerms] = {}
    for kind in sorted({k for t in sources for k in t}):
        parts = [(w, t[kind]) for t, w in zip(sources, weights) if kind in t]
        layers, where = _union_layers(parts)
        r = max(lt.terms.rank for _, lt in parts)
        C = torch.zeros(len(layers), r, r)
        for (w, lt), idx in zip(parts, where):
            rr = lt.terms.rank
            C[idx, :rr, :rr] += w * lt.terms.C.float()
        out[kind] = LayerTerms(layers, DeltaTerms(rank=r, C=C))
    return out


def _lowrank_kind(kind: str, parts: Sequence[tuple[float, LayerTerms]], factors: BaseFactors) -> LayerTerms:
    """One module kind's merged terms in low-rank form: [B_c | wᵢBᵢ …] [A_c; Aᵢ …] + the summed d-term."""
    layers, where = _union_layers(parts)
    names = tuple(_module_names(factors, kind)[li] for li in layers)
    L, (m, n) = len(layers), factors.modules[names[0]].shape
    core_rank = max((lt.terms.rank for _, lt in parts if lt.terms.C is not None), default=0)
    d_rank = max((lt.terms.rank for _, lt in parts if lt.terms.d is not None), default=0)
    d = torch.zeros(L, d_rank) if d_rank else None
    As: list[torch.Tensor] = []
    Bs: list[torch.Tensor] = []
    if core_rank:
        U, _, Vh = factors.stacked(names, core_rank)
        Bc = torch.zeros(L, m, core_rank)
        As.append(Vh)
        Bs.append(Bc)
    for (w, lt), idx in zip(parts, where):
        t = lt.terms
        if t.d is not None:
            d[idx, : t.rank] += w * t.d.float()
        if t.C is not None:
            g = U[idx, :, : t.rank] @ t.C.float()  # U_r C: (layers, m, r)
            if t.o is not None:
                g = g * t.o.float()[..., None]
            Bc[idx, :, : t.rank] += w * g
        if t.A is not None:
            k = t.A.shape[-2]
            A, B = torch.zeros(L, k, n), torch.zeros(L, m, k)
            A[idx], B[idx] = t.A.float(), w * t.B.float()
            As.append(A)
            Bs.append(B)
    return LayerTerms(layers, DeltaTerms(rank=d_rank, A=torch.cat(As, dim=-2), B=torch.cat(Bs, dim=-1), d=d))


def _module_names(factors: BaseFactors, kind: str) -> dict[int, str]:
    """Layer index → qualified name of the base's modules of one kind (q_proj, ...)."""
    return factors.memo(("merge_names", kind), lambda: {
        layer_index(name): name for name in factors.modules if name.rsplit(".", 1)[-1] == kind})


# ---------- ties / dare: element by element on each adapter's parameter change ----------

def parameter_merge(adapters: Sequence[Adapter], weights: Sequence[float], options: MergeOptions,
                    factors: BaseFactors, seed: int = 0) -> Adapter:
    """One adapter of the sources' method and rank whose parameters are the reference plus the merged changes."""
    _check_one_kind([a.method for a in adapters], [a.rank for a in adapters], options.strategy)
    first = adapters[0]
    method, rank = get_method(first.method), first.rank
    w = torch.tensor([float(x) for x in weights])
    kinds: dict[str, list[str]] = {}
    for name in sorted({n for a in adapters for n in a.params}, key=lambda n: (layer_index(n), n)):
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    params: dict[str, dict[str, torch.Tensor]] = {}
    for kind, names in kinds.items():  # every layer of a module kind at once: a few ops per kind, not per module
        refs = [method.reference_params(next(a.params[n] for a in adapters if n in a.params),
                                        *factors.modules[n].top(rank)) for n in names]
        for key in refs[0]:
            ref = torch.stack([r[key] for r in refs])
            changes = torch.stack([torch.stack([_folded(a, n, key, method.ALPHA_SCALED) if n in a.params else r[key]
                                                for n, r in zip(names, refs)]) for a in adapters]) - ref
            # DARE's drop for this tensor from the seed and its name alone: the same on every replica, whatever order
            # the modules come in
            gen = torch.Generator().manual_seed(_tensor_seed(seed, kind, key))
            merged = ref + combine(changes, w, options, gen, per_layer=True)
            for n, value in zip(names, merged):
                params.setdefault(n, {})[key] = value
    return _like(first, first.method, rank, adapters, params)


def _tensor_seed(seed: int, kind: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{kind}:{key}".encode()).digest()[:8], "little") >> 1


def _folded(adapter: Adapter, name: str, key: str, alpha_scaled: str | None) -> torch.Tensor:
    """A parameter with the adapter's α/r folded in where ΔW scales with it (so the merged α is r)."""
    value = adapter.params[name][key].float()
    return value * (adapter.alpha / adapter.rank) if key == alpha_scaled else value


def combine(changes: torch.Tensor, weights: torch.Tensor, options: MergeOptions,
            generator: torch.Generator | None = None, per_layer: bool = False) -> torch.Tensor:
    """The merged change of one parameter tensor from the sources' changes stacked on dim 0 (ties / dare); with
    per_layer, dim 1 stacks that tensor of several layers (each trimmed on its own)."""
    w = weights.view(-1, *([1] * (changes.dim() - 1)))
    if options.strategy in ("dare_linear", "dare_ties"):
        changes = _random_prune(changes, options.density, generator)
        if options.strategy == "dare_linear":
            return (w * changes).sum(0)
    else:
        changes = _magnitude_prune(changes, options.density, 2 if per_layer else 1)
    elected = _majority_sign(changes, options.majority_sign_method)
    agree = (torch.sign(changes) == elected) & (changes != 0)
    return (w * changes * agree).sum(0) / agree.sum(0).clamp(min=1)


def _magnitude_prune(changes: torch.Tensor, density: float, lead: int = 1) -> torch.Tensor:
    """Each change (over the dims after the first `lead`) with all but its round(density · size) largest-magnitude
    entries zeroed."""
    flat = changes.reshape(*changes.shape[:lead], -1)
    keep = max(1, round(density * flat.shape[-1]))
    if keep >= flat.shape[-1]:
        return changes
    top = flat.abs().topk(keep, dim=-1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top, True)
    return (flat * mask).view_as(changes)


def _random_prune(changes: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: each entry kept with probability density and rescaled by 1/density."""
    if density >= 1.0:
        return changes
    keep = torch.rand(changes.shape, generator=generator) < density
    return changes * keep / density


def _majority_sign(changes: torch.Tensor, method: str) -> torch.Tensor:
    summed = changes.sum(0) if method == "total" else torch.sign(changes).sum(0)
    return torch.sign(summed)
