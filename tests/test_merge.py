"""Adapter merging math (svd_adapters/merge.py): linear is exactly Σ wᵢ ΔWᵢ for any mix of methods and ranks;
ties / dare follow their definitions on each adapter's parameter change."""
from __future__ import annotations

import pytest
import torch

from svd_adapters.adapter import LayerTerms, random_adapter
from svd_adapters.merge import MERGED, MergeOptions, check_mergeable, combine, lowrank_rows, merge
from svd_adapters.methods import module_terms
from svd_adapters.terms import DeltaTerms, delta_weight

MAX_RANK = 4


def _deltas_of_terms(terms: dict[str, LayerTerms], factors) -> dict[str, torch.Tensor]:
    """ΔW per qualified module name from an adapter's serving terms (stacked per kind)."""
    by_kind_layer = {(n.rsplit(".", 1)[-1], int(n.split(".layers.")[1].split(".")[0])): n for n in factors.modules}
    out = {}
    for kind, lt in terms.items():
        for j, li in enumerate(lt.layers):
            name = by_kind_layer[(kind, li)]
            t = lt.terms
            one = DeltaTerms(rank=t.rank, diagonal=t.diagonal, **{
                f: getattr(t, f)[j] for f in ("C", "o", "d", "A", "B") if getattr(t, f) is not None})
            out[name] = delta_weight(one, factors.modules[name].U, factors.modules[name].Vh)
    return out


def _delta(adapter, factors) -> dict[str, torch.Tensor]:
    return {name: delta_weight(module_terms(adapter.method, p, factors.modules[name], adapter.rank, adapter.alpha),
                               factors.modules[name].U, factors.modules[name].Vh)
            for name, p in adapter.params.items()}


def _assert_weighted_sum(merged_terms, adapters, weights, factors):
    got = _deltas_of_terms(merged_terms, factors)
    want: dict[str, torch.Tensor] = {}
    for a, w in zip(adapters, weights):
        for name, dw in _delta(a, factors).items():
            want[name] = want.get(name, 0) + w * dw
    assert set(got) == set(want)
    for name in want:
        scale = want[name].abs().max().item()
        assert scale > 1e-3, "the sources must move the weights for this test to mean anything"
        assert (got[name] - want[name]).abs().max().item() <= 1e-5 * max(1.0, scale), name


@pytest.mark.parametrize("mix", [
    [("osora", 2), ("osora", 4)],
    [("loraxs", 2), ("loraxs", 4), ("loraxs", 3)],
    [("osora", 4), ("loraxs", 2), ("sorsa", 2), ("lora", 2)],
    [("sorsa", 4), ("lora", 2)],
    [("lora", 8)],
])
def test_linear_merge_is_the_weighted_sum_of_deltas(mix, tiny_base, tiny_factors):
    adapters = [random_adapter(m, r, tiny_factors, tiny_base.name, seed=i) for i, (m, r) in enumerate(mix)]
    weights = [0.7, -0.4, 1.3, 0.5][: len(adapters)]
    merged = merge(adapters, weights, MergeOptions(), tiny_factors, MAX_RANK)
    _assert_weighted_sum(merged.terms, adapters, weights, tiny_factors)
    if all(m == "loraxs" for m, _ in mix):  # cores add: a core slot of the largest rank
        assert merged.method == "loraxs" and merged.lowrank_rows == 0
        assert all(lt.terms.A is None and lt.terms.C.shape[-1] == 4 for lt in merged.terms.values())
    else:
        assert merged.method == MERGED
        assert merged.lowrank_rows == lowrank_rows([m for m, _ in mix], [r for _, r in mix])
        assert all(lt.terms.A.shape[-2] == merged.lowrank_rows for lt in merged.terms.values())


def test_linear_merge_of_adapters_on_different_modules(tiny_base, tiny_factors):
    """An adapter without a module contributes nothing there; the merge covers the union of their modules."""
    from svd_adapters.adapter import new_adapter

    a = random_adapter("osora", 2, tiny_factors, tiny_base.name, seed=1)
    b = new_adapter("sorsa", 2, tiny_factors, tiny_base.name, target_modules=("q_proj", "v_proj"), seed=2)
    gen = torch.Generator().manual_seed(5)
    for p in b.params.values():
        for k in p:
            p[k] = p[k] + 0.05 * torch.randn(p[k].shape, generator=gen)
    merged = merge([a, b], [1.0, 2.0], MergeOptions(), tiny_factors, MAX_RANK)
    _assert_weighted_sum(merged.terms, [a, b], [1.0, 2.0], tiny_factors)


