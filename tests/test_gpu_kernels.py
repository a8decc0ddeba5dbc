"""The GPU core-delta kernel (Triton) against the PyTorch path: compiled on a GPU where there is one, else on
the CPU under Triton's interpreter (tests/conftest.py sets it up), which executes the kernel's own code (its
indexing, masks, member split, per-row cores, scales) with NumPy, so a wrong index or mask fails there too.
"""
from __future__ import annotations

import pytest
import torch

from svd_adapters import cpu_kernels, gpu_kernels
from svd_adapters.batched_linear import core_delta_
from svd_adapters.runner import BatchedRunner
from test_engine import adapters, merged_model  # noqa: F401  (adapters: the shared fixture)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(sizes: list[int], R: int, rows: int, L: int, scaled: bool, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    k, M, T = len(sizes), sum(sizes), rows * L
    offsets = [sum(sizes[:i]) for i in range(k)]
    z = rnd(T, M + k * R + 3)  # y and h are slices of one GEMM output at decode: h has a row stride ≠ k·R
    y, h = z[:, :M], z[:, M : M + k * R]
    Ct = rnd(rows, k, R, R)
    Ct[0] = 0  # a base row: no delta
    o = 1 + 0.1 * rnd(rows, M) if scaled else None
    d = rnd(rows, k * R) if scaled else None
    if scaled:
        o[0], d[0] = 1, 0
    Ut = [rnd(R, m) for m in sizes]
    return y, h, Ct, o, d, Ut, offsets


@pytest.mark.parametrize("sizes,R,L", [([96, 32, 32], 16, 1), ([64], 8, 1), ([70, 70], 24, 5), ([40, 24, 24], 4, 3)],
                         ids=["qkv-r16-decode", "single-r8", "gate-up-r24-prefill", "uneven-r4-prefill"])
