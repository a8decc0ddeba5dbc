"""A decode step's attention in the CPU kernel (`csrc/decode_attention.cpp`) against PyTorch's SDPA with the mask
the runner used before it, and the runner's decode step with the kernel against the same step without it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from svd_adapters import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels need a C++ compiler")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Row t's query heads against its cached keys [0, pos[t]], grouped-query heads sharing a KV head (in float64;
    the masked positions' NaNs zeroed, which the mask's zero weights would otherwise carry into the sums)."""
    T, Hq, D = q.shape
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    Hkv, L = k.shape[1], int(pos.max()) + 1
    mask = (torch.arange(L)[None, :] <= pos[:, None]).view(T, 1, 1, L)
    o = F.scaled_dot_product_attention(q.view(T, Hkv, Hq // Hkv, D).double(), k[:T, :, :L].double(),
                                       v[:T, :, :L].double(), attn_mask=mask)
    return o.reshape(T, Hq, D)


def case(T: int, Hq: int, Hkv: int, D: int, S: int, dtype: torch.dtype, seed: int = 0):
    """Queries, a cache with two rows more than T (rows the kernel must not read) and every position past a row's
    own set to NaN (a kernel that read past it would show it), positions including 0 and S - 1."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, Hq, D, generator=gen).to(dtype)
    k = torch.randn(T + 2, Hkv, S, D, generator=gen).to(dtype)
    v = torch.randn(T + 2, Hkv, S, D, generator=gen).to(dtype)
    pos = torch.randint(0, S, (T,), generator=gen)
    pos[0], pos[-1] = 0, S - 1
    for t in range(T):
        k[t, :, pos[t] + 1 :] = float("nan")
        v[t, :, pos[t] + 1 :] = float("nan")
    k[T:], v[T:] = float("nan"), float("nan")
    return q, k, v, pos


SHAPES = [  # (T, query heads, KV heads, head size, cache length)
    (32, 9, 3, 64, 72),  # SmolLM2-135M: 3 query heads per KV head
    (5, 8, 8, 128, 300),  # no grouping, a longer cache
    (7, 32, 8, 128, 100),  # Llama-style grouping of 4
    (3, 4, 2, 16, 9),  # the tests' tiny model
    (2, 4, 1, 48, 40),  # a head size no vector width divides into a fixed count
]


@pytest.mark.parametrize("shape", SHAPES)
def test_decode_attention_matches_sdpa_and_reads_only_each_rows_own_positions(shape):
    T, Hq, Hkv, D, S = shape
    q, k, v, pos = case(T, Hq, Hkv, D, S, torch.float32)
    got = cpu_kernels.decode_attention(q, k, v, pos, D ** -0.5)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert torch.isfinite(got).all()
    assert (got.double() - sdpa(q, k, v, pos)).abs().max() <= 1e-5


def test_decode_attention_in_bfloat16_within_one_rounding():
    q, k, v, pos = case(6, 12, 4, 64, 50, torch.bfloat16, seed=3)
    got = cpu_kernels.decode_attention(q, k, v, pos, 64 ** -0.5)
    assert got.dtype == torch.bfloat16
    want = sdpa(q, k, v, pos)
    assert ((got.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-6).all()


def test_decode_attention_gives_the_same_bits_on_one_thread():
    q, k, v, pos = case(16, 9, 3, 64, 72, torch.float32, seed=5)
    full = cpu_kernels.decode_attention(q, k, v, pos, 0.125)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = cpu_kernels.decode_attention(q, k, v, pos, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(full, one)


def test_decode_attention_refuses_bad_inputs_with_a_message():
    q, k, v, pos = case(4, 4, 2, 16, 8, torch.float32)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.decode_attention(q, k, v, torch.tensor([0, 1, 2, 8]), 0.25)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        cpu_kernels.decode_attention(torch.randn(4, 3, 16), k, v, pos, 0.25)
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu_kernels.decode_attention(q.double(), k, v, pos, 0.25)
    with pytest.raises(RuntimeError, match="head sizes"):
        cpu_kernels.decode_attention(torch.randn(4, 4, 12), torch.randn(4, 2, 8, 12), torch.randn(4, 2, 8, 12), pos, 0.25)


def test_the_runner_uses_the_kernel_only_where_it_takes_the_shapes():
    cache = torch.zeros(4, 2, 8, 64)
    assert cpu_kernels.attends(4, cache)
    assert not cpu_kernels.attends(4, torch.zeros(4, 2, 8, 24))  # head size not a multiple of 16: SDPA
    assert not cpu_kernels.attends(4, cache.double())
    assert not cpu_kernels.attends(4, cache.transpose(1, 2))  # not contiguous
    saved = cpu_kernels._state.get("force")
    try:
        cpu_kernels.force(False)  # "no kernels" means this one too
        assert not cpu_kernels.attends(4, cache)
    finally:
        cpu_kernels.force(saved)


def test_decode_steps_with_the_kernel_match_sdpa_through_the_runner(tiny_base, tiny_factors, monkeypatch):
    """Rows at different positions (a row of the batch started later), decoded a few steps with the kernel and
    with SDPA (everything else as calibrated, so only attention differs)."""
    from svd_adapters.runner import BatchedRunner

    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=4, max_batch=3, max_seq_len=32, core_slots=2, lr_slots=2)
    assert cpu_kernels.attends(runner.n_heads, runner.k_cache[0])
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    mp = runner.mapping([0, 0, 0], [0, 0, 0])
    outs = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(cpu_kernels, "attends", lambda *a: False)
        runner.prefill(prompts, [0, 1, 2], [0, 0, 0], [0, 0, 0])
        pos = [len(p) for p in prompts]
        tokens = torch.tensor([20, 21, 22])
        steps = []
        for _ in range(4):
            logits = runner.decode(tokens, torch.tensor(pos), mp)
            steps.append(logits)
            tokens = logits.argmax(-1)
            pos = [p + 1 for p in pos]
        outs[fused] = torch.stack(steps)
    assert (outs[True] - outs[False]).abs().max() <= 1e-5
