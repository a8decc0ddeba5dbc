"""The low-rank delta (SORSA, LoRA rows) in the CPU kernel (`csrc/lowrank_delta.cpp`), at decode and prefill,
against the formula, read from slot pools as the model calls it, and through GroupPools against the PyTorch path."""
from __future__ import annotations

import pytest
import torch

from svd_adapters import cpu_kernels
from svd_adapters.batched_linear import GroupPools, SlotMapping

# bf16: accumulated in float32 and rounded once on the way out, so within one bf16 rounding (2⁻⁸ relative).
TOL = {torch.bfloat16: 2 ** -8, torch.float32: 1e-6, torch.float64: 1e-14}


def pools_case(dtype: torch.dtype, P: int, K: int, n: int, sizes: tuple[int, ...], ranks: list[int], L: int = 1,
               seed: int = 0, R: int = 0):
    """One layer's slot pools (S = len(ranks) slots, slot 0 the empty one) with slot s filled up to ranks[s] rows
    and NaN beyond (a kernel that read past a slot's rank would show it); P request rows of L tokens each: their
    inputs, outputs and slots. With R: also the tokens' shared projections h (T, k·R), the slots' d-terms (odd
    slots only, each with a zero tail: SORSA of a rank below R) and U (R, M) in the accumulation dtype."""
    gen = torch.Generator().manual_seed(seed)
    k, S = len(sizes), len(ranks)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    A = torch.full((S, k * K, n), float("nan"), dtype=dtype)
    Bt = [torch.full((S, K, m), float("nan"), dtype=dtype) for m in sizes]
    for s, r in enumerate(ranks):
        for i in range(k):
            A[s, i * K : i * K + r] = rnd(r, n)
            Bt[i][s, :r] = rnd(r, sizes[i])
    slots = torch.randint(0, S, (P,), generator=gen)
    slots[0] = 0  # a row without a low-rank adapter
    x = rnd(P * L + 1, n)[1:]  # an offset view: rows need not start at the buffer's start
    y = rnd(P * L, sum(sizes))
    bounds = [0]  # the members' column bounds
    for m in sizes:
        bounds.append(bounds[-1] + m)
    c = dict(A=A, Bt=Bt, slots=slots, ranks=torch.tensor(ranks), x=x, y=y, K=K, sizes=list(sizes), bounds=bounds,
             L=L, R=R)
    if R:
        d = rnd(S, k * R)
        d[::2] = 0  # slots without a d-term (LoRA)
        d.view(S, k, R)[:, :, R - 1] = 0
        c.update(h=rnd(P * L, k * R), d=d, U=rnd(R, sum(sizes)).to(torch.promote_types(dtype, torch.float32)))
    return c


