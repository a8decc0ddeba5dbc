"""Which prompts of one engine step to prefill together.

A prefill call pads every prompt to its longest, so one long prompt among short ones multiplies the step's work
(31 prompts of 20 tokens beside one of 400: 12 800 tokens computed for 1 020 real ones). Each call also has a
fixed cost whatever its length: on a CPU every weight is streamed once more (SmolLM2-135M on a 2-core Xeon: a
4-token prefill 33 ms, against ~0.8 ms a token in a large one: `bench/prefill_lengths.py`); on a GPU, an eager
prefill's kernel launches (~25 ms). So a step's prompts are split into runs of similar length wherever that
fixed cost is less than the padding it saves.
"""
from __future__ import annotations

# The fixed cost of a prefill call, in prompt tokens' worth of a large prefill (see the top): measured 34–37 on
# a CPU; on a GPU a token costs ~60× less while a call's launches cost about as much, so one call almost always.
CALL_TOKENS = {"cpu": 32, "cuda": 2048}


def call_tokens(device: str) -> int:
    """The default fixed cost of a prefill call on this device (`CALL_TOKENS`; a GPU's for any accelerator)."""
    return CALL_TOKENS["cpu" if str(device).startswith("cpu") else "cuda"]


def plan(lengths: list[int], call_cost: int) -> list[list[int]]:
    """Indices into `lengths` in groups, one prefill call each, minimising the total over calls of call_cost +
    longest × count (the padded tokens a call computes plus its fixed cost). Groups are runs of the prompts sorted
    by length (an optimal split has that form: a group's cost depends only on its longest prompt and its size,
    so a shorter prompt is never better off in a longer group than a longer one is); longest group first."""
    if call_cost < 0:
        raise ValueError(f"call_cost must be at least 0, got {call_cost}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0] * (n + 1)  # best[j]: the cheapest cost of the j shortest prompts
    cut = [0] * (n + 1)  # where the last group of that split starts
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        best[j], cut[j] = min((best[i] + call_cost + longest * (j - i), i) for i in range(j))
    groups = []
    j = n
    while j > 0:
        groups.append([order[k] for k in range(cut[j], j)])
        j = cut[j]
    return groups


def computed_tokens(lengths: list[int], groups: list[list[int]]) -> int:
    """Prompt tokens the calls `groups` compute, each padded to its longest prompt."""
    return sum(max(lengths[i] for i in g) * len(g) for g in groups)


def fits(lengths: list[int], call_cost: int, budget: int) -> bool:
    """Whether prefilling these prompts, split by `plan`, computes at most `budget` prompt tokens, padding included
    (the engine's admission budget per step). Padded into one call they are an upper bound and their sum a lower
    one, so the split is only planned when the two disagree."""
    if not lengths or max(lengths) * len(lengths) <= budget:
        return True
    if sum(lengths) > budget:
        return False
    return computed_tokens(lengths, plan(lengths, call_cost)) <= budget
