"""Speculative decoding by prompt lookup (vLLM's "ngram" method): draft tokens without a draft model.

A generation that repeats its context — quoting, extraction, rewriting, code edits, a chat's next turn
restating the last — often goes on the way the same few tokens went on earlier. `propose` finds the latest
earlier occurrence of the context's last n tokens (the longest n first) and drafts the tokens that followed it.

A request may also bring its own draft source, a predicted output (OpenAI's Predicted Outputs: the file it asks to
have edited): `propose_predicted` drafts from it while the answer follows it, and picks it up again where the
answer rejoins it; such requests draft even when prompt lookup is off.

The engine then feeds each row its next token and its draft in one forward (`BatchedRunner.verify`): on a CPU a
decode step of a few rows is bound by reading the weights, so scoring five positions costs little more than
one. It chooses each position's token exactly as a decode step would — the same sampler, penalties, grammar,
and the request's own generator, one draw per token — and keeps the draft up to the first token the sampler did
not choose, plus that step's own choice. So every request gets the tokens it would get without speculation
(greedy: the same argmax; seeded sampling: the same draws), only sooner; the one difference is float rounding:
several positions computed at once round differently from one at a time (~1e-6). Greedy, that flips only a near
tie between the two likeliest tokens; sampled, a draw that lands within that much of the boundary between two
tokens' shares of the distribution picks the neighbour, after which the answer goes its own way — rare, but not
never (`bench/speculative.py` at temperature 1: 1 of 27 answers). The distribution sampled from is the same either
way: speculation never changes which answers are likely, only, rarely, which one a seed picks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpeculativeConfig:
    tokens: int = 0  # drafted tokens per step and row; 0 = off
    ngram_max: int = 4  # the longest context suffix looked up
    ngram_min: int = 2  # the shortest (1 drafts after any repeated token: mostly wrong, each a wasted position)
    max_batch: int = 4  # speculate only while at most this many rows decode (larger batches are bound by compute)
    # A row whose draft was rejected outright rests from drafting for 1, 2, 4, … steps (at most this many; 0: never
    # rests): where its context stops predicting it, its drafts stop costing verify positions.
    backoff_max: int = 16
    # drafts from a request's predicted output (OpenAI's Predicted Outputs): usually right for long runs, so longer
    # than prompt lookup's; drafted for such requests even when `tokens` is 0
    prediction_tokens: int = 8

    def check(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"speculative tokens must be ≥ 0 (0 = off), got {self.tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 ≤ ngram_min ≤ ngram_max, got {self.ngram_min} and {self.ngram_max}")
        if self.max_batch < 1:
            raise ValueError(f"speculative max_batch must be ≥ 1, got {self.max_batch}")
        if self.prediction_tokens < 0:
            raise ValueError(f"speculative prediction_tokens must be ≥ 0 (0 = predictions unused), got {self.prediction_tokens}")
        if self.backoff_max < 0:
            raise ValueError(f"speculative backoff_max must be ≥ 0 (0 = never rest), got {self.backoff_max}")

    def rest_after(self, misses: int) -> int:
        """Steps a row goes without drafting after `misses` drafts in a row rejected outright."""
        return min(1 << (misses - 1), self.backoff_max) if misses > 0 and self.backoff_max else 0


def propose(context: list[int], k: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the context's last n tokens, for the longest
    n in [ngram_min, ngram_max] that occurs earlier; [] when none does."""
    size = len(context)
    if k <= 0 or size <= ngram_min:
        return []
    tokens = np.asarray(context, dtype=np.int64)
    for n in range(min(ngram_max, size - 1), ngram_min - 1, -1):
        # windows starting at 0 .. size-n-1: each has a token after it, and none is the suffix itself
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: size - 1], n)
        hits = np.flatnonzero((windows == tokens[size - n :]).all(axis=1))
        if hits.size:
            at = int(hits[-1]) + n
            return tokens[at : at + k].tolist()
    return []


def propose_predicted(prediction: list[int], out: list[int], context: list[int], start: int, k: int, ngram_max: int,
                      ngram_min: int) -> tuple[list[int], int]:
    """A draft from a request's predicted output: while the answer so far is the prediction's start, the ≤ k
    prediction tokens that follow it; else those after the first place, at or after `start` (where the last draft
    from it began), where the prediction holds the context's last n tokens (the longest n in [ngram_min,
    ngram_max] first: one common token would match anywhere), else after the first such place anywhere (the answer
    may skip back). Returns (draft, where it begins in the prediction); ([], start) when the answer has left the
    prediction, for now."""
    if k <= 0 or not prediction:
        return [], start
    done = len(out)
    if done < len(prediction) and prediction[:done] == out:
        return prediction[done : done + k], done
    size = len(context)
    pred = np.asarray(prediction, dtype=np.int64)
    tokens = np.asarray(context[-ngram_max:], dtype=np.int64)
    for n in range(min(ngram_max, size, len(prediction)), ngram_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(pred, n)
        hits = np.flatnonzero((windows == tokens[len(tokens) - n:]).all(axis=1)) + n  # where each match ends
        hits = hits[hits < len(prediction)]  # a match at the very end leaves nothing to draft
        if hits.size:
            ahead = hits[hits >= start]
            at = int(ahead[0] if ahead.size else hits[0])
            return pred[at : at + k].tolist(), at
    return [], start
