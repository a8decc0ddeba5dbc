"""svdserve's GPU kernel (Triton): one group's whole core delta (OSoRA, LoRA-XS, base rows) in one launch.

On a GPU a decode step of a small model is thousands of tiny kernels, and as PyTorch ops the core delta is
~4 of them per member (LoRA-XS) to ~6 (OSoRA): measured on an H200 (SmolLM2-135M, batch 32), they raised a
step's kernels from 1347 to 1738 (LoRA-XS) and 2188 (OSoRA), and its GPU time by 28 % and 55 %. This kernel
does a group's delta in one launch, at decode and prefill alike:

    y[t, c] += o[p, c] · (U_rᵀ (C_p h_t,i))[c] + (U_rᵀ (d_p ⊙ h_t,i))[c]     for column c of member i,

with p = t // tokens_per_row the request row of token t, o ≡ 1 and d ≡ 0 without output scales (LoRA-XS).
Each program takes a block of tokens and of output columns: it applies every token's own core to its slice of
h (a small broadcast product), then one matrix product with the tile of U_rᵀ, and adds into y in place.
Arithmetic is float32 with exact (not TF32) products, whatever the serving dtype.

Triton is imported on first use. The kernel also runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1
before Triton is first imported), which is how the tests check it without a GPU (tests/conftest.py).
"""
from __future__ import annotations

import os

import torch

from svd_adapters.log import get_logger

log = get_logger(__name__)
BLOCK_T, BLOCK_N = 16, 64  # tokens × output columns per program
_state: dict[str, object] = {}  # "ok": Triton importable; "force": False turns the kernel off


def enabled() -> bool:
    return os.environ.get("SVDSERVE_GPU_KERNELS", "1") not in ("0", "false", "no")


def _kernel():
    from svd_adapters.triton_core_delta import core_delta_kernel  # imports Triton: on first use only

    return core_delta_kernel


def core_delta(y: torch.Tensor, h: torch.Tensor, Ct: torch.Tensor, o: torch.Tensor | None, d: torch.Tensor | None,
               U: torch.Tensor, bounds: list[int], tokens_per_row: int = 1) -> None:
    """y (T, M) += one group's core delta, in place; the arguments are `cpu_kernels.core_delta`'s.

    h (T, k·R) (rows may be strided, e.g. a slice of the GEMM output); Ct (rows, k, R, R) each row's cores,
    transposed; o (rows, M) and d (rows, k·R) for output-scaling rows, or both None; U (R, M) the members'
    U_rᵀ side by side; bounds the members' column bounds (k + 1 of them; up to 3 members)."""
    import triton

    T, M = y.shape
    k, R = Ct.shape[1], Ct.shape[-1]
    if k > 3 or len(bounds) != k + 1 or bounds[-1] != M:
        raise ValueError(f"core_delta takes 1 to 3 members and their k + 1 column bounds up to {M}, got {k} and {bounds}")
    if y.stride(1) != 1 or h.stride(1) != 1 or U.stride(1) != 1 or Ct.stride(-1) != 1:
        raise ValueError("core_delta needs unit column strides in y, h, U and the cores")
    scaled = o is not None
    if scaled and (d is None or o.stride(1) != 1 or d.stride(1) != 1):
        raise ValueError("core_delta takes o and d together, with unit column strides")
    b = list(bounds[1:-1]) + [M] * (3 - k)  # columns from b[0] on are member 1, from b[1] on member 2
    o_, d_ = (o, d) if scaled else (y, y)  # unused pointers when not scaled
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(M, BLOCK_N))
    _kernel()[grid](
        y, h, Ct, o_, d_, U,
        T, M, R, tokens_per_row, b[0], b[1],
        y.stride(0), h.stride(0), Ct.stride(0), Ct.stride(1), Ct.stride(2),
        o_.stride(0), d_.stride(0), U.stride(0),
        K=k, SCALED=scaled, R_PAD=max(16, triton.next_power_of_2(R)), BT=BLOCK_T, BN=BLOCK_N,
    )


def available() -> bool:
    """Triton importable (once per process; the reason logged once if not)."""
    if "ok" not in _state:
        try:
            import triton  # noqa: F401

            _state["ok"] = True
        except ImportError as exc:
            _state["ok"] = False
            log.warning("GPU core-delta kernel off: Triton is not importable (%s); using PyTorch ops", exc)
    return bool(_state["ok"])


def serves(y: torch.Tensor) -> bool:
    """Whether `core_delta` takes this output: a CUDA tensor, the kernel enabled and Triton present."""
    return y.is_cuda and enabled() and _state.get("force") is not False and available()


def force(use: bool | None) -> None:
    """False: PyTorch ops instead of the kernel (for A/B benchmarks and tests); None: the kernel where it serves."""
    _state["force"] = use
