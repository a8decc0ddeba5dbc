"""core_delta_'s decode paths (one GEMM per member, or one block-diagonal GEMM per group) against the formula."""
from __future__ import annotations

import pytest
import torch

from svd_adapters.batched_linear import core_delta_


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64 takes the block-diagonal path
@pytest.mark.parametrize("scaled", [False, True])
def test_decode_delta_matches_the_formula(dtype, scaled):
    gen = torch.Generator().manual_seed(0)
    P, R, sizes = 5, 4, [12, 6, 6]
    k, M = len(sizes), sum(sizes)
    offsets = [sum(sizes[:i]) for i in range(k)]
    Ut = [torch.randn(R, m, generator=gen, dtype=torch.float64).to(dtype) for m in sizes]
    h = torch.randn(P, 1, k, R, generator=gen, dtype=torch.float64).to(dtype)
    Ct = torch.randn(P, k, R, R, generator=gen, dtype=torch.float64).to(dtype)
    o = torch.randn(P, M, generator=gen, dtype=torch.float64).to(dtype) if scaled else None
    d = torch.randn(P, k * R, generator=gen, dtype=torch.float64).to(dtype) if scaled else None
    y0 = torch.randn(P, M + k * R, generator=gen, dtype=torch.float64).to(dtype)  # + h's columns, as in LinearGroup
    y = y0.clone()
    core_delta_(y[:, :M], h, Ct, o, d, Ut, offsets, scratch=torch.empty(P * M, dtype=dtype),
                Ut_blockdiag=torch.block_diag(*Ut))
    want = y0.double().clone()
    for p in range(P):
        for i, off in enumerate(offsets):
            hi = h[p, 0, i].double()
            g = hi @ Ct[p, i].double()  # Ct is Cᵀ: row vector h·Cᵀ = (C h)ᵀ
            delta = g @ Ut[i].double()
            if scaled:
                delta = delta * o[p, off : off + sizes[i]].double() + (hi * d[p, i * R : (i + 1) * R].double()) @ Ut[i].double()
            want[p, off : off + sizes[i]] += delta
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (y.double() - want).abs().max().item() <= tol
    assert torch.equal(y[:, M:], y0[:, M:])  # h's columns are left alone
