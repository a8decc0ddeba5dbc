"""The split of a step's prompts into prefill calls by length (`service/prefill_groups.py`)."""
from __future__ import annotations

import itertools
import random

import pytest

from service import prefill_groups


def cost(lengths: list[int], groups: list[list[int]], call_cost: int) -> int:
    return sum(call_cost + max(lengths[i] for i in g) * len(g) for g in groups)


def set_partitions(items: list[int]):
    """Every partition of `items` into non-empty groups."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first, *part[i]]] + part[i + 1:]
        yield [[first], *part]


def test_a_long_prompt_among_short_ones_gets_its_own_call():
    lengths = [16] * 7 + [256] + [16] * 7
    groups = prefill_groups.plan(lengths, 32)
    assert groups == [[7], [i for i in range(15) if i != 7]]  # longest group first
    assert cost(lengths, groups, 32) == 32 + 256 + 32 + 14 * 16  # against 15 × 256 + 32 padded in one call


def test_equal_or_close_lengths_stay_one_call():
    assert prefill_groups.plan([64] * 32, 32) == [list(range(32))]
    assert len(prefill_groups.plan([60, 64, 62, 61], 32)) == 1  # padding 13 tokens < a second call's 32
    assert len(prefill_groups.plan([8, 300], 10 ** 6)) == 1  # calls dearer than any padding: one call


def test_free_calls_split_only_where_lengths_differ():
    lengths = [5, 9, 5, 9, 7]
    groups = prefill_groups.plan(lengths, 0)
    assert sorted(sorted(g) for g in groups) == [[0, 2], [1, 3], [4]]
    assert prefill_groups.plan([], 32) == []


@pytest.mark.parametrize("seed", range(40))
def test_the_plan_is_the_cheapest_of_every_possible_split(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([1, 3, 8, 20, 21, 64, 100, 250]) for _ in range(rng.randint(1, 7))]
    call_cost = rng.choice([0, 4, 32, 200])
    groups = prefill_groups.plan(lengths, call_cost)
    assert sorted(itertools.chain.from_iterable(groups)) == list(range(len(lengths)))  # each prompt once
    best = min(cost(lengths, p, call_cost) for p in set_partitions(list(range(len(lengths)))))
    assert cost(lengths, groups, call_cost) == best


def test_a_negative_call_cost_is_refused():
    with pytest.raises(ValueError, match="call_cost must be at least 0"):
        prefill_groups.plan([1, 2], -1)


def test_defaults_by_device():
    assert prefill_groups.call_tokens("cpu") == 32
    assert prefill_groups.call_tokens("cuda:0") == prefill_groups.call_tokens("cuda") == 2048


def test_fits_counts_the_tokens_the_split_computes():
    lengths = [117, 2, 13, 117, 14]
    # split: the two long prompts (234 tokens) and the three short ones padded to 14 (42): 276
    assert prefill_groups.fits(lengths, 32, 276) and not prefill_groups.fits(lengths, 32, 275)
    assert prefill_groups.fits(lengths, 10 ** 6, 585) and not prefill_groups.fits(lengths, 10 ** 6, 584)  # one call
    assert not prefill_groups.fits([50, 60], 0, 109)  # more real tokens than the budget: never
    assert prefill_groups.fits([], 32, 0)
