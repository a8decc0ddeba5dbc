"""A prefill's rotary embedding and KV cache write in the CPU kernel (`csrc/prefill_rotary.cpp`) against the PyTorch
ops it replaces (`runner.rotate` and the cache scatter), and the runner's prefill through it."""
from __future__ import annotations

import pytest
import torch

from svd_adapters import cpu_kernels
from svd_adapters.adapter import random_adapter
from svd_adapters.runner import BatchedRunner, rotate


@pytest.fixture(autouse=True)
def kernels_built():
    assert cpu_kernels.available(), "the CPU kernels did not build (see the log for the compiler's error)"


def qkv_views(T: int, Hq: int, Hkv: int, D: int, dtype: torch.dtype, seed: int):
    """q, k, v as the runner gets them: views of one group output with a row stride wider than the three."""
    y = torch.randn(T, (Hq + 2 * Hkv) * D + 7, generator=torch.Generator().manual_seed(seed)).to(dtype)
    q = y[:, : Hq * D].view(T, Hq, D)
    k = y[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    v = y[:, (Hq + Hkv) * D : (Hq + 2 * Hkv) * D].view(T, Hkv, D)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 48, 10])  # SmolLM2's head; a head of 1.5 AVX-512 vectors; scalar tails only
def test_prefill_rotary_gives_the_pytorch_ops_bits_and_writes_only_its_rows(dtype, D):
    P, L, Hq, Hkv = 3, 5, 6, 2
    T = P * L
    q, k, v = qkv_views(T, Hq, Hkv, D, dtype, seed=D)
    g = torch.Generator().manual_seed(1)
    cos, sin = torch.randn(T, 1, D, generator=g).to(dtype), torch.randn(T, 1, D, generator=g).to(dtype)
    k_cache = torch.randn(6, Hkv, 8, D, generator=g).to(dtype)
    v_cache = torch.randn(6, Hkv, 8, D, generator=g).to(dtype)
    rows = [4, 0, 2]  # out of order, and cache rows 1, 3, 5 and positions past L must stay as they are
    want_q, want_k = rotate(q, cos, sin), rotate(k, cos, sin)
    want_kc, want_vc = k_cache.clone(), v_cache.clone()
    want_kc[torch.tensor(rows), :, :L] = want_k.view(P, L, Hkv, D).transpose(1, 2)
    want_vc[torch.tensor(rows), :, :L] = v.view(P, L, Hkv, D).transpose(1, 2)
    v_before = v.clone()

    cpu_kernels.prefill_rotary(q, k, v, cos, sin, k_cache, v_cache, torch.tensor(rows), L)

    assert torch.equal(q, want_q) and torch.equal(k, want_k)  # the same roundings, bit for bit
    assert torch.equal(k_cache, want_kc) and torch.equal(v_cache, want_vc)
    assert torch.equal(v, v_before)


def test_prefill_rotary_refuses_bad_inputs_with_a_message():
    T, Hq, Hkv, D, L = 4, 2, 1, 8, 2
    q, k, v = qkv_views(T, Hq, Hkv, D, torch.float32, seed=0)
    cos, sin = torch.randn(T, D), torch.randn(T, D)
    kc, vc = torch.zeros(3, Hkv, 4, D), torch.zeros(3, Hkv, 4, D)
    rows = torch.tensor([0, 2])
    with pytest.raises(RuntimeError, match="cache row 3 is outside the cache's 3"):
        cpu_kernels.prefill_rotary(q, k, v, cos, sin, kc, vc, torch.tensor([0, 3]), L)
    with pytest.raises(RuntimeError, match="L must divide the 4 tokens"):
        cpu_kernels.prefill_rotary(q, k, v, cos, sin, kc, vc, rows, 3)
    with pytest.raises(RuntimeError, match="fit the cache's 4 positions"):
        cpu_kernels.prefill_rotary(q, k, v, cos, sin, kc, vc, torch.tensor([0]), 4 * 2)
    with pytest.raises(RuntimeError, match="must share one dtype"):
        cpu_kernels.prefill_rotary(q, k, v, cos.double(), sin, kc, vc, rows, L)
    with pytest.raises(RuntimeError, match="each row's heads contiguous"):
        cpu_kernels.prefill_rotary(q.transpose(1, 2), k, v, cos, sin, kc, vc, rows, L)
    with pytest.raises(RuntimeError, match="cos and sin must be contiguous"):
        cpu_kernels.prefill_rotary(q, k, v, cos[:, :4], sin, kc, vc, rows, L)
    with pytest.raises(RuntimeError, match="the head size must be even"):
        q3, k3, v3 = qkv_views(T, Hq, Hkv, 7, torch.float32, seed=0)
        cpu_kernels.prefill_rotary(q3, k3, v3, torch.randn(T, 7), torch.randn(T, 7), torch.zeros(3, Hkv, 4, 7),
                                   torch.zeros(3, Hkv, 4, 7), rows, L)
    assert not kc.any() and not vc.any()  # nothing written by a refused call


def test_the_runners_prefill_through_the_kernel_matches_the_pytorch_ops(tiny_base, tiny_factors, monkeypatch):
    """A mixed batch (every method, a base row, prompts of different lengths, KV rows out of order): the same logits
    at every position and the same KV cache, bit for bit, with the kernel and with the PyTorch ops."""
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=5, max_seq_len=16, core_slots=3, lr_slots=3)
    methods = ["osora", "loraxs", "sorsa", "lora"]
    adapters = [random_adapter(m, 4 + 2 * (i % 2), tiny_factors, tiny_base.name, seed=i) for i, m in enumerate(methods)]
    cs, ls = runner.place(adapters, tiny_factors)
    cs, ls = cs + [0], ls + [0]  # and a base row
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17], [18, 19, 20, 21, 22], [23, 24]]
    rows = [3, 0, 4, 1, 2]
    calls = []
    real = cpu_kernels.prefill_rotary
    monkeypatch.setattr(cpu_kernels, "prefill_rotary", lambda *a: calls.append(1) or real(*a))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        for c in runner.k_cache + runner.v_cache:
            c.zero_()
        logits = runner.prefill(prompts, rows, cs, ls, all_logits=True)
        return logits, [c.clone() for c in runner.k_cache + runner.v_cache]

    with_kernel, caches = run()
    assert len(calls) == len(runner.layers)
    monkeypatch.setattr(cpu_kernels, "rotates", lambda *a: False)
    without, torch_caches = run()
    assert len(calls) == len(runner.layers)
    assert torch.equal(with_kernel, without)
    assert all(torch.equal(a, b) for a, b in zip(caches, torch_caches))
    assert any(c.any() for c in caches)


def test_the_runner_takes_the_kernel_only_for_rows_of_contiguous_heads():
    q, k, v = qkv_views(4, 2, 1, 8, torch.float32, seed=0)
    cache = torch.zeros(2, 1, 4, 8)
    assert cpu_kernels.rotates(q, k, v, cache)
    assert not cpu_kernels.rotates(q, k.transpose(1, 2), v, cache)  # a head's numbers strided: PyTorch's ops instead
    assert not cpu_kernels.rotates(q, k, v, torch.zeros(2, 1, 4, 16)[..., :8])  # a non-contiguous cache
    assert not cpu_kernels.rotates(q.double(), k.double(), v.double(), cache.double())  # float64: not a kernel dtype
