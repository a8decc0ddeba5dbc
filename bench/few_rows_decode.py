"""Decode steps of a few rows (one or a few requests decoding: the latency a lone user sees), by GEMM kernel build:
the diagnostic behind `csrc/skinny_gemm.h`'s few-row path, not a target.

    python bench/few_rows_decode.py --against GIT_REV [--base default] [--rows 1 2 4] [--rounds 8] [--steps 8]

Real decode steps of the default model (prefill, then `--steps` steps a round) for base rows and LoRA-XS rows, with
this tree's `skinny_linear` and `core_linear` and with `GIT_REV`'s (built into a namespace of their own), alternated
round by round in one process (the way to compare two builds on a noisy host); every GEMM through the kernels in
both builds. Prints a markdown table (medians over rounds, the first two dropped; paired: the median of each round
pair's ratio) and a last line of JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mixed_batch import random_adapter  # noqa: E402
from bench.prefill_kernels import build_revision  # noqa: E402
from svd_adapters import cpu_kernels  # noqa: E402
from svd_adapters.base_model import load_base  # noqa: E402
from svd_adapters.factors import load_or_compute  # noqa: E402
from svd_adapters.runner import BatchedRunner  # noqa: E402

PROMPT_LEN = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", required=True, metavar="GIT_REV", help="the build to compare with, e.g. HEAD~1")
    ap.add_argument("--base", default="default")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="decode steps a round")
    args = ap.parse_args()
    if not cpu_kernels.available():
        sys.exit("this diagnostic times the CPU kernels: build them first (a C++ compiler)")
    build_revision(args.against, ("skinny_linear.cpp", "core_linear.cpp"))
    torch.manual_seed(0)
    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    most = max(args.rows)
    runner = BatchedRunner(base, factors, max_rank=16, max_batch=most, max_seq_len=PROMPT_LEN + args.steps + 8,
                           core_slots=most + 1, lr_slots=2, cuda_graphs=False)
    cpu_kernels.force(True)
    adapters = [random_adapter("loraxs", 16, factors, base.name, seed=i) for i in range(most)]
    core_slots, lr_slots = runner.place(adapters, factors, 1, 1)
    vocab = base.model.config.vocab_size
    ours = {"skinny_linear": cpu_kernels.skinny_linear, "core_linear": cpu_kernels.core_linear}
    rev = torch.ops.svdserve_rev
    theirs = {"skinny_linear": lambda x, W, prefetch=None: rev.skinny_linear(x, W),
              "core_linear": lambda *a, **k: rev.core_linear(*a, **{n: v for n, v in k.items() if n != "prefetch"})}

    def use(kernels: dict) -> None:
        for name, fn in kernels.items():
            setattr(cpu_kernels, name, fn)

    def round_ms(rows: int, adapted: bool) -> float:
        cs, ls = (core_slots[:rows], lr_slots[:rows]) if adapted else ([0] * rows, [0] * rows)
        runner.prefill([torch.randint(3, vocab, (PROMPT_LEN,)).tolist() for _ in range(rows)], list(range(rows)), cs, ls)
        mp, tokens = runner.mapping(cs, ls), torch.randint(3, vocab, (rows,))
        t0 = time.perf_counter()
        for i in range(args.steps):
            runner.decode(tokens, torch.full((rows,), PROMPT_LEN + i), mp, context=PROMPT_LEN + i + 1)
        return 1e3 * (time.perf_counter() - t0) / args.steps

    results = {}
    try:
        for rows in args.rows:
            for adapted in (False, True):
                times: dict[str, list[float]] = {"this tree": [], args.against: []}
                for r in range(args.rounds):
                    order = [("this tree", ours), (args.against, theirs)]
                    for name, kernels in order if r % 2 else order[::-1]:
                        use(kernels)
                        times[name].append(round_ms(rows, adapted))
                kept = {k: v[2:] for k, v in times.items()}
                results[(rows, adapted)] = {
                    "ms": {k: statistics.median(v) for k, v in kept.items()},
                    "paired": statistics.median(a / b for a, b in zip(kept[args.against], kept["this tree"])),
                }
    finally:
        use(ours)
    print(f"\nDecode steps of a few rows: {base.name}, prompt {PROMPT_LEN}, {args.steps} steps a round, "
          f"{args.rounds} rounds alternated; ms a step\n")
    print(f"| rows | adapter | {args.against} | this tree | speed-up | paired |")
    print("|---:|---|---:|---:|---:|---:|")
    for (rows, adapted), v in results.items():
        old, new = v["ms"][args.against], v["ms"]["this tree"]
        print(f"| {rows} | {'LoRA-XS r16' if adapted else 'none (base)'} | {old:.1f} | {new:.1f} | {old / new:.2f} | "
              f"{v['paired']:.2f} |")
    print(json.dumps({"bench": "few_rows_decode", "base": base.name, "against": args.against,
                      "results": [{"rows": r, "adapter": "loraxs" if a else None, **v} for (r, a), v in results.items()]}))


if __name__ == "__main__":
    main()