@pytest.mark.parametrize("scaled", [True, False], ids=["osora", "loraxs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_pytorch_path(sizes, R, L, scaled, dtype):
    rows = 5
    y, h, Ct, o, d, Ut, offsets = case(sizes, R, rows, L, scaled, dtype, seed=len(sizes) * 100 + R + L)
    # the reference in float64 from the inputs as the kernel sees them (rounded to dtype; U is float32)
    rounded = (lambda t: None if t is None else t.to(dtype).double())
    ref = rounded(y)
    core_delta_(ref, rounded(h).reshape(rows, L, len(sizes), R), rounded(Ct), rounded(o), rounded(d),
                [u.float().double() for u in Ut], offsets)

    z = torch.cat([y, h], dim=1).to(DEVICE, dtype)
    y_k, h_k = z[:, : y.shape[1]], z[:, y.shape[1] :]
    cast = (lambda t: None if t is None else t.to(DEVICE, dtype))
    gpu_kernels.core_delta(y_k, h_k, cast(Ct), cast(o), cast(d), torch.cat(Ut, dim=1).to(DEVICE, torch.float32),
                           offsets + [sum(sizes)], L)
    y_k = y_k.cpu()
    base_rows = slice(0, L)  # row 0 has no adapter: its outputs must come back untouched
    assert torch.equal(y_k[base_rows], y.to(dtype)[base_rows])
    if dtype == torch.float32:
        torch.testing.assert_close(y_k.double(), ref, rtol=1e-5, atol=1e-5)
    else:  # float32 arithmetic, the result converted to bf16 once: within one bf16 ulp (2⁻⁷ relative)
        assert ((y_k.double() - ref).abs() <= ref.abs() * 2**-7 + 1e-6).all()
    assert (ref - rounded(y)).abs().max() > 0.1  # the delta is not vacuous


def test_kernel_rejects_what_it_cannot_take():
    y, h, Ct, o, d, Ut, offsets = case([32, 32], 8, 2, 1, True, torch.float32, seed=0)
    y, h, Ct, o = (t.to(DEVICE) for t in (y, h, Ct, o))
    U = torch.cat(Ut, dim=1).to(DEVICE, torch.float32)
    bounds = offsets + [64]
    with pytest.raises(ValueError, match="o and d together"):
        gpu_kernels.core_delta(y.float(), h.float(), Ct.float(), o.float(), None, U, bounds)
    with pytest.raises(ValueError, match="1 to 3 members"):
        gpu_kernels.core_delta(y.float(), h.float(), Ct.float(), None, None, U, offsets)
    with pytest.raises(ValueError, match="unit column strides"):
        gpu_kernels.core_delta(y.float().t().contiguous().t(), h.float(), Ct.float(), None, None, U, bounds)


def test_serves_only_cuda_tensors():
    assert not gpu_kernels.serves(torch.zeros(2, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, tests/test_cuda.py runs the model through the compiled kernel")
def test_runner_through_the_kernel_matches_merged_reference(tiny_base, tiny_factors, adapters, monkeypatch):
    """The model-level wiring (which h, cores, scales and bounds each group passes) at prefill and decode."""
    monkeypatch.setitem(cpu_kernels._state, "force", False)  # no CPU kernels: the kernel under test takes the delta
    calls = []
    kernel = gpu_kernels.core_delta
    monkeypatch.setattr(gpu_kernels, "serves", lambda y: True)
    monkeypatch.setattr(gpu_kernels, "core_delta", lambda *a, **kw: (calls.append(a[-1]), kernel(*a, **kw))[1])
    core = {k: a for k, a in adapters.items() if a.method in ("osora", "loraxs")}
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=8, max_seq_len=32, core_slots=8, lr_slots=2)
    cs, _ = runner.place(list(core.values()), tiny_factors)
    rows = list(core) + [None]
    cs = cs + [0]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 200, (int(n),), generator=gen).tolist() for n in torch.randint(3, 9, (len(rows),), generator=gen)]
    logits = runner.prefill(prompts, list(range(len(rows))), cs, [0] * len(rows), all_logits=True)
    nxt = torch.tensor([7] * len(rows))
    step = runner.decode(nxt, torch.tensor([len(p) for p in prompts]), runner.mapping(cs, [0] * len(rows)))
    groups = 4 * len(runner.layers)
    assert calls == [max(map(len, prompts))] * groups + [1] * groups  # every group, at prefill then decode
    for i, aid in enumerate(rows):
        with torch.no_grad():
            ref = merged_model(tiny_base, tiny_factors, core.get(aid))(torch.tensor([prompts[i] + [7]])).logits[0]
        assert (logits[i, : len(prompts[i])] - ref[:-1]).abs().max().item() <= 1e-4
        assert (step[i] - ref[-1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("shape", [dict(P=6, K=8, n=24, sizes=(12, 6, 6), ranks=[0, 8, 3, 5]),
                                   dict(P=9, K=32, n=70, sizes=(130, 64), ranks=[0, 32, 16, 32]),
                                   dict(P=3, K=4, n=5, sizes=(3,), ranks=[0, 4])],
                         ids=["qkv-partial-ranks", "gate-up-wide", "single-tiny"])
@pytest.mark.parametrize("R", [0, 5], ids=["lora", "sorsa-d-term"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_kernel_matches_the_formula(shape, R, dtype):
    """The decode step's low-rank kernel: each entry's row reads its slot's first `rank` rows of A and Bᵀ (NaN
    beyond them is never read) and, with the d-term, U_r (d ⊙ h); padded entries (row 0, slot 0) change nothing."""
    from test_lowrank_delta import pools_case, reference

    c = pools_case(dtype, **shape, R=R)
    want = reference(c)
    rows = torch.nonzero(c["slots"]).view(-1)
    pad = 3  # entries padded as decode graphs do: row 0, slot 0
    rows_e = torch.cat([rows, torch.zeros(pad, dtype=torch.long)])
    slots_e = torch.cat([c["slots"][rows], torch.zeros(pad, dtype=torch.long)])
    dev = (lambda t: t.to(DEVICE))
    y = dev(c["y"].clone())
    sub = (dev(c["h"]), dev(c["d"]), dev(c["U"]).float()) if R else ()
    gpu_kernels.lowrank_delta(y, dev(c["x"]), dev(c["A"]), [dev(b) for b in c["Bt"]], c["bounds"], dev(rows_e),
                              dev(slots_e), dev(c["ranks"]), *sub)
    y = y.cpu()
    assert not torch.isnan(y).any()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert (y.double() - want).abs().max().item() <= tol * want.abs().max().item()
    untouched = c["slots"] == 0
    assert torch.equal(y[untouched], c["y"][untouched])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, tests/test_cuda.py runs the model through the compiled kernel")
def test_runner_decode_through_the_lowrank_kernel_matches_merged_reference(tiny_base, tiny_factors, adapters, monkeypatch):
    """The model-level wiring of the low-rank kernel at decode (rows, slots, ranks, SORSA's h and d per group)."""
    monkeypatch.setitem(cpu_kernels._state, "force", False)
    calls = []
    kernel = gpu_kernels.lowrank_delta
    monkeypatch.setattr(gpu_kernels, "serves", lambda y: True)
    monkeypatch.setattr(gpu_kernels, "lowrank_delta", lambda *a, **kw: (calls.append(a[-4] is not None), kernel(*a, **kw))[1])
    chosen = {k: a for k, a in adapters.items() if a.method in ("sorsa", "lora", "loraxs")}
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=8, max_seq_len=32, core_slots=8, lr_slots=8)
    cs, ls = runner.place(list(chosen.values()), tiny_factors)
    rows = list(chosen) + [None]
    cs, ls = cs + [0], ls + [0]
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 200, (int(n),), generator=gen).tolist() for n in torch.randint(3, 9, (len(rows),), generator=gen)]
    runner.prefill(prompts, list(range(len(rows))), cs, ls)
    step = runner.decode(torch.tensor([7] * len(rows)), torch.tensor([len(p) for p in prompts]), runner.mapping(cs, ls))
    assert calls == [True] * (4 * len(runner.layers))  # every group at decode, with SORSA's d-term inputs
    for i, aid in enumerate(rows):
        with torch.no_grad():
            ref = merged_model(tiny_base, tiny_factors, chosen.get(aid))(torch.tensor([prompts[i] + [7]])).logits[0]
        assert (step[i] - ref[-1]).abs().max().item() <= 1e-4


# Member widths on and off the 32-column tiles (tiles that straddle two members), rows in and past one 16-row
# block, inputs past one 64-column step of the loop, ranks below and at the 16-wide padding.
@pytest.mark.parametrize("sizes,R,T,K", [([40, 24, 24], 4, 5, 70), ([70, 70], 8, 3, 40), ([64], 16, 17, 64)],
                         ids=["qkv-straddling", "gate-up", "single-r16-17rows"])
@pytest.mark.parametrize("scaled", [True, False], ids=["osora", "loraxs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_core_matches_the_gemm_then_the_delta(sizes, R, T, K, scaled, dtype):
    """The fused decode kernel against its definition: [y | h] = x · W_augᵀ, then each row's core delta with that
    h (float64 from the inputs as the kernel sees them)."""
    y0, _, Ct, o, d, Ut, offsets = case(sizes, R, T, 1, scaled, dtype, seed=len(sizes) + R + T)
    gen = torch.Generator().manual_seed(T)
    M, k = sum(sizes), len(sizes)
    x = (torch.randn(T + 1, K, generator=gen, dtype=torch.float64)[1:]).to(dtype)  # a row-strided view
    W_aug = (torch.randn(M + k * R, K, generator=gen, dtype=torch.float64) / K ** 0.5).to(dtype)
    rounded = (lambda t: None if t is None else t.to(dtype).double())
    z = x.double() @ W_aug.double().T
    want_y, want_h = z[:, :M].clone(), z[:, M:]
    core_delta_(want_y, want_h.reshape(T, 1, k, R), rounded(Ct), rounded(o), rounded(d),
                [u.float().double() for u in Ut], offsets)
    dev = (lambda t: None if t is None else t.to(DEVICE))
    y, h = gpu_kernels.linear_core(dev(x), dev(W_aug), dev(rounded(Ct).to(dtype)), dev(o if o is None else o.to(dtype)),
                                   dev(d if d is None else d.to(dtype)), torch.cat(Ut, dim=1).to(DEVICE, torch.float32),
                                   offsets + [M])
    y, h = y.cpu().double(), h.cpu().double()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7  # bf16: products in float32, y rounded once
    assert (h - want_h).abs().max().item() <= tol * want_h.abs().max().item()
    assert (y - want_y).abs().max().item() <= tol * want_y.abs().max().item()
    assert (want_y - z[:, :M]).abs().max() > 0.1  # the delta is not vacuous


def test_linear_core_rejects_what_it_cannot_take():
    _, _, Ct, o, d, Ut, offsets = case([32, 32], 8, 2, 1, True, torch.float32, seed=0)
    x, W_aug, U = torch.randn(2, 16), torch.randn(64 + 16, 16), torch.cat(Ut, dim=1).float()
    with pytest.raises(ValueError, match="o and d together"):
        gpu_kernels.linear_core(x, W_aug, Ct.float(), o.float(), None, U, offsets + [64])
    with pytest.raises(ValueError, match="up to 64 rows"):
        gpu_kernels.linear_core(x, W_aug[:-1], Ct.float(), None, None, U, offsets + [64])
    with pytest.raises(ValueError, match="1 to 3 members"):
        gpu_kernels.linear_core(x, W_aug, Ct.float(), None, None, U, offsets)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, tests/test_cuda.py covers the fused decode")
def test_runner_decodes_through_the_fused_kernel(tiny_base, tiny_factors, adapters, monkeypatch):
    """With SVDSERVE_GPU_FUSED_DECODE=1 every group of a decode step goes through `linear_core` (GEMM, h and core
    delta in one launch) and each row's logits still equal its adapter merged into the base."""
    monkeypatch.setitem(cpu_kernels._state, "force", False)  # no CPU kernels: the GPU kernels take the step
    monkeypatch.setenv("SVDSERVE_GPU_FUSED_DECODE", "1")
    monkeypatch.setattr(gpu_kernels, "serves", lambda y: True)
    calls = []
    kernel = gpu_kernels.linear_core
    monkeypatch.setattr(gpu_kernels, "linear_core", lambda *a: (calls.append(a[0].shape[0]), kernel(*a))[1])
    core = {k: a for k, a in adapters.items() if a.method in ("osora", "loraxs")}
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=8, max_seq_len=32, core_slots=8, lr_slots=2)
    cs, _ = runner.place(list(core.values()), tiny_factors)
    rows, cs = list(core) + [None], cs + [0]
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 200, (int(n),), generator=gen).tolist() for n in torch.randint(3, 9, (len(rows),), generator=gen)]
    runner.prefill(prompts, list(range(len(rows))), cs, [0] * len(rows))
    assert calls == []  # prefill keeps the GEMM and the delta kernel
    step = runner.decode(torch.tensor([7] * len(rows)), torch.tensor([len(p) for p in prompts]),
                         runner.mapping(cs, [0] * len(rows)))
    assert calls == [len(rows)] * (4 * len(runner.layers))
    for i, aid in enumerate(rows):
        with torch.no_grad():
            ref = merged_model(tiny_base, tiny_factors, core.get(aid))(torch.tensor([prompts[i] + [7]])).logits[0]
        assert (step[i] - ref[-1]).abs().max().item() <= 1e-4
