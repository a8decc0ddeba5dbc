"""RMSNorm in the CPU kernel (`csrc/rms_norm.cpp`) against the model's own module (HF's LlamaRMSNorm), and the
runner using it for every norm of a step."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from svd_adapters import cpu_kernels


@pytest.fixture(autouse=True)
def kernels_built():
    assert cpu_kernels.available(), "the CPU kernels did not build (see the log for the compiler's error)"


def module(H: int, dtype: torch.dtype, seed: int) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(H, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(H, generator=torch.Generator().manual_seed(seed)) * 0.5 + 1.0)
    return norm.to(dtype)


@pytest.mark.parametrize("T, H", [(1, 64), (32, 576), (300, 576), (5, 37)])  # decode, a prefill's rows, odd width
def test_rms_norm_matches_the_models_module_in_float32(T, H):
    norm = module(H, torch.float32, seed=T)
    x = torch.randn(T, H + 3, generator=torch.Generator().manual_seed(H))[:, 1 : H + 1] * 3  # strided rows
    got = cpu_kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
    want = norm(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert ((got - want).abs() <= 1e-6 * want.abs().clamp(min=1.0)).all()


def test_rms_norm_in_bfloat16_rounds_where_the_module_does():
    norm = module(576, torch.bfloat16, seed=1)
    x = (torch.randn(16, 576, generator=torch.Generator().manual_seed(2)) * 2).to(torch.bfloat16)
    got = cpu_kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
    want = norm(x)
    assert got.dtype == torch.bfloat16
    # the same two roundings (x / rms to bf16, then the weight's product): equal but for an ulp where the rms differs
    # in its last float bit
    assert ((got.float() - want.float()).abs() <= 2 ** -7 * want.float().abs()).all()
    assert (got == want).float().mean() > 0.99


def test_rms_norm_refuses_bad_inputs_with_a_message():
    with pytest.raises(RuntimeError, match=r"the weight must be \(H,\)"):
        cpu_kernels.rms_norm(torch.randn(2, 8), torch.ones(9), 1e-5)
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu_kernels.rms_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.float64), 1e-5)
    with pytest.raises(RuntimeError, match="each row contiguous"):
        cpu_kernels.rms_norm(torch.randn(8, 2).T, torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="rms_norm takes float32 or bfloat16, got Double"):
        cpu_kernels.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), 1e-5)


def test_every_norm_of_a_step_goes_through_the_kernel_with_the_modules_results(tiny_base, tiny_factors, monkeypatch):
    from svd_adapters.runner import BatchedRunner  # noqa: PLC0415

    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=4, max_batch=2, max_seq_len=16, core_slots=2, lr_slots=2)
    assert runner.rms_norms
    calls = []
    real = cpu_kernels.rms_norm
    monkeypatch.setattr(cpu_kernels, "rms_norm", lambda *a: calls.append(1) or real(*a))
    prompts, mp = [[5, 6, 7], [8, 9]], runner.mapping([0, 0], [0, 0])
    with_kernel = runner.prefill(prompts, [0, 1], [0, 0], [0, 0])
    step = runner.decode(torch.tensor([10, 11]), torch.tensor([3, 2]), mp)
    layers = len(runner.layers)
    assert len(calls) == 2 * (2 * layers + 1)  # ln1, ln2 per layer and the final norm, at prefill and at decode
    monkeypatch.setattr(runner, "rms_norms", False)  # the modules themselves
    without = runner.prefill(prompts, [0, 1], [0, 0], [0, 0])
    assert (with_kernel - without).abs().max() <= 1e-5
    assert (step - runner.decode(torch.tensor([10, 11]), torch.tensor([3, 2]), mp)).abs().max() <= 1e-5
