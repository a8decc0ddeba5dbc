"""Incremental detokenization: the same text as decoding everything at once, for a bounded cost per token."""
from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from service.detokenize import Detokenizer
from svd_adapters.base_model import ensure_default_model, tiny_tokenizer

TEXTS = [
    "Plain ASCII, with punctuation: (a) [b] {c}; and numbers 12,345.67!",
    "Multi-byte: naïve café, Grüße, 東京タワー, Привет, emoji 🙂🚀 and a flag 🇫🇷 in the middle.",
    "  leading spaces, tabs\tand\nnew lines\n\n  indented",
]


@pytest.fixture(scope="module", params=["tiny", "default"])
def tokenizer(request):
    # tiny: one token per byte, so every multi-byte character arrives in pieces; default: SmolLM2's real BPE
    return tiny_tokenizer() if request.param == "tiny" else AutoTokenizer.from_pretrained(ensure_default_model())


class CountingTokenizer:
    """Wraps a tokenizer to record how many tokens each decode call was given."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids, **kw):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kw)


def run(tok, ids: list[int], stop: list[str] | None = None) -> tuple[Detokenizer, list[str], bool]:
    d = Detokenizer(tok, stop or [])
    deltas, hit = [], False
    for t in ids:
        delta, hit = d.add(t)
        deltas.append(delta)
        if hit:
            break
    deltas.append(d.finish())
    return d, deltas, hit


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_full_decode_and_never_split_a_character(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    ids = ids[:5] + [eos] + ids[5:]  # a special token in the middle is skipped, as in a full decode
    d, deltas, _ = run(tokenizer, ids)
    want = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == d.text == want
    assert not any("\ufffd" in x for x in deltas)


def test_random_tokens_decode_like_the_full_decode(tokenizer):
    rng = random.Random(0)
    ids = [rng.randrange(len(tokenizer)) for _ in range(300)]
    d, deltas, _ = run(tokenizer, ids)
    assert "".join(deltas) == d.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_each_token_decodes_a_short_window_not_the_whole_output(tokenizer):
    ids = tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)[:2000]
    counting = CountingTokenizer(tokenizer)
    d, deltas, _ = run(counting, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) >= 1000 and max(counting.lengths) <= 12  # the old decoder's last call took all 2000 tokens


def test_stop_strings_cut_the_text_at_the_first_one_even_across_tokens(tokenizer):
    text = "alpha beta gamma delta epsilon zeta 東京 eta theta"
    ids = tokenizer.encode(text, add_special_tokens=False)
    for stop, cut in ((["gamma del"], "alpha beta "), (["zeta", "beta g"], "alpha "), (["京 e"], "alpha beta gamma delta epsilon zeta 東")):
        d, deltas, hit = run(tokenizer, ids, stop)
        assert hit and d.text == cut and "".join(deltas) == cut, stop
    d, deltas, hit = run(tokenizer, ids, ["omega"])
    assert not hit and "".join(deltas) == text
