"""Token sampling and incremental detokenization with stop strings."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from a (V,) logits row: argmax when greedy, else temperature + nucleus (top_p) sampling."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < params.top_p
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


class Detokenizer:
    """Turns a growing token list into text deltas, holding back text that may still become a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.emitted = 0  # characters of text already handed out
        self.text = ""

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; returns (new text safe to emit, hit_stop)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for s in self.stop:
            idx = text.find(s)
            if idx != -1:
                self.text = text[:idx]
                return self._flush(len(self.text)), True
        self.text = text
        # An incomplete UTF-8 sequence decodes to U+FFFD: wait for the next token before emitting it.
        safe = len(text) - self.holdback
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        return self._flush(safe), False

    def finish(self) -> str:
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
