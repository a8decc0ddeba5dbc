"""The decode step's core delta and GEMMs against the formula: the PyTorch paths of `core_delta_` (one GEMM per
member, or one block-diagonal GEMM per group) and the CPU kernels (`svd_adapters/csrc/`)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from svd_adapters import cpu_kernels
from svd_adapters.batched_linear import core_delta_


def case(dtype: torch.dtype, scaled: bool, P: int = 5, R: int = 4, sizes: tuple[int, ...] = (12, 6, 6), L: int = 1,
         seed: int = 0):
    """Random inputs shaped as in LinearGroup.forward: y and h are column ranges of one (P·L, M + k·R) output,
    L tokens per request row; cores, o and d per row."""
    gen = torch.Generator().manual_seed(seed)
    k, M = len(sizes), sum(sizes)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return dict(
        sizes=list(sizes), offsets=[sum(sizes[:i]) for i in range(k)], R=R, M=M, k=k, P=P, L=L,
        Ut=[rnd(R, m).to(dtype) for m in sizes],
        z=rnd(P * L, M + k * R).to(dtype),
        Ct=rnd(P, k, R, R).to(dtype),
        o=rnd(P, M).to(dtype) if scaled else None,
        d=rnd(P, k * R).to(dtype) if scaled else None,
    )


def reference(c) -> torch.Tensor:
    """y + Δy in float64, token by token and member by member, straight from the formula."""
    want = c["z"].double().clone()
    M, R = c["M"], c["R"]
    for t in range(c["P"] * c["L"]):
        p = t // c["L"]
        for i, off in enumerate(c["offsets"]):
            m = c["sizes"][i]
            hi = c["z"][t, M + i * R : M + (i + 1) * R].double()
            g = hi @ c["Ct"][p, i].double()  # Ct is Cᵀ: row vector h·Cᵀ = (C h)ᵀ
            delta = g @ c["Ut"][i].double()
            if c["o"] is not None:
                delta = delta * c["o"][p, off : off + m].double() + (hi * c["d"][p, i * R : (i + 1) * R].double()) @ c["Ut"][i].double()
            want[t, off : off + m] += delta
    return want


# Error bound relative to the outputs' size per dtype. bf16: accumulated in float32 and rounded once on the way
# out, so within one bf16 rounding (2⁻⁸ relative).
KERNEL_TOL = {torch.bfloat16: 2 ** -8, torch.float32: 1e-6, torch.float64: 1e-14}


def run_kernel(c, out: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """The case's z after the core-delta kernel (y and h are its column ranges, as in LinearGroup.forward).
    With `slots`, the rows' Ct, o and d are first placed in a larger slot pool at those slots and read from there."""
    M, y = c["M"], c["z"].clone()
    U = torch.cat(c["Ut"], dim=1).to(torch.promote_types(y.dtype, torch.float32)).contiguous()
    Ct, o, d = c["Ct"], c["o"], c["d"]
    if slots is not None:
        def pool(t):
            if t is None:
                return None
            p = torch.full((int(slots.max()) + 3,) + t.shape[1:], float("nan"), dtype=t.dtype)  # unread slots: NaN
            p[slots] = t
            return p
        Ct, o, d = pool(Ct), pool(o), pool(d)
    cpu_kernels.core_delta(y[:, :M], y[:, M:], Ct, o, d, U, c["offsets"] + [M], c["L"], out=out, slots=slots)
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64 takes the block-diagonal path
@pytest.mark.parametrize("scaled", [False, True])
def test_pytorch_decode_delta_matches_the_formula(dtype, scaled):
    c = case(dtype, scaled)
    P, M, k, R = c["P"], c["M"], c["k"], c["R"]
    y = c["z"].clone()
    core_delta_(y[:, :M], y[:, M:].reshape(P, 1, k, R), c["Ct"], c["o"], c["d"], c["Ut"], c["offsets"],
                scratch=torch.empty(P * M, dtype=dtype), Ut_blockdiag=torch.block_diag(*c["Ut"]))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (y.double() - reference(c)).abs().max().item() <= tol
    assert torch.equal(y[:, M:], c["z"][:, M:])  # h's columns are left alone


def test_kernels_build_here():
    # CI and the Docker image have a C++ compiler: serving there must not silently fall back to the slow path.
    assert cpu_kernels.available(), "the CPU kernels did not build (see the log for the compiler's error)"