def test_linear_merge_refuses_more_rows_than_a_slot_holds(tiny_base, tiny_factors):
    adapters = [random_adapter("sorsa", 4, tiny_factors, tiny_base.name, seed=i) for i in range(2)]
    adapters.append(random_adapter("osora", 2, tiny_factors, tiny_base.name, seed=3))
    with pytest.raises(ValueError, match=r"needs 10 low-rank rows.*over this server's 8"):
        merge(adapters, [1, 1, 1], MergeOptions(), tiny_factors, MAX_RANK)
    merge(adapters[:2], [1, 1], MergeOptions(), tiny_factors, MAX_RANK)  # 8 rows: fits


def test_parameter_merges_need_one_method_at_one_rank():
    for strategy in ("ties", "dare_linear", "dare_ties"):
        with pytest.raises(ValueError, match="one method at one rank; got loraxs rank 2, osora rank 2"):
            check_mergeable(["osora", "loraxs"], [2, 2], MergeOptions(strategy), MAX_RANK)
        with pytest.raises(ValueError, match="osora rank 2, osora rank 4"):
            check_mergeable(["osora", "osora"], [2, 4], MergeOptions(strategy), MAX_RANK)
    check_mergeable(["osora", "loraxs"], [2, 4], MergeOptions("linear"), MAX_RANK)
    for bad in (dict(strategy="slerp"), dict(density=0.0), dict(density=1.5), dict(majority_sign_method="median")):
        with pytest.raises(ValueError):
            MergeOptions(**bad)
    with pytest.raises(ValueError, match="1 to 16 adapters"):
        check_mergeable(["osora"] * 17, [2] * 17, MergeOptions(), MAX_RANK)


def test_ties_trims_elects_and_averages():
    changes = torch.tensor([[3.0, -1.0, 0.5, 2.0],
                            [1.0, 2.0, -4.0, -0.1],
                            [-0.2, 3.0, -1.5, 1.0]])
    w = torch.ones(3)
    # density 0.5: each keeps its 2 largest |entries| → [3, 0, 0, 2], [0, 2, -4, 0], [0, 3, -1.5, 0]
    # total signs: +, +, −, + → agreeing entries averaged: 3, (2+3)/2, (−4−1.5)/2, 2
    got = combine(changes, w, MergeOptions("ties", density=0.5))
    assert torch.allclose(got, torch.tensor([3.0, 2.5, -2.75, 2.0]))
    # frequency: entry 2 has signs (+, −, −) before trimming, but after trimming (0, −, −): still −
    got_f = combine(changes, w, MergeOptions("ties", density=0.5, majority_sign_method="frequency"))
    assert torch.allclose(got_f, torch.tensor([3.0, 2.5, -2.75, 2.0]))
    # weights scale the agreeing changes before the average
    got_w = combine(changes, torch.tensor([2.0, 1.0, 1.0]), MergeOptions("ties", density=0.5))
    assert torch.allclose(got_w, torch.tensor([6.0, 2.5, -2.75, 4.0]))
    # density 1, all agreeing: the (weighted) mean
    same = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    assert torch.allclose(combine(same, torch.ones(2), MergeOptions("ties")), torch.tensor([2.0, -3.0]))


def test_total_and_frequency_sign_differ_where_a_large_change_is_outvoted():
    changes = torch.tensor([[5.0], [-1.0], [-1.0]])
    assert combine(changes, torch.ones(3), MergeOptions("ties")).item() == pytest.approx(5.0)
    assert combine(changes, torch.ones(3), MergeOptions("ties", majority_sign_method="frequency")).item() == pytest.approx(-1.0)


