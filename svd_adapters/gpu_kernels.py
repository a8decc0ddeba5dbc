"""svdserve's GPU kernels (Triton): one group's whole core delta (OSoRA, LoRA-XS, base rows) in one launch, and
a decode step's low-rank delta (SORSA, LoRA rows) in another.

On a GPU a decode step of a small model is thousands of tiny kernels, and as PyTorch ops the core delta is
~4 of them per member (LoRA-XS) to ~6 (OSoRA): measured on an H200 (SmolLM2-135M, batch 32), they raised a
step's kernels from 1347 to 1738 (LoRA-XS) and 2188 (OSoRA), and its GPU time by 28 % and 55 %. This kernel
does a group's delta in one launch, at decode and prefill alike:

    y[t, c] += o[p, c] · (U_rᵀ (C_p h_t,i))[c] + (U_rᵀ (d_p ⊙ h_t,i))[c]     for column c of member i,

with p = t // tokens_per_row the request row of token t, o ≡ 1 and d ≡ 0 without output scales (LoRA-XS).
Each program takes a block of tokens and of output columns: it applies every token's own core to its slice of
h (a small broadcast product), then one matrix product with the tile of U_rᵀ, and adds into y in place.
Arithmetic is float32 with exact (not TF32) products, whatever the serving dtype.

The low-rank delta as PyTorch ops gathers every low-rank row's A and B per layer (copies of ~20 MB per row and
step for a rank-16 LoRA on SmolLM2-135M), then ~8 more kernels per group; `lowrank_delta` reads each row's terms
from its slot in one launch per group (one program per row and member), only the slot's filled rank. It has
been checked for correctness (under the interpreter, below) but not yet timed on a GPU.

`linear_core` (opt-in until timed on a GPU) goes one step further at decode: the group's GEMM, its shared
projections and its core delta in one launch.

Triton is imported on first use. The kernels also run on the CPU under Triton's interpreter (TRITON_INTERPRET=1
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


def _check_terms(kernel: str, Ct: torch.Tensor, o: torch.Tensor | None, d: torch.Tensor | None, U: torch.Tensor,
                 bounds: list[int], M: int) -> None:
    """The checks both core-delta kernels make of a group's terms (ValueError naming `kernel` on failure)."""
    k = Ct.shape[1]
    if k > 3 or len(bounds) != k + 1 or bounds[-1] != M:
        raise ValueError(f"{kernel} takes 1 to 3 members and their k + 1 column bounds up to {M}, got {k} and {bounds}")
    if U.stride(1) != 1 or Ct.stride(-1) != 1:
        raise ValueError(f"{kernel} needs unit column strides in U and the cores")
    if o is not None and (d is None or o.stride(1) != 1 or d.stride(1) != 1):
        raise ValueError(f"{kernel} takes o and d together, with unit column strides")


def core_delta(y: torch.Tensor, h: torch.Tensor, Ct: torch.Tensor, o: torch.Tensor | None, d: torch.Tensor | None,
               U: torch.Tensor, bounds: list[int], tokens_per_row: int = 1) -> None:
    """y (T, M) += one group's core delta, in place; the arguments are `cpu_kernels.core_delta`'s.

    h (T, k·R) (rows may be strided, e.g. a slice of the GEMM output); Ct (rows, k, R, R) each row's cores,
    transposed; o (rows, M) and d (rows, k·R) for output-scaling rows, or both None; U (R, M) the members'
    U_rᵀ side by side; bounds the members' column bounds (k + 1 of them; up to 3 members)."""
    import triton

    T, M = y.shape
    k, R = Ct.shape[1], Ct.shape[-1]
    _check_terms("core_delta", Ct, o, d, U, bounds, M)
    if y.stride(1) != 1 or h.stride(1) != 1:
        raise ValueError("core_delta needs unit column strides in y and h")
    scaled = o is not None
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


def fused_decode() -> bool:
    """Whether a decode step's group GEMM and core delta run as one kernel (`linear_core`). Opt-in
    (SVDSERVE_GPU_FUSED_DECODE=1) until measured on a GPU: checked against the formula under Triton's interpreter
    and compiled for sm_90 in the tests, not yet timed; `bench/gpu_check.sh` times both."""
    return os.environ.get("SVDSERVE_GPU_FUSED_DECODE", "0") in ("1", "true", "yes")


# Output columns per program and warps per program. Input columns per step of its loop: `linear_bk`. Chosen so that
# ptxas spills no registers on sm_90 (tests/test_gpu_compile.py): with 4 warps and 64 inputs a step it spilled
# 88–2072 bytes for 16–64 rows.
LINEAR_BN, LINEAR_WARPS = 32, 8
LINEAR_MAX_ROWS = 64  # a decode step's rows, one block of a program (`linear_core`)


def linear_bk(rows_block: int) -> int:
    """Input columns per step of `linear_core`'s loop for a block of that many rows (16, 32 or 64)."""
    return 16 if rows_block <= 16 else 32


