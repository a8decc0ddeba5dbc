"""Host work per decode step around the model: choosing 32 rows' tokens and detokenizing them.

Baselines measured in the same run: the per-row sampler and the whole-output detokenizer svdserve used before
(commit e19e6e4, kept below verbatim as `per_row_sample` / `WholeDecode`). Logits are the default model's real
last-token logits for 32 chat prompts (a model's peaked distributions decide how often truncation needs more
than its candidates), on its 49k vocabulary; the detokenizer runs on the default tokenizer.

    python bench/sampling.py [--base default] [--rows 32] [--reps 20]

Prints markdown tables and a last line of JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.detokenize import Detokenizer  # noqa: E402
from service.sampling import RowSampling, SamplingParams, TokenHistory, sample_batch  # noqa: E402
from service.structured import Constraint, Grammars  # noqa: E402
from svd_adapters.base_model import load_base  # noqa: E402

PROMPTS = ["Tell me a story about a dragon.", "What is the capital of France?", "Write a haiku about rain.",
           "Explain photosynthesis briefly.", "List three fruits.", "How do I boil an egg?", "Say something kind.",
           "What is 12 times 7?"]

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}

CONFIGS = {
    "greedy": SamplingParams(),
    "temperature 1.0": SamplingParams(temperature=1.0),
    "temperature 0.8, top_p 0.9": SamplingParams(temperature=0.8, top_p=0.9),
    "temperature 1.0, top_k 50": SamplingParams(temperature=1.0, top_k=50),
    "temperature 0.7, top_p 0.95, min_p 0.05": SamplingParams(temperature=0.7, top_p=0.95, min_p=0.05),
    "greedy, presence + frequency penalty": SamplingParams(presence_penalty=0.5, frequency_penalty=0.5),
}


def per_row_sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The sampler before this change: one row at a time, a full sort for top_p (no top_k / min_p / penalties)."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < params.top_p
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


class WholeDecode:
    """The detokenizer before this change: the whole output decoded again for every token."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop, self.tokens, self.text = tokenizer, stop, [], ""

    def add(self, token: int) -> None:
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for s in self.stop:
            self.text.find(s)


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def real_logits(base, rows: int) -> torch.Tensor:
    tok = base.tokenizer
    out = []
    with torch.no_grad():
        for i in range(rows):
            ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            out.append(base.model(torch.tensor([list(ids)])).logits[0, -1])
    return torch.stack(out)


def sampler_table(logits: torch.Tensor, reps: int, tokenizer) -> list[dict]:
    rows_n, vocab = logits.shape
    results = []
    for name, p in CONFIGS.items():
        gens = [torch.Generator().manual_seed(i) for i in range(rows_n)]
        hists = None
        if p.penalized:
            hists = [TokenHistory(list(range(i, i + 40)), vocab) for i in range(rows_n)]
            for i, h in enumerate(hists):
                for t in range(300):  # a 300-token output with repeats, 150 distinct tokens
                    h.add((t * 7919) % 150 + 1000 * i)
        rows = [RowSampling(p, gens[i] if not p.greedy else None, hists[i] if hists else None) for i in range(rows_n)]
        new = timed(lambda: sample_batch(logits, rows), reps)
        old = None
        if not p.penalized and not p.top_k and not p.min_p:  # what the old sampler could do at all
            old = timed(lambda: [per_row_sample(logits[i], p, gens[i]) for i in range(rows_n)], max(3, reps // 4))
        results.append({"config": name, "batched_ms": round(new, 3), "per_row_ms": None if old is None else round(old, 3),
                        "speedup": None if old is None else round(old / new, 1)})
        if name == "greedy":  # the same rows held to a JSON schema: each step's masks from the grammar, then the choice
            grammars = Grammars(tokenizer, vocab)
            grammar = grammars.compile(Constraint("json_schema", SCHEMA))
            matchers = [grammars.matcher(grammar) for _ in range(rows_n)]
            for m in matchers:  # into the middle of a string value, where most of the vocabulary is allowed
                for t in tokenizer.encode('{"name":"Ada', add_special_tokens=False):
                    m.advance(t)
            structured = timed(lambda: sample_batch(logits, [RowSampling(p, allowed=m.allowed(vocab)) for m in matchers]),
                               reps)
            results.append({"config": "greedy, JSON schema (grammar masks included)", "batched_ms": round(structured, 3),
                            "per_row_ms": None, "speedup": None})
    return results


def detok_table(tokenizer, lengths: list[int]) -> list[dict]:
    text = " ".join(PROMPTS) * 400
    ids = tokenizer.encode(text, add_special_tokens=False)
    results = []
    for n in lengths:
        seq = ids[:n]
        last = 32  # the cost of the last 32 tokens of an n-token output: what a step pays per row at that length

        def run(cls):
            d = cls(tokenizer, ["\n\n###"])
            for t in seq[:-last]:
                d.add(t)
            t0 = time.perf_counter()
            for t in seq[-last:]:
                d.add(t)
            return (time.perf_counter() - t0) / last * 1e6

        new = statistics.median(run(Detokenizer) for _ in range(3))
        old = statistics.median(run(WholeDecode) for _ in range(3))
        results.append({"output_tokens": n, "incremental_us_per_token": round(new, 1),
                        "whole_decode_us_per_token": round(old, 1), "speedup": round(old / new, 1)})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = load_base(args.base)
    logits = real_logits(base, args.rows)
    print(f"host: {torch.get_num_threads()} threads, vocabulary {logits.shape[1]}, {args.rows} rows")
    samp = sampler_table(logits, args.reps, base.tokenizer)
    print("\n| token choice for all rows, one step | batched ms | per-row (before) ms | speedup |")
    print("|---|---:|---:|---:|")
    for r in samp:
        old = "—" if r["per_row_ms"] is None else f"{r['per_row_ms']:.2f}"
        sp = "—" if r["speedup"] is None else f"{r['speedup']:.1f}×"
        print(f"| {r['config']} | {r['batched_ms']:.2f} | {old} | {sp} |")
    det = detok_table(base.tokenizer, [256, 1000, 2000])
    print("\n| output length (tokens) | incremental µs/token | whole decode (before) µs/token | speedup |")
    print("|---:|---:|---:|---:|")
    for r in det:
        print(f"| {r['output_tokens']} | {r['incremental_us_per_token']:.1f} | {r['whole_decode_us_per_token']:.1f} | "
              f"{r['speedup']:.1f}× |")
    print(json.dumps({"base": base.name, "rows": args.rows, "vocab": logits.shape[1], "sampler": samp, "detokenizer": det}))


if __name__ == "__main__":
    main()