def test_dare_drops_at_random_rescales_and_is_seeded():
    changes = torch.ones(2, 20000)
    w = torch.tensor([0.5, 0.5])
    a = combine(changes, w, MergeOptions("dare_linear", density=0.25), torch.Generator().manual_seed(7))
    b = combine(changes, w, MergeOptions("dare_linear", density=0.25), torch.Generator().manual_seed(7))
    c = combine(changes, w, MergeOptions("dare_linear", density=0.25), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) <= {0.0, 2.0, 4.0}  # kept entries × 1/0.25, halves summed
    assert a.mean().item() == pytest.approx(1.0, abs=0.03)  # rescaling keeps the expected change
    assert (a == 0).float().mean().item() == pytest.approx(0.75 ** 2, abs=0.02)
    # dare_ties: the same drop, then elect and average the agreeing ones
    t = combine(changes, w, MergeOptions("dare_ties", density=0.25), torch.Generator().manual_seed(7))
    assert set(t.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("method", ["osora", "loraxs", "sorsa", "lora"])
def test_parameter_merge_builds_an_adapter_of_the_same_method(method, tiny_base, tiny_factors):
    adapters = [random_adapter(method, 2, tiny_factors, tiny_base.name, seed=i) for i in range(3)]
    merged = merge(adapters, [1.0, 1.0, 1.0], MergeOptions("ties", density=0.5), tiny_factors, MAX_RANK, seed=3)
    assert merged.method == method
    assert (merged.lowrank_rows == 0) == (method in ("osora", "loraxs"))
    again = merge(adapters, [1.0, 1.0, 1.0], MergeOptions("ties", density=0.5), tiny_factors, MAX_RANK, seed=3)
    for kind, lt in merged.terms.items():
        for f in ("C", "o", "d", "A", "B"):
            x, y = getattr(lt.terms, f), getattr(again.terms[kind].terms, f)
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y))
    # dare_linear at density 1 is the weighted sum of the parameter changes: for LoRA-XS, of the deltas
    if method == "loraxs":
        lin = merge(adapters, [0.5, 0.25, 1.0], MergeOptions("dare_linear"), tiny_factors, MAX_RANK)
        _assert_weighted_sum(lin.terms, adapters, [0.5, 0.25, 1.0], tiny_factors)


def test_parameter_merge_folds_alpha(tiny_base, tiny_factors):
    """Two LoRAs equal but for α (and B scaled to match): the same delta, so their TIES merge is that delta."""
    a = random_adapter("lora", 2, tiny_factors, tiny_base.name, seed=1)
    b = random_adapter("lora", 2, tiny_factors, tiny_base.name, seed=1)
    b.alpha = a.alpha * 4
    for p in b.params.values():
        p["B"] = p["B"] / 4
    merged = merge([a, b], [1.0, 1.0], MergeOptions("ties"), tiny_factors, MAX_RANK)
    _assert_weighted_sum(merged.terms, [a], [1.0], tiny_factors)


def test_parameter_merge_trims_each_module_on_its_own(tiny_base, tiny_factors):
    """TIES over every layer of a kind at once equals TIES module by module (each tensor keeps its own top entries)."""
    from svd_adapters.merge import parameter_merge
    from svd_adapters.osora import reference_params

    adapters = [random_adapter("osora", 4, tiny_factors, tiny_base.name, seed=20 + i) for i in range(3)]
    w = torch.tensor([1.0, 0.5, 2.0])
    opts = MergeOptions("ties", density=0.3, majority_sign_method="frequency")
    merged = parameter_merge(adapters, w.tolist(), opts, tiny_factors)
    for name in adapters[0].params:
        ref = reference_params(adapters[0].params[name], *tiny_factors.modules[name].top(4))
        for key in ("O", "S"):
            changes = torch.stack([a.params[name][key] - ref[key] for a in adapters])
            assert torch.allclose(merged.params[name][key], ref[key] + combine(changes, w, opts), atol=1e-6), (name, key)


def test_dare_drops_by_each_tensors_name_not_by_what_else_is_merged(tiny_base, tiny_factors):
    """Replicas must build the same merge: each tensor's DARE drop depends on the seed and its own name only, not on
    the other modules or the order they were read in (a set's order changes with PYTHONHASHSEED)."""
    from dataclasses import replace

    from svd_adapters.merge import parameter_merge

    adapters = [random_adapter("sorsa", 2, tiny_factors, tiny_base.name, seed=30 + i) for i in range(2)]
    opts = MergeOptions("dare_ties", density=0.5)
    full = parameter_merge(adapters, [1.0, 1.0], opts, tiny_factors, seed=9)
    for kind in ("q_proj", "down_proj"):  # two kinds: at most one of them could be first in any fixed order
        only = [replace(a, params={n: p for n, p in reversed(list(a.params.items())) if n.endswith(kind)})
                for a in adapters]
        part = parameter_merge(only, [1.0, 1.0], opts, tiny_factors, seed=9)
        assert part.params and set(part.params) == {n for n in full.params if n.endswith(kind)}
        for name, p in part.params.items():
            for key, value in p.items():
                assert torch.equal(value, full.params[name][key]), (name, key)
    other_seed = parameter_merge(adapters, [1.0, 1.0], opts, tiny_factors, seed=10)
    assert any(not torch.equal(v, other_seed.params[n][k]) for n, p in full.params.items() for k, v in p.items())
