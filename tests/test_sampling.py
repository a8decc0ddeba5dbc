"""The batched sampler (service/sampling.py) against a per-row reference: kept sets, draw frequencies, penalties."""
from __future__ import annotations

import pytest
import torch

from service import sampling
from service.sampling import RowSampling, SamplingParams, TokenHistory, sample_batch

V = 500


def reference_kept(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """The tokens a full sort keeps for one row: top_k, then the smallest prefix reaching top_p, then min_p."""
    probs = torch.softmax(logits.double() / p.temperature, dim=-1)
    order = torch.argsort(probs, descending=True).tolist()
    kept, mass = [], 0.0
    for rank, tok in enumerate(order):
        if rank > 0:
            if p.top_k and rank >= p.top_k:
                break
            if mass >= p.top_p:
                break
            if probs[tok] < p.min_p * probs[order[0]]:
                break
        kept.append(tok)
        mass += float(probs[tok])
    return set(kept)


def draws(logits: torch.Tensor, p: SamplingParams, n: int) -> torch.Tensor:
    """Tokens drawn at n evenly spaced uniforms (inverse CDF: the counts are the kept distribution × n)."""
    probs = torch.softmax(logits.float() / p.temperature, dim=-1).expand(n, -1).contiguous()
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return sampling._draw(probs, [p] * n, u)


CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_k=100),  # more than the candidates
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=2.0, top_p=0.99),  # flat: the nucleus spills past the candidates to a full sort
    SamplingParams(temperature=0.8, top_k=40, top_p=0.8, min_p=0.01),
]


@pytest.mark.parametrize("p", CASES, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_draws_follow_the_kept_distribution(p):
    torch.manual_seed(0)
    logits = torch.randn(V) * 2.5
    n = 20000
    got = draws(logits, p, n)
    kept = reference_kept(logits, p)
    assert set(got.tolist()) <= kept  # never a token outside the truncated set
    probs = torch.softmax(logits.double() / p.temperature, dim=-1)
    mask = torch.zeros(V, dtype=torch.bool)
    mask[list(kept)] = True
    expected = torch.where(mask, probs, 0) / probs[mask].sum()
    freq = torch.bincount(got, minlength=V).double() / n
    assert (freq - expected).abs().max() < 2.0 / n + 1e-9  # inverse CDF at a grid: off by at most one draw per token
    if p.temperature == 2.0:
        assert len(kept) > sampling.CANDIDATES  # this case really exercised the full-sort fallback


def test_greedy_rows_take_the_argmax_and_the_logits_are_left_alone():
    torch.manual_seed(1)
    logits = torch.randn(4, V)
    before = logits.clone()
    rows = [RowSampling(SamplingParams()), RowSampling(SamplingParams(temperature=1.0), torch.Generator().manual_seed(3)),
            RowSampling(SamplingParams(), None, TokenHistory([1, 2], V)), RowSampling(SamplingParams())]
    rows[2].params.repetition_penalty = 1.5
    rows[2].history.add(int(logits[2].argmax()))
    out = sample_batch(logits, rows)
    assert torch.equal(logits, before)
    assert out[0] == int(logits[0].argmax()) and out[3] == int(logits[3].argmax())
    assert 0 <= out[1] < V


def test_a_seeded_row_draws_the_same_token_alone_or_in_any_batch():
    torch.manual_seed(2)
    logits = torch.randn(6, V) * 2
    params = [SamplingParams(temperature=0.9, top_p=0.95), SamplingParams(temperature=1.0), SamplingParams(),
              SamplingParams(temperature=0.5, top_k=300), SamplingParams(temperature=1.1, min_p=0.1),
              SamplingParams(temperature=1.0, top_k=3)]

    def run(indices, seed_of):
        rows = [RowSampling(params[i], torch.Generator().manual_seed(seed_of(i))) for i in indices]
        return sample_batch(logits[indices], rows)

    together = run(list(range(6)), lambda i: 100 + i)
    for i in range(6):
        assert run([i], lambda j: 100 + j) == [together[i]]
    assert run([5, 0, 3], lambda j: 100 + j) == [together[5], together[0], together[3]]


def test_penalties_match_their_definitions():
    torch.manual_seed(3)
    logits = torch.randn(1, V) * 3
    hist = TokenHistory(prompt=[7, 8], vocab=V)
    for tok in (1, 1, 2, 7):
        hist.add(tok)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3)
    got = sampling._apply_penalties(logits.clone(), [RowSampling(p, None, hist)])[0]
    want = logits[0].clone()
    for tok in (1, 2, 7, 8):  # generated or in the prompt: repetition penalty
        want[tok] = want[tok] / 1.3 if want[tok] > 0 else want[tok] * 1.3
    want[1] -= 0.5 + 2 * 0.25  # generated twice
    want[2] -= 0.5 + 0.25
    want[7] -= 0.5 + 0.25  # in the prompt and generated once
    assert torch.allclose(got, want)