def reference(c) -> torch.Tensor:
    want = c["y"].double().clone()
    offsets = c["bounds"]
    for tok in range(want.shape[0]):
        s = int(c["slots"][tok // c["L"]])
        r = int(c["ranks"][s])
        if s == 0:
            continue
        for i in range(len(c["sizes"])):
            A = c["A"][s, i * c["K"] : i * c["K"] + r].double()
            t = A @ c["x"][tok].double()
            want[tok, offsets[i] : offsets[i + 1]] += t @ c["Bt"][i][s, :r].double()
            if c["R"]:
                R = c["R"]
                e = c["d"][s, i * R : (i + 1) * R].double() * c["h"][tok, i * R : (i + 1) * R].double()
                want[tok, offsets[i] : offsets[i + 1]] += e @ c["U"][:, offsets[i] : offsets[i + 1]].double()
    return want


def run(c) -> torch.Tensor:
    y = c["y"].clone()
    sub = (c["h"], c["d"], c["U"]) if c["R"] else ()
    cpu_kernels.lowrank_delta(y, c["x"], c["A"], c["Bt"], c["bounds"], c["slots"], c["ranks"], c["L"], *sub)
    return y


# Decode: widths that are and are not multiples of the kernel's vectors (16 floats; 64-wide tiles), inputs that
# are and are not, ranks that are and are not multiples of its 4-row blocks, partly filled slots (LoRA in a
# SORSA-sized pool). Prefill: rows of several tokens (the tile path), also more than one chunk of 64 tokens, with
# ranks that leave every kind of narrower tile (1 to 4 vectors of the projection's outer products, and more than
# one block of them) and widths that leave columns past the last tile.
SHAPES = [dict(P=5, K=8, n=24, sizes=(12, 6, 6), ranks=[0, 8, 3, 5]),
          dict(P=32, K=32, n=64, sizes=(128, 64, 64), ranks=[0, 32, 16, 32, 16]),
          dict(P=7, K=6, n=37, sizes=(70, 33), ranks=[0, 6, 1]),
          dict(P=3, K=4, n=5, sizes=(3,), ranks=[0, 4]),
          dict(P=4, K=8, n=24, sizes=(12, 6, 6), ranks=[0, 8, 3, 5], L=7),
          dict(P=6, K=32, n=40, sizes=(64, 33), ranks=[0, 32, 16], L=5),
          dict(P=3, K=32, n=70, sizes=(130, 64, 17), ranks=[0, 32, 16, 5, 13, 20], L=70),
          dict(P=4, K=40, n=33, sizes=(40, 24), ranks=[0, 40, 36, 20, 7], L=9)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"P{s['P']}-L{s.get('L', 1)}-K{s['K']}-n{s['n']}-k{len(s['sizes'])}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("R", [0, 5, 16], ids=["no-d", "d-R5", "d-R16"])
def test_lowrank_kernel_matches_the_formula_reading_only_filled_rows(shape, dtype, R):
    assert cpu_kernels.available()
    c = pools_case(dtype, **shape, R=R)
    y = run(c)
    want = reference(c)
    assert not torch.isnan(y).any()  # NaN past each slot's rank was never read
    err = (y.double() - want).abs().max().item()
    assert err <= TOL[dtype] * want.abs().max().item()
    plain = c["slots"].repeat_interleave(c["L"]) == 0
    assert torch.equal(y[plain], c["y"][plain])  # rows without one are untouched


def test_lowrank_kernel_refuses_bad_inputs_with_a_message():
    c = pools_case(torch.float32, P=3, K=4, n=8, sizes=(6, 2), ranks=[0, 4, 2])
    args = (c["y"], c["x"], c["A"], c["Bt"], [0, 6, 8])
    with pytest.raises(RuntimeError, match="slot 3 of row 1 is outside the pool of 3"):
        cpu_kernels.lowrank_delta(*args, torch.tensor([0, 3, 1]), c["ranks"])
    with pytest.raises(RuntimeError, match="rank 5 of slot 1"):
        cpu_kernels.lowrank_delta(*args, torch.tensor([0, 1, 1]), torch.tensor([0, 5, 2]))
    with pytest.raises(RuntimeError, match="one Bt per member"):
        cpu_kernels.lowrank_delta(c["y"], c["x"], c["A"], c["Bt"][:1], [0, 6, 8], c["slots"], c["ranks"])
    with pytest.raises(RuntimeError, match="offsets"):
        cpu_kernels.lowrank_delta(c["y"], c["x"], c["A"], c["Bt"], [0, 6, 7], c["slots"], c["ranks"])
    with pytest.raises(RuntimeError, match="tokens_per_row"):
        cpu_kernels.lowrank_delta(*args, c["slots"], c["ranks"], 2)
    sub = pools_case(torch.float32, P=3, K=4, n=8, sizes=(6, 2), ranks=[0, 4, 2], R=3)
    with pytest.raises(RuntimeError, match="h, d and U come together"):
        cpu_kernels.lowrank_delta(*args, c["slots"], c["ranks"], 1, sub["h"], sub["d"], None)
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        cpu_kernels.lowrank_delta(*args, c["slots"], c["ranks"], 1, sub["h"], sub["d"], sub["U"].double())
    with pytest.raises(RuntimeError, match="d must be a"):
        cpu_kernels.lowrank_delta(*args, c["slots"], c["ranks"], 1, sub["h"], sub["d"][:2], sub["U"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_pools_record_each_slots_rank_and_the_kernel_agrees_with_the_gather_path(dtype):
    """Through GroupPools as the runner fills them: rank-2r and rank-r LoRA adapters, one rewritten with a smaller
    rank (the recorded rank follows), a SORSA-like one with a d-term, and a cleared slot; the kernel's decode
    delta equals the PyTorch gather path's."""
    from svd_adapters.terms import DeltaTerms
    from svd_adapters.batched_linear import lowrank_delta

    gen = torch.Generator().manual_seed(3)
    R, n, sizes, layers = 4, 24, [20, 12], [0, 1]
    pools = GroupPools(sizes, n, n_layers=2, R=R, core_slots=2, lr_slots=5, like=torch.zeros(1, dtype=dtype))

    def fill(slot: int, r: int, sub: bool = False) -> None:
        pools.clear_lr(slot)
        for i, m in enumerate(sizes):
            d = -torch.rand(2, r, generator=gen) if sub else None
            t = DeltaTerms(rank=r if sub else 0, A=torch.randn(2, r, n, generator=gen), B=torch.randn(2, m, r, generator=gen), d=d)
            pools.write_lr(slot, layers, i, t)

    fill(1, 2 * R), fill(2, R), fill(3, 2 * R), fill(4, 3, sub=True)
    fill(3, 3)  # rewritten with a smaller rank: the stale rows beyond 3 are cleared, the rank follows
    assert pools.lr_rank.tolist() == [0, 2 * R, R, 3, 3]
    assert float(pools.A[:, 3, 3:2 * R].abs().sum()) == 0.0
    assert float(pools.lr_d[:, :4].abs().sum()) == 0.0 and float(pools.lr_d[:, 4].abs().sum()) > 0
    slots = [1, 0, 2, 3, 4, 2, 4]
    mp = SlotMapping.build([0] * len(slots), slots, set(), lr_sub_slots={4})
    assert mp.lr_sub
    x = torch.randn(len(slots), n, generator=gen).to(dtype)
    h = torch.randn(len(slots), len(sizes) * R, generator=gen).to(dtype)
    Ut = [torch.randn(R, m, generator=gen) for m in sizes]
    U = torch.cat(Ut, dim=1).contiguous()
    for layer in layers:
        A, Bts, d = pools.lr_layer(layer)
        y = torch.zeros(len(slots), sum(sizes), dtype=dtype)
        cpu_kernels.lowrank_delta(y, x, A, Bts, [0, sizes[0], sum(sizes)], mp.lr_idx, pools.lr_rank, 1, h, d, U)
        sel, sl = mp.lr_rows, mp.lr_row_slots
        hd = (h[sel] * d[sl])[:, None]
        delta = lowrank_delta(x[sel, None], A[sl], [Bt[sl] for Bt in Bts], pools.K, hd, [u.to(dtype) for u in Ut])
        want = torch.zeros_like(y).index_add_(0, sel, delta[:, 0])
        assert (y.double() - want.double()).abs().max().item() <= TOL[dtype] * 4 * want.abs().max().item()
    pools.clear_lr(4)
    assert int(pools.lr_rank[4]) == 0 and float(pools.lr_d[:, 4].abs().sum()) == 0