def linear_core(x: torch.Tensor, W_aug: torch.Tensor, Ct: torch.Tensor, o: torch.Tensor | None,
                d: torch.Tensor | None, U: torch.Tensor, bounds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's group GEMM and core delta in one launch: x (T, K), one token per row, and W_aug (M + k·R, K)
    = [the members' weights; their V_rᵀ] give y (T, M), base outputs plus each row's core delta, and h (T, k·R);
    the terms as for `core_delta` with tokens_per_row 1. On a GPU a decode step is latency-bound: the delta as a
    kernel of its own after the GEMM is ~4 µs × 120 launches per step (measured on an H200), while here each
    program computes its columns' outputs and its members' h in one pass over x, then adds the delta. y and h are
    column ranges of one (T, M + k·R) buffer, as the GEMM's output is on the other path."""
    import triton

    from svd_adapters.triton_linear_core import linear_core_kernel  # imports Triton: on first use only

    T, n_in = x.shape
    k, R, M = Ct.shape[1], Ct.shape[-1], bounds[-1]
    _check_terms("linear_core", Ct, o, d, U, bounds, M)
    if T > LINEAR_MAX_ROWS or W_aug.shape != (M + k * R, n_in) or not W_aug.is_contiguous() or x.stride(1) != 1:
        raise ValueError(f"linear_core takes up to {LINEAR_MAX_ROWS} rows of x (T, K) contiguous within a row and a "
                         f"contiguous W_aug ({M + k * R}, K); got x {tuple(x.shape)}, W_aug {tuple(W_aug.shape)}")
    scaled = o is not None
    z = torch.empty(T, M + k * R, dtype=x.dtype, device=x.device)
    y, h = z[:, :M], z[:, M:]
    b = list(bounds[1:-1]) + [M] * (3 - k)
    o_, d_ = (o, d) if scaled else (z, z)  # unused pointers when not scaled
    BT = max(16, triton.next_power_of_2(T))
    linear_core_kernel[(triton.cdiv(M, LINEAR_BN),)](
        x, W_aug, y, h, Ct, o_, d_, U,
        T, M, R, b[0], b[1],
        x.stride(0), z.stride(0), z.stride(0), Ct.stride(0), Ct.stride(1), Ct.stride(2), o_.stride(0), d_.stride(0),
        U.stride(0),
        KIN=n_in, K=k, SCALED=scaled, R_PAD=max(16, triton.next_power_of_2(R)),
        BT=BT, BN=LINEAR_BN, BK=linear_bk(BT), IEEE=x.dtype == torch.float32, num_warps=LINEAR_WARPS,
    )
    return y, h


def _lowrank_kernel():
    from svd_adapters.triton_lowrank_delta import lowrank_delta_kernel  # imports Triton: on first use only

    return lowrank_delta_kernel


def lowrank_delta(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bts: list[torch.Tensor], bounds: list[int],
                  rows: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor, h: torch.Tensor | None = None,
                  d: torch.Tensor | None = None, U: torch.Tensor | None = None) -> None:
    """y (P, M) += the low-rank delta of one token per row (decode), in place.

    Entry e of `rows`/`slots` (device int64) is request row rows[e] reading low-rank slot slots[e]; entries with
    slot 0 (padding) change nothing. A (S, k·K, n) and Bts[i] (S, K, m_i) one layer's slot pools, ranks (S,) each
    slot's filled rows of K (on the device); with h (P, k·R), d (S, k·R) and U (R, M, float32): also U_r (d ⊙ h)
    (see `cpu_kernels.lowrank_delta`). Up to 3 members, bounds their k + 1 column bounds."""
    import triton

    P, M = y.shape
    k, n, K = len(Bts), A.shape[-1], Bts[0].shape[1]
    if not 1 <= k <= 3 or len(bounds) != k + 1 or bounds[-1] != M or A.shape[1] != k * K:
        raise ValueError(f"lowrank_delta takes 1 to 3 members and their k + 1 column bounds up to {M}, got {k} and {bounds}")
    if y.stride(1) != 1 or x.stride(1) != 1 or A.stride(2) != 1 or A.stride(1) != n or \
            any(B.stride(2) != 1 or B.stride(1) != B.shape[2] for B in Bts):
        raise ValueError("lowrank_delta needs unit column strides in y and x and pools contiguous within a slot")
    sub = h is not None
    if sub and (d is None or U is None or h.stride(1) != 1 or d.stride(1) != 1 or U.stride(1) != 1):
        raise ValueError("lowrank_delta takes h, d and U together, with unit column strides")
    if rows.shape[0] == 0:
        return
    R = U.shape[0] if sub else 1
    b = list(bounds[1:-1]) + [M] * (3 - k)
    B0, B1, B2 = (Bts + [Bts[0]] * 3)[:3]  # unused pointers for absent members
    h_, d_, U_ = (h, d, U) if sub else (y, y, y)
    _lowrank_kernel()[(rows.shape[0], k)](
        y, x, A, B0, B1, B2, rows, slots, ranks, h_, d_, U_,
        n, R, b[0], b[1], M,
        y.stride(0), x.stride(0), A.stride(0), A.stride(1), B0.stride(0), B1.stride(0), B2.stride(0),
        h_.stride(0), d_.stride(0), U_.stride(0),
        NMEM=k, K=K, K_PAD=max(16, triton.next_power_of_2(K)), R_PAD=max(16, triton.next_power_of_2(R)),
        BK_IN=64, BN=64, SUB=sub,
    )


def available() -> bool:
    """Triton importable (once per process; the reason logged once if not)."""
    if "ok" not in _state:
        try:
            import triton  # noqa: F401

            _state["ok"] = True
        except ImportError as exc:
            _state["ok"] = False
            log.warning("GPU delta kernels off: Triton is not importable (%s); using PyTorch ops", exc)
    return bool(_state["ok"])


def serves(y: torch.Tensor) -> bool:
    """Whether the kernels take this output: a CUDA tensor, the kernels enabled and Triton present."""
    return y.is_cuda and enabled() and _state.get("force") is not False and available()


def force(use: bool | None) -> None:
    """False: PyTorch ops instead of the kernel (for A/B benchmarks and tests); None: the kernel where it serves."""
    _state["force"] = use
