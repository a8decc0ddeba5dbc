"""The adapter math on the tiny random Llama: zero delta at init, merged == unmerged, param counts, SORSA's regularizer."""
from __future__ import annotations

import copy

import pytest
import torch

from svd_adapters import inject, sorsa
from svd_adapters.adapter import new_adapter
from svd_adapters.factors import TARGET_MODULES, target_linears

METHODS = ["osora", "loraxs", "sorsa", "lora"]
RANK = 8


@pytest.fixture(scope="module")
def tiny(tiny_base, tiny_factors):
    return tiny_base, tiny_factors


@pytest.fixture(scope="module")
def inputs():
    return torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def logits_with(base, factors, adapter, ids) -> torch.Tensor:
    inject.attach(base.model, adapter, factors)
    try:
        return logits(base.model, ids)
    finally:
        inject.detach(base.model)


def perturbed(adapter, scale: float = 0.05, seed: int = 0):
    """The adapter with every tensor moved by noise, so the delta is clearly non-zero."""
    g = torch.Generator().manual_seed(seed)
    for params in adapter.params.values():
        for k, t in params.items():
            params[k] = t + scale * torch.randn(t.shape, generator=g) * (t.abs().mean() + 1)
    return adapter


@pytest.mark.parametrize("method", METHODS)
def test_init_reproduces_base(tiny, inputs, method):
    base, factors = tiny
    ref = logits(base.model, inputs)
    out = logits_with(base, factors, new_adapter(method, RANK, factors, base.name), inputs)
    diff = (out - ref).abs().max().item()
    if method == "lora":
        assert torch.equal(out, ref)  # B = 0: the delta is exactly zero
    elif method == "loraxs":
        # R ~ N(0, 1e-5²): the delta is on the scale of the init, not exactly zero ...
        assert diff <= 1e-4  # measured 1.7e-5 on the tiny model
        # ... and with R = 0 it is gone up to float32 rounding.
        zero = new_adapter(method, RANK, factors, base.name)
        for p in zero.params.values():
            p["R"].zero_()
        assert (logits_with(base, factors, zero, inputs) - ref).abs().max().item() <= 1e-5
    else:
        assert diff <= 1e-5, f"{method}: max |Δlogits| {diff:.2e} at init"


@pytest.mark.parametrize("method", METHODS)
def test_merged_equals_unmerged(tiny, inputs, method):
    base, factors = tiny
    adapter = perturbed(new_adapter(method, RANK, factors, base.name, seed=3))
    unmerged = logits_with(base, factors, adapter, inputs)
    merged_model = copy.deepcopy(base.model)
    inject.merge_into(merged_model, adapter, factors)
    merged = logits(merged_model, inputs)
    assert (unmerged - logits(base.model, inputs)).abs().max() > 1e-3  # the perturbation really changes outputs
    assert (merged - unmerged).abs().max().item() <= 1e-5


def _formula(method: str, m: int, n: int, r: int) -> int:
    return {"osora": m + r, "loraxs": r * r, "sorsa": r * (m + n + 1), "lora": r * (m + n)}[method]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("targets", [TARGET_MODULES, ("q_proj", "v_proj")])
def test_param_counts(tiny, method, targets):
    base, factors = tiny
    adapter = new_adapter(method, RANK, factors, base.name, target_modules=targets)
    linears = target_linears(base.model, targets)
    want = sum(_formula(method, *lin.weight.shape, RANK) for lin in linears.values())
    assert adapter.trainable_params() == want
    assert set(adapter.params) == set(linears)


def _ortho_error(U: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(U.T @ U - torch.eye(U.shape[1])).item()


def test_sorsa_regularizer_zero_at_init_and_restoring(tiny):
    base, factors = tiny
    adapter = new_adapter("sorsa", RANK, factors, base.name)
    params = list(adapter.params.values())
    assert sorsa.orthonormal_regularizer(params).item() <= 1e-5

    g = torch.Generator().manual_seed(0)
    U0 = params[0]["U"] + 0.05 * torch.randn(params[0]["U"].shape, generator=g)
    U = U0.clone().requires_grad_(True)
    reg = sorsa.orthonormal_regularizer([{"U": U, "V": params[0]["V"]}])
    assert reg.item() > 1e-2
    reg.backward()
    with torch.no_grad():
        U1 = U - 0.05 * U.grad  # one plain gradient step on R alone
    assert _ortho_error(U1) < _ortho_error(U0)
    assert params[0]["V"].grad is None  # only tensors that require grad get one
