"""Incremental detokenization: the same text as decoding everything at once, for a bounded cost per token."""
from __future__ import annotations

import functools
import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from service.detokenize import Detokenizer
from svd_adapters.base_model import ensure_default_model, tiny_tokenizer

TEXTS = [
    "Plain ASCII, with punctuation: (a) [b] {c}; and numbers 12,345.67!",
    "Multi-byte: naïve café, Grüße, 東京タワー, Привет, emoji 🙂🚀 and a flag 🇫🇷 in the middle.",
    "  leading spaces, tabs\tand\nnew lines\n\n  indented",
]


def llama_style_tokenizer():
    """A SentencePiece-style tokenizer as Llama / Mistral ship them (▁ for spaces, byte fallback, the first space
    stripped on decode: a token decoded alone loses its space), trained in code on a few sentences."""
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    base.train_from_iterator([t for t in TEXTS for _ in range(20)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # byte fallback: characters not in the vocabulary go as their UTF-8 bytes
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.cache
def make_tokenizer(name: str):
    # tiny: one token per byte, so every multi-byte character arrives in pieces; default: SmolLM2's real BPE;
    # llama-style: spaces as ▁ that a token decoded alone loses, and byte fallback
    if name == "tiny":
        return tiny_tokenizer()
    if name == "llama-style":
        return llama_style_tokenizer()
    return AutoTokenizer.from_pretrained(ensure_default_model())


@pytest.fixture(params=["tiny", "default", "llama-style"])
def tokenizer(request):
    return make_tokenizer(request.param)


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


# Not the llama-style tokenizer: its random byte-fallback tokens are mostly invalid UTF-8, which a window and the
# whole output replace with U+FFFD in different places (text no model produces; its valid text is checked above).
@pytest.mark.parametrize("name", ["tiny", "default"])
def test_random_tokens_decode_like_the_full_decode(name):
    tokenizer = make_tokenizer(name)
    rng = random.Random(0)
    ids = [rng.randrange(len(tokenizer)) for _ in range(300)]
    d, deltas, _ = run(tokenizer, ids)
    assert "".join(deltas) == d.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_runs_of_invalid_bytes_decode_like_the_full_decode():
    """Long runs of bytes that are no UTF-8 (what an adapter pushed off course generates): where the replacement
    characters go depends on the bytes after them, so text is emitted only once later tokens settle it — e.g.
    eight such tokens ending in the two bytes of 'ܓ', which an early flush split into two U+FFFD."""
    tokenizer = make_tokenizer("tiny")  # one token per byte
    for seed in range(200):
        rng = random.Random(seed)
        ids = [rng.randrange(100, 260) if rng.random() < 0.7 else rng.randrange(len(tokenizer))
               for _ in range(rng.randrange(5, 80))]
        d, deltas, _ = run(tokenizer, ids)
        assert "".join(deltas) == d.text == tokenizer.decode(ids, skip_special_tokens=True), f"seed {seed}"


def test_each_token_decodes_a_short_window_not_the_whole_output(tokenizer):
    ids = tokenizer.encode(" ".join(TEXTS) * 60, add_special_tokens=False)[:2000]
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