def test_kernels_build_with_pips_ninja_even_with_another_ninja_first_on_path(tmp_path, monkeypatch):
    # a system ninja of another version hashes build commands differently: alternating the two rebuilt everything
    import ninja  # noqa: PLC0415  (a dependency of svdserve)
    other = tmp_path / "ninja"
    other.write_text("#!/bin/sh\nexit 1\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert shutil.which("ninja") == str(other)
    cpu_kernels._use_pip_ninja()
    assert Path(shutil.which("ninja")).resolve() == (Path(ninja.BIN_DIR) / "ninja").resolve()
    path = os.environ["PATH"]
    cpu_kernels._use_pip_ninja()  # already first: PATH is left as it is
    assert os.environ["PATH"] == path


def test_kernels_cache_follows_its_env_var_else_the_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SVDSERVE_KERNELS_DIR", raising=False)
    assert cpu_kernels.kernels_root() == tmp_path / "home" / "kernels"
    monkeypatch.setenv("SVDSERVE_KERNELS_DIR", str(tmp_path / "shared"))
    assert cpu_kernels.kernels_root() == tmp_path / "shared"
    # one build directory per checkout (sources) and torch installation: another checkout gets its own
    here = cpu_kernels.kernel_build_dir("AVX512")
    assert here.parent == tmp_path / "shared" and here.name.startswith("svdserve_kernels_avx512-")
    assert cpu_kernels.kernel_build_dir("AVX512") == here != cpu_kernels.kernel_build_dir("AVX2")
    monkeypatch.setattr(cpu_kernels, "_SOURCES", [tmp_path / "elsewhere" / "csrc" / "skinny_linear.cpp"])
    assert cpu_kernels.kernel_build_dir("AVX512") != here


def test_prefill_calibration_keeps_each_groups_fastest_plan(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_prefill_plans", {})
    W, widths, calls = torch.randn(40, 24), [], []

    def plan(name: str, seconds: float):
        return lambda x: (widths.append(x.shape), calls.append(name), time.sleep(seconds))

    plans = {"slow": plan("slow", 0.003), "fast": plan("fast", 0.001)}
    assert cpu_kernels.prefill_plan(("qkv",)) is None  # not timed: the group takes its default
    cpu_kernels.calibrate_prefill([(("qkv",), "qkv", W, plans), (("qkv",), "qkv", W, plans)], rows=8, reps=2)
    assert cpu_kernels.prefill_plan(("qkv",)) == "fast"
    assert calls.count("slow") == calls.count("fast") == 3  # one signature timed once: a warm-up round, 2 timed
    assert set(widths) == {(8, 24)}  # random rows of the group's input width


def test_calibration_keeps_each_callables_fastest_round_so_a_burst_of_noise_does_not_flip_the_choice():
    # "slow" always takes 3 ms; "fast" 1 ms, but a burst (a neighbour's work) slows 4 of its 7 rounds to 6 ms: by
    # median it would lose, as the kernel had on a shared host; its fastest round says what it costs.
    rounds = iter([0.006] * 5 + [0.001] * 3)  # the untimed warm-up round, then 4 slow rounds of 7
    times = cpu_kernels._best_times({"fast": lambda: time.sleep(next(rounds)), "slow": lambda: time.sleep(0.003)},
                                    reps=7)
    assert times["fast"] < 0.003 <= times["slow"]


def test_large_blocks_are_kept_in_mallocs_heap_on_glibc():
    # CI and the Docker image run glibc: prefill's activations must not be page-faulted in afresh every step.
    assert cpu_kernels.keep_large_blocks()  # mallopt accepted both settings


# Sizes that are and are not multiples of the kernel's tile width (16 floats, 8 doubles), token counts that are
# and are not multiples of its row block (4 plain, 2 scaled), the real model's rank, and prefill-style rows of
# several tokens sharing one adapter (scaled ones take the folded path; R = 6 is not a multiple of its 4-row block);
# past 64 tokens unscaled rows stream token blocks through every tile, and folded rows split into 64-token chunks
# (L = 70: a row's chunks may land on different threads, each folding the row's projection itself).
SHAPES = [dict(P=5, R=4, sizes=(12, 6, 6)), dict(P=32, R=16, sizes=(64, 32, 32)), dict(P=7, R=16, sizes=(48, 33)),
          dict(P=1, R=3, sizes=(16,)), dict(P=3, R=16, sizes=(32, 16), L=7), dict(P=2, R=6, sizes=(20, 9), L=5),
          dict(P=3, R=16, sizes=(40, 24), L=70), dict(P=83, R=4, sizes=(20, 12)),
          dict(P=3, R=4, sizes=(1000, 24), L=30)]  # rows of U 4 KB apart: read from a packed copy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_core_delta_kernel_matches_the_formula(shape, dtype, scaled):
    assert cpu_kernels.available()
    c = case(dtype, scaled, **shape)
    M = c["M"]
    y = run_kernel(c)
    want = reference(c)
    err = (y.double() - want).abs().max().item()
    scale = want[:, :M].abs().max().item()  # outputs reach ~100 at R = 16: bound the error relative to them
    assert err <= KERNEL_TOL[dtype] * scale
    assert torch.equal(y[:, M:], c["z"][:, M:])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_core_delta_kernel_reads_rows_from_their_slots(shape, dtype, scaled):
    """Rows reading their cores, scales and d from a slot pool (in any order, unread slots NaN) give exactly what
    the rows' own tensors give: how the model calls the kernel (no per-step copy of the adapters)."""
    c = case(dtype, scaled, **shape)
    # from slot 1 on: slot 0 is the pools' zero adapter, whose rows a prefill skips (next test)
    slots = 1 + torch.randperm(c["P"] + 2, generator=torch.Generator().manual_seed(c["P"]))[: c["P"]]
    assert torch.equal(run_kernel(c, slots=slots), run_kernel(c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_core_delta_kernel_skips_zero_adapter_rows_at_prefill(dtype, scaled, gated):
    """At prefill, rows reading slot 0 (the pools' zero adapter: base rows, low-rank rows) are not swept at all:
    their outputs stay exactly as the GEMM left them (here even with NaN in their h, which a sweep would spread)
    or, gated, get the bare activation, while the other rows get their delta. Rows of 13 tokens, so register
    blocks straddle rows (and more than one chunk of 64 tokens in all: fewer take a decode step's path)."""
    assert cpu_kernels.available()
    c = case(dtype, scaled, P=6, R=16, sizes=(40, 40), L=13, seed=4)
    M, R, L = c["M"], c["R"], c["L"]
    slots = torch.tensor([0, 2, 0, 0, 1, 0])
    zero = slots.repeat_interleave(L) == 0
    c["z"][zero, M:] = float("nan")  # the zero rows' h
    U = torch.cat(c["Ut"], dim=1).float()
    # slot 0 holds the zero adapter, as the pools keep it; slots 1 and 2 the rows' own terms
    Ct = torch.zeros((3,) + c["Ct"].shape[1:], dtype=dtype)
    Ct[1], Ct[2] = c["Ct"][4], c["Ct"][1]
    o = d = None
    if scaled:
        o, d = torch.ones(3, M, dtype=dtype), torch.zeros(3, c["k"] * R, dtype=dtype)
        o[1], o[2], d[1], d[2] = c["o"][4], c["o"][1], c["d"][4], c["d"][1]
    y = c["z"].clone()
    out = torch.full((y.shape[0], M // 2), float("nan"), dtype=dtype) if gated else None
    cpu_kernels.core_delta(y[:, :M], y[:, M:], Ct, o, d, U, c["offsets"] + [M], L, out=out, slots=slots)
    want = reference(c)[~zero, :M]
    if gated:
        assert torch.equal(out[zero], cpu_kernels.gated_silu(c["z"][zero, :M].contiguous()))  # the bare activation
        got, want = out[~zero], gated_reference(want)
    else:
        assert torch.equal(y[zero, :M], c["z"][zero, :M])
        got = y[~zero, :M]
    assert (got.double() - want).abs().max().item() <= 2 * KERNEL_TOL[dtype] * want.abs().max().item()


def run_core_linear(c, K: int, slots: torch.Tensor, blas: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The case as a decode step for `core_linear`: inputs x (T, K) and W_aug = [W; V_rᵀ] (M + k·R, K), whose
    product replaces the case's z (so `reference` applies); the rows' terms in a slot pool at `slots` (unread
    slots NaN). Returns the kernel's y and h (with `blas`, torch's GEMM inside the call) and the float64 reference
    of [y | h]."""
    gen = torch.Generator().manual_seed(K)
    dtype, M, R = c["z"].dtype, c["M"], c["R"]
    x = torch.randn(c["P"] + 2, K, generator=gen).to(dtype)[1:-1]  # a row-strided view, as inside the runner
    W_aug = (torch.randn(M + c["k"] * R, K, generator=gen) / K ** 0.5).to(dtype)
    c = dict(c, z=x.double() @ W_aug.double().T)
    U = torch.cat(c["Ut"], dim=1).float().contiguous()

    def pool(t):
        if t is None:
            return None
        p = torch.full((int(slots.max()) + 3,) + t.shape[1:], float("nan"), dtype=t.dtype)
        p[slots] = t
        return p

    y, h = cpu_kernels.core_linear(x, W_aug, pool(c["Ct"]), pool(c["o"]), pool(c["d"]), U, c["offsets"] + [M], slots,
                                   blas=blas)
    return y, h, reference(c)


# Decode steps (one token per row): member widths that are and are not multiples of the delta's 32-column tile and
# of the GEMM's 6-column tile, members of more than one 3-tile block (200 columns: blocks of 96, 96 and 8), K with
# and without a tail past the last 16-float vector, row counts around the register blocks, a batch past 64 rows.
LINEAR_SHAPES = [dict(P=5, R=4, sizes=(12, 6, 6), K=37), dict(P=32, R=16, sizes=(64, 32, 32), K=64),
                 dict(P=7, R=16, sizes=(48, 33), K=48), dict(P=1, R=3, sizes=(16,), K=8),
                 dict(P=9, R=8, sizes=(200, 100), K=70), dict(P=67, R=4, sizes=(20, 12), K=16),
                 dict(P=2, R=8, sizes=(40, 24), K=53), dict(P=4, R=4, sizes=(30, 10, 10), K=80)]  # few rows: streamed


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("blas", [False, True], ids=["own-gemm", "torch-gemm"])
def test_core_linear_kernel_matches_the_formula(shape, dtype, scaled, blas):
    """A decode step's GEMM fused with its core delta: y the base outputs plus each row's delta (read from its
    slot), h the shared projections, both against the float64 formula; the GEMM the kernel's own or torch's."""
    assert cpu_kernels.available()
    shape = dict(shape)
    K = shape.pop("K")
    c = case(dtype, scaled, **shape)
    # from slot 1 on: slot 0 is the pools' zero adapter, whose rows get no delta (tested below)
    slots = 1 + torch.randperm(c["P"] + 2, generator=torch.Generator().manual_seed(c["P"]))[: c["P"]]
    y, h, want = run_core_linear(c, K, slots, blas)
    M = c["M"]
    assert y.dtype == h.dtype == dtype and y.shape == (c["P"], M) and h.shape == (c["P"], c["k"] * c["R"])
    scale = want[:, :M].abs().max().item()
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-6  # bf16: the GEMM's output rounded, then y + Δy rounded
    assert (y.double() - want[:, :M]).abs().max().item() <= tol * scale
    assert (h.double() - want[:, M:]).abs().max().item() <= tol * want[:, M:].abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blas", [False, True], ids=["own-gemm", "torch-gemm"])
def test_core_linear_kernel_takes_diagonal_cores_from_their_diagonals(dtype, blas):
    """Slots flagged diagonal (OSoRA's diag S) give their cores as diagonals in s: their core pool entries are not
    read (NaN here), the others' are (dense cores, s NaN), and every row matches the formula."""
    assert cpu_kernels.available()
    c = case(dtype, True, P=12, R=16, sizes=(64, 32, 32))
    P, k, R, M = c["P"], c["k"], c["R"], c["M"]
    flagged = torch.arange(P) % 3 != 0
    diag = torch.randn(P, k, R, generator=torch.Generator().manual_seed(5)).to(dtype)
    c["Ct"][flagged] = torch.diag_embed(diag[flagged])  # the formula's cores for the flagged rows
    slots = 1 + torch.randperm(P + 1, generator=torch.Generator().manual_seed(6))[:P]
    S = P + 2
    Ct_pool = torch.full((S, k, R, R), float("nan"), dtype=dtype)
    s_pool = torch.full((S, k * R), float("nan"), dtype=dtype)
    diagonal = torch.zeros(S, dtype=torch.bool)
    Ct_pool[slots[~flagged]] = c["Ct"][~flagged]
    s_pool[slots[flagged]] = diag[flagged].reshape(-1, k * R)
    diagonal[slots[flagged]] = True

    def pool(t):
        p = torch.full((S,) + t.shape[1:], float("nan"), dtype=t.dtype)
        p[slots] = t
        return p

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(P, 64, generator=gen).to(dtype)
    W_aug = (torch.randn(M + k * R, 64, generator=gen) / 8).to(dtype)
    want = reference(dict(c, z=x.double() @ W_aug.double().T))
    U = torch.cat(c["Ut"], dim=1).float().contiguous()
    y, h = cpu_kernels.core_linear(x, W_aug, Ct_pool, pool(c["o"]), pool(c["d"]), U, c["offsets"] + [M], slots,
                                   s_pool, diagonal, blas=blas)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-6
    assert (y.double() - want[:, :M]).abs().max().item() <= tol * want[:, :M].abs().max().item()
    with pytest.raises(RuntimeError, match="s and diagonal come together"):
        cpu_kernels.core_linear(x, W_aug, Ct_pool, pool(c["o"]), pool(c["d"]), U, c["offsets"] + [M], slots, s_pool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_core_linear_with_torchs_gemm_gives_the_bits_of_matmul_then_core_delta(dtype, scaled):
    """`blas=True` is the decode path it replaced, in one call: torch's x · W_augᵀ, then `core_delta` on the
    product's y and h. Same bits, so serving's outputs do not change with it (SmolLM2's width: 3 members)."""
    assert cpu_kernels.available()
    c = case(dtype, scaled, P=32, R=16, sizes=(96, 32, 32))
    M, k, R = c["M"], c["k"], c["R"]
    slots = 1 + torch.randperm(33, generator=torch.Generator().manual_seed(8))[:32]
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(32, 80, generator=gen).to(dtype)
    W_aug = (torch.randn(M + k * R, 80, generator=gen) / 9).to(dtype)
    U = torch.cat(c["Ut"], dim=1).float().contiguous()

    def pool(t):
        if t is None:
            return None
        p = torch.full((34,) + t.shape[1:], float("nan"), dtype=t.dtype)
        p[slots] = t
        return p

    terms = (pool(c["Ct"]), pool(c["o"]), pool(c["d"]), U, c["offsets"] + [M])
    y, h = cpu_kernels.core_linear(x, W_aug, *terms, slots, blas=True)
    z = x @ W_aug.T
    cpu_kernels.core_delta(z[:, :M], z[:, M:], *terms, 1, slots=slots)
    assert torch.equal(y, z[:, :M]) and torch.equal(h, z[:, M:])
    assert not torch.equal(y, (x @ W_aug.T)[:, :M])  # the delta went in


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blas", [False, True], ids=["own-gemm", "torch-gemm"])
def test_core_linear_kernel_skips_zero_adapter_rows_and_takes_unflagged_rows_unscaled(dtype, blas):
    """A decode step as a mixed batch makes it: rows reading slot 0 (base rows, low-rank rows) get the GEMM's
    outputs alone (slot 0's terms are NaN here: never read), rows not flagged `scaled` (LoRA-XS's: o = 1, d = 0) the
    unscaled arithmetic, flagged rows (OSoRA's) the scaled one. Every row matches the formula, and the result is the
    same bits as with every adapted row taken as scaled."""
    assert cpu_kernels.available()
    c = case(dtype, True, P=14, R=16, sizes=(64, 32, 32), seed=11)
    P, k, R, M = c["P"], c["k"], c["R"], c["M"]
    kind = torch.arange(P) % 4  # 0: slot 0, 1: LoRA-XS, 2 and 3: OSoRA
    zero, plain = kind == 0, kind == 1
    c["o"][zero | plain], c["d"][zero | plain], c["Ct"][zero] = 1, 0, 0  # what the formula gives those rows
    slots = 1 + torch.randperm(P, generator=torch.Generator().manual_seed(12))
    slots[zero] = 0
    S = P + 1
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(P, 48, generator=gen).to(dtype)
    W_aug = (torch.randn(M + k * R, 48, generator=gen) / 7).to(dtype)
    want = reference(dict(c, z=x.double() @ W_aug.double().T))
    U = torch.cat(c["Ut"], dim=1).float().contiguous()

    def pool(t):
        p = torch.full((S,) + t.shape[1:], float("nan"), dtype=t.dtype)
        p[slots] = t  # slot 0 last written by a zero row: NaN again below
        p[0] = float("nan")
        return p

    terms = (pool(c["Ct"]), pool(c["o"]), pool(c["d"]), U, c["offsets"] + [M], slots)
    y, h = cpu_kernels.core_linear(x, W_aug, *terms, blas=blas, scaled=kind >= 2)
    bare = (x @ W_aug.T) if blas else cpu_kernels.skinny_linear(x, W_aug)
    assert torch.equal(y[zero], bare[zero, :M]) and torch.equal(h, bare[:, M:])
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-6
    assert (y.double() - want[:, :M]).abs().max().item() <= tol * want[:, :M].abs().max().item()
    y_all, _ = cpu_kernels.core_linear(x, W_aug, *terms, blas=blas)  # no flags: every adapted row scaled
    assert torch.equal(y, y_all)
    with pytest.raises(RuntimeError, match="scaled must be a contiguous CPU bool vector"):
        cpu_kernels.core_linear(x, W_aug, *terms, scaled=torch.ones(P - 1, dtype=torch.bool))


def test_core_linear_kernel_gives_the_same_bits_on_one_thread():
    """One thread runs the kernel's passes inline (no parallel region, no barriers) and each output is the same
    arithmetic whichever thread computes it: the results are identical."""
    c = case(torch.float32, True, P=32, R=16, sizes=(64, 32, 32))
    slots = 1 + torch.randperm(33, generator=torch.Generator().manual_seed(3))[:32]
    threads = torch.get_num_threads()
    y2, h2, _ = run_core_linear(c, 64, slots)
    torch.set_num_threads(1)
    try:
        y1, h1, _ = run_core_linear(c, 64, slots)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)


def test_core_linear_kernel_refuses_bad_inputs_with_a_message():
    assert cpu_kernels.available()
    c = case(torch.float32, True, P=3)
    M, k, R = c["M"], c["k"], c["R"]
    U = torch.cat(c["Ut"], dim=1).contiguous()
    x, W_aug = torch.randn(3, 16), torch.randn(M + k * R, 16)
    args = (c["Ct"], c["o"], c["d"], U, c["offsets"] + [M])
    with pytest.raises(RuntimeError, match="projection rows"):
        cpu_kernels.core_linear(x, W_aug[1:], *args, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_kernels.core_linear(x.double(), W_aug.double(), *args, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="slot 3 of row 1 is outside the pool of 3"):
        cpu_kernels.core_linear(x, W_aug, *args, torch.tensor([0, 3, 1]))
    with pytest.raises(RuntimeError, match="o and d"):
        cpu_kernels.core_linear(x, W_aug, c["Ct"], c["o"], None, U, c["offsets"] + [M], torch.tensor([0, 1, 2]))


def test_core_delta_kernel_refuses_slots_outside_the_pool():
    c = case(torch.float32, True, P=3)
    M = c["M"]
    U = torch.cat(c["Ut"], dim=1).contiguous()
    args = (c["z"][:, :M], c["z"][:, M:], c["Ct"], c["o"], c["d"], U, c["offsets"] + [M], 1)
    with pytest.raises(RuntimeError, match="slot 3 of row 1 is outside the pool of 3"):
        cpu_kernels.core_delta(*args, slots=torch.tensor([0, 3, 1]))
    with pytest.raises(RuntimeError, match="one entry per row"):
        cpu_kernels.core_delta(*args, slots=torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(P=4, R=16, sizes=(64, 32, 32), L=6), dict(P=3, R=6, sizes=(20, 9), L=5),
                                   dict(P=3, R=16, sizes=(40, 24), L=70)], ids=["R16", "R6-partial-tiles", "chunked"])
def test_core_delta_kernel_folds_diagonal_cores_like_dense_ones(shape, dtype):
    # OSoRA's cores are diag(S): the folded path recognises them and scales U instead of multiplying by C. A batch
    # mixes them with dense cores (LoRA-XS rows, or a diagonal core with one off-diagonal entry) in one call.
    assert cpu_kernels.available()
    c = case(dtype, True, **shape)
    Ct = c["Ct"].clone()
    eye = torch.eye(c["R"], dtype=torch.bool)
    Ct[0] = Ct[0] * eye  # row 0: every member diagonal
    Ct[1, 0] = Ct[1, 0] * eye  # row 1: member 0 diagonal, the others dense
    Ct[2] = Ct[2] * eye
    Ct[2, -1, 0, 1] = 0.5  # row 2: one member diagonal but for one entry (must take the dense fold)
    c["Ct"] = Ct
    y = run_kernel(c)
    want = reference(c)
    err = (y.double() - want).abs().max().item()
    assert err <= KERNEL_TOL[dtype] * want[:, : c["M"]].abs().max().item()


def gated_reference(y: torch.Tensor) -> torch.Tensor:
    gate, up = y.double().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# decode (L = 1) and prefill (L > 1) rows, unscaled and scaled (folded at prefill), members wider and narrower
# than a vector, and gates large enough to reach the exponential's clamp.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("shape", [dict(P=6, R=16, sizes=(80, 80), L=1), dict(P=3, R=16, sizes=(80, 80), L=9),
                                   dict(P=2, R=5, sizes=(7, 7), L=4), dict(P=3, R=16, sizes=(40, 40), L=70),
                                   dict(P=70, R=4, sizes=(24, 24), L=1)],
                         ids=["decode", "prefill", "narrow", "long-rows", "many-rows"])
def test_core_delta_kernel_applies_the_gated_activation_to_its_final_output(shape, scaled, dtype):
    assert cpu_kernels.available()
    c = case(dtype, scaled, seed=3, **shape)
    M = c["M"]
    c["z"][:, : M // 2] *= 30  # gates from about -100 to 100: silu's tails
    out = torch.full((c["z"].shape[0], M // 2), float("nan"), dtype=dtype)
    run_kernel(c, out=out)  # y is scratch now: prefill fuses the delta into the activation and never writes it back
    want = gated_reference(reference(c)[:, :M])  # the activation of the final outputs, from the formula
    tol = KERNEL_TOL[dtype]
    # bf16: the fused path rounds only out (the final y stays in float32 registers), the others also round y
    assert (out.double() - want).abs().max().item() <= 2 * tol * want.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_silu_matches_torch(dtype):
    assert cpu_kernels.available()
    gen = torch.Generator().manual_seed(1)
    y = (torch.randn(70, 2 * 37, generator=gen, dtype=torch.float64) * 20).to(dtype)
    y[0, 0], y[1, 1], y[2, 2] = -200.0, 200.0, 0.0  # past the clamp both ways, and zero
    out = cpu_kernels.gated_silu(y)
    want = gated_reference(y)
    tol = KERNEL_TOL[dtype]
    assert out.dtype == dtype and out.shape == (70, 37)
    assert (out.double() - want).abs().max().item() <= tol * want.abs().max().item()
    assert abs(out[0, 0].item()) < 1e-30 and torch.isfinite(out).all()  # silu(-200) is 0 to float precision


def test_gated_activation_refuses_groups_it_cannot_split_with_a_message():
    assert cpu_kernels.available()
    c = case(torch.float32, False)  # three members
    with pytest.raises(RuntimeError, match="two equal members"):
        run_kernel(c, out=torch.empty(c["P"], c["M"] // 2))
    with pytest.raises(RuntimeError, match=r"\(T, 2m\)"):
        cpu_kernels.gated_silu(torch.zeros(4, 5))


def test_core_delta_kernel_keeps_nan_and_rounds_bfloat16_like_torch():
    assert cpu_kernels.available()
    P, R, M = 1, 2, 16
    y = torch.zeros(P, M + R, dtype=torch.bfloat16)
    y[0, 3] = float("nan")
    y[0, M:] = torch.tensor([1.0, 0.0])
    Ct = torch.eye(R, dtype=torch.bfloat16).view(1, 1, R, R)
    U = torch.zeros(R, M)
    U[0] = torch.linspace(1.0, 1.06, M)  # between bf16 steps (2⁻⁷ here): truncating would differ from rounding
    cpu_kernels.core_delta(y[:, :M], y[:, M:], Ct, None, None, U, [0, M])
    expect = U[0].to(torch.bfloat16)
    assert torch.isnan(y[0, 3])
    mask = torch.arange(M) != 3
    assert torch.equal(y[0, :M][mask], expect[mask])


def test_core_delta_kernel_refuses_bad_shapes_with_a_message():
    assert cpu_kernels.available()
    c = case(torch.float32, True)
    M = c["M"]
    U = torch.cat(c["Ut"], dim=1).contiguous()
    with pytest.raises(RuntimeError, match="offsets"):
        cpu_kernels.core_delta(c["z"][:, :M], c["z"][:, M:], c["Ct"], c["o"], c["d"], U, [0, M - 1])
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        cpu_kernels.core_delta(c["z"][:, :M], c["z"][:, M:], c["Ct"], c["o"], c["d"], U.double(), c["offsets"] + [M])
    with pytest.raises(RuntimeError, match="o and d"):
        cpu_kernels.core_delta(c["z"][:, :M], c["z"][:, M:], c["Ct"], c["o"], None, U, c["offsets"] + [M])
    with pytest.raises(RuntimeError, match="tokens_per_row"):
        cpu_kernels.core_delta(c["z"][:, :M], c["z"][:, M:], c["Ct"], c["o"], c["d"], U, c["offsets"] + [M], 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,K,N", [(1, 8, 3), (5, 37, 10), (32, 64, 100), (65, 24, 7)])
def test_skinny_linear_matches_matmul(dtype, T, K, N):
    assert cpu_kernels.available()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T + 2, K, generator=gen).to(dtype)[1:-1]  # a row-strided view, as inside the runner
    W = torch.randn(N, K, generator=gen).to(dtype)
    want = x.double() @ W.double().T
    y = cpu_kernels.skinny_linear(x, W)
    assert y.dtype == dtype
    assert (y.double() - want).abs().max().item() <= (2 ** -8 if dtype == torch.bfloat16 else 1e-6) * want.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 3, 4])
def test_few_rows_read_weights_row_by_row_with_the_same_sums(dtype, T):
    """Up to 4 rows the kernel reads W one row at a time (one sequential stream), beyond that by tiles of rows side
    by side: every output is the same sum in the same order either way, so the bits agree."""
    assert cpu_kernels.available()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, 600, generator=gen).to(dtype)  # 600 = 37 vectors of 16 and a tail of 8
    W = torch.randn(101, 600, generator=gen).to(dtype)
    tiled = cpu_kernels.skinny_linear(x, W)
    streamed = cpu_kernels.skinny_linear(x[:T], W)
    assert torch.equal(streamed, tiled[:T])
    want = x[:T].double() @ W.double().T
    assert (streamed.double() - want).abs().max().item() <= (2 ** -8 if dtype == torch.bfloat16 else 1e-5) * want.abs().max().item()


def test_skinny_linear_rounds_bfloat16_to_nearest_even_and_keeps_nan():
    assert cpu_kernels.available()
    M = 16
    x = torch.ones(1, 8, dtype=torch.bfloat16)
    W = torch.zeros(M, 8, dtype=torch.bfloat16)
    W[:, 0] = 1.0
    W[3, 0] = float("nan")
    # outputs 1 + (between bf16 steps, 2⁻⁷ here): truncating would differ from rounding in half of them
    W[:, 1] = (torch.linspace(1.0, 1.06, M) - 1).to(torch.bfloat16)
    y = cpu_kernels.skinny_linear(x, W)[0]
    expect = (1 + W[:, 1].float()).to(torch.bfloat16)
    assert torch.isnan(y[3])
    mask = torch.arange(M) != 3
    assert torch.equal(y[mask], expect[mask])


def test_skinny_linear_refuses_bad_inputs_with_a_message():
    assert cpu_kernels.available()
    x, W = torch.randn(4, 16), torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="share K"):
        cpu_kernels.skinny_linear(x[:, :8], W)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_kernels.skinny_linear(x.double(), W.double())
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu_kernels.skinny_linear(x, W.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="W contiguous"):
        cpu_kernels.skinny_linear(x, torch.randn(16, 8).T)
