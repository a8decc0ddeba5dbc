"""Frozen SVD factors of the base model's target linears: computed once (float64, CPU), cached as float32.

The cache file is keyed by a fingerprint of (target weights, r_max, factorisation version); every adapter
records that fingerprint, because LoRA-XS cores and OSoRA scales only mean something against these exact
singular vectors (a sign flip of one singular pair changes them).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from svd_adapters.log import get_logger

log = get_logger(__name__)

FACTOR_VERSION = 1
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_R_MAX = 64


@dataclass
class ModuleFactors:
    """Top-r_max SVD of one weight W (m×n): W ≈ U diag(S) Vh, U: m×R, S: R, Vh: R×n."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.Vh.shape[1]

    def top(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.U[:, :r], self.S[:r], self.Vh[:r]


@dataclass
class BaseFactors:
    fingerprint: str
    r_max: int
    modules: dict[str, ModuleFactors]  # keyed by the linear's qualified name in the model

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {name: f.shape for name, f in self.modules.items()}

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """A value derived from these (never modified) factors, computed once: every adapter load reuses it."""
        cache = self.__dict__.setdefault("_memo", {})
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def stacked(self, names: tuple[str, ...], r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U_r (L, m, r), σ_r (L, r), V_rᵀ (L, r, n) of same-shaped modules, stacked (memoized)."""
        def compute() -> tuple[torch.Tensor, ...]:
            tops = [self.modules[n].top(r) for n in names]
            return tuple(torch.stack([t[i] for t in tops]).contiguous() for i in range(3))

        return self.memo(("stacked", names, r), compute)


def target_linears(model: nn.Module, targets: tuple[str, ...] = TARGET_MODULES) -> dict[str, nn.Linear]:
    """The adaptable nn.Linear layers, by qualified name, in model order."""
    found = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }
    if not found:
        raise ValueError(f"no linear layers named any of {targets} in {type(model).__name__}")
    return found


def fingerprint(linears: dict[str, nn.Linear], r_max: int) -> str:
    h = hashlib.sha256(f"svdserve-factors-v{FACTOR_VERSION};r_max={r_max}".encode())
    for name in sorted(linears):
        w = linears[name].weight.detach().to(torch.float32).contiguous().cpu()
        h.update(f"{name}:{tuple(w.shape)}".encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()[:32]


def load_or_compute(model: nn.Module, cache_dir: Path, r_max: int = DEFAULT_R_MAX) -> BaseFactors:
    """Load this base's factors from `cache_dir`, computing (and saving) them only when missing."""
    linears = target_linears(model)
    r_max = min(r_max, min(min(l.weight.shape) for l in linears.values()))
    fp = fingerprint(linears, r_max)
    path = Path(cache_dir) / f"svd-factors-{fp}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        modules = {
            name: ModuleFactors(tensors[f"{name}.U"], tensors[f"{name}.S"], tensors[f"{name}.Vh"]) for name in linears
        }
        return BaseFactors(fingerprint=fp, r_max=r_max, modules=modules)
    modules = compute(linears, r_max)
    tensors = {}
    for name, f in modules.items():
        tensors.update({f"{name}.U": f.U.contiguous(), f"{name}.S": f.S.contiguous(), f"{name}.Vh": f.Vh.contiguous()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    os.close(fd)
    save_file(tensors, tmp, metadata={"fingerprint": fp, "r_max": str(r_max), "version": str(FACTOR_VERSION)})
    os.replace(tmp, path)  # atomic: a crash mid-save never leaves a truncated factor file under the real name
    log.info("saved SVD factors to %s", path)
    return BaseFactors(fingerprint=fp, r_max=r_max, modules=modules)


def compute(linears: dict[str, nn.Linear], r_max: int) -> dict[str, ModuleFactors]:
    out: dict[str, ModuleFactors] = {}
    for name, lin in tqdm(linears.items(), desc="SVD factors", unit="matrix"):
        w = lin.weight.detach().to(device="cpu", dtype=torch.float64)
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        out[name] = ModuleFactors(
            U[:, :r_max].to(torch.float32).contiguous(),
            S[:r_max].to(torch.float32).contiguous(),
            Vh[:r_max].to(torch.float32).contiguous(),
        )
    return out