def test_logit_bias_forces_and_bans_tokens():
    logits = torch.zeros(2, V)
    logits[:, 9] = 5.0
    rows = [RowSampling(SamplingParams(logit_bias={123: 100.0})),
            RowSampling(SamplingParams(temperature=1.0, top_k=1, logit_bias={9: -100.0}), torch.Generator().manual_seed(0))]
    logits[1, 10] = 1.0
    assert sample_batch(logits, rows) == [123, 10]


def test_penalties_without_history_are_a_clear_error():
    with pytest.raises(ValueError, match="TokenHistory"):
        sample_batch(torch.zeros(1, V), [RowSampling(SamplingParams(presence_penalty=1.0))])


def test_inverse_cdf_never_picks_a_zero_weight_token_even_at_the_ends():
    torch.manual_seed(4)
    for width in (40, 256, 1000, 49152):
        w = torch.rand(16, width) * (torch.rand(16, width) < 0.01)  # sparse: whole blocks of zeros
        w[:, 0] = 0
        w[torch.arange(16), torch.randint(1, width, (16,))] += 1e-3  # at least one positive weight per row
        for u in (0.0, 1e-12, 0.5, 1 - 2 ** -52):
            picked = sampling._invert(w, torch.full((16,), u, dtype=torch.float64))
            assert (w.gather(1, picked[:, None]) > 0).all(), (width, u)


def test_packed_grammar_masks_unpack_bit_by_bit_and_only_allowed_tokens_win():
    words = torch.tensor([[1 - (1 << 31), 0, 4], [0, -1, 0]], dtype=torch.int32)  # bit 31: a negative word
    mask = sampling.unpack_bitmask(words, 70)
    assert mask.shape == (2, 70)
    assert mask[0].nonzero()[:, 0].tolist() == [0, 31, 66]
    assert mask[1].nonzero()[:, 0].tolist() == list(range(32, 64))
    logits = torch.randn(2, 70)
    logits[0, 5] = logits[1, 5] = 50.0  # the favourite is not allowed
    got = sample_batch(logits, [RowSampling(SamplingParams(), allowed=words[0]),
                                RowSampling(SamplingParams(temperature=1.0), torch.Generator().manual_seed(0), allowed=words[1])])
    assert got[0] == [0, 31, 66][int(logits[0, [0, 31, 66]].argmax())] and 32 <= got[1] < 64


def test_prompt_logprobs_of_a_one_token_prompt_is_just_its_unpredicted_first_token():
    assert sampling.prompt_logprobs_of(torch.randn(1, V), [3], 2) == [None]
    entries = sampling.prompt_logprobs_of(torch.randn(3, V), [3, 4, 5], 2)
    assert entries[0] is None and [e.token for e in entries[1:]] == [4, 5] and all(len(e.top) == 2 for e in entries[1:])
