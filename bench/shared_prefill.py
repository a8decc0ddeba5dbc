"""Time to first token for n requests that share one prompt (an API request's n choices) against n distinct
prompts of the same length, through the engine on the default model: identical prompts on one adapter are
prefilled once and the other rows copy its KV cache (service/engine.py `_prefill`).

    python bench/shared_prefill.py [--base default] [--n 8] [--reps 6]

Prints a markdown table and a last line of JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters_store.disk import DiskStore  # noqa: E402
from service.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from svd_adapters.base_model import load_base  # noqa: E402
from svd_adapters.factors import load_or_compute  # noqa: E402

QUESTION = ("Summarise the plot of a long novel about a {place} keeper, his family and a storm that changes everything, "
            "in two sentences.")
PLACES = ["lighthouse", "castle", "harbour", "mill", "farm", "tower", "bridge", "forest", "island", "garden", "canal",
          "market", "station", "library", "theatre", "museum"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args()
    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    engine = Engine(base, factors, DiskStore(tempfile.mkdtemp()),
                    # no prefix cache: the distinct prompts share their chat template's opening, and later rounds
                    # would take it from there (bench/prefix_cache.py measures that)
                    EngineConfig(max_batch=args.n, max_rank=16, max_seq_len=512, prefix_cache_tokens=0))
    engine.start()
    try:
        distinct = [engine.encode_prompt(QUESTION.format(place=p)) for p in PLACES[: args.n]]
        length = min(len(p) for p in distinct)
        distinct = [p[:length] for p in distinct]
        identical = [distinct[0]] * args.n

        async def first_tokens(prompts: list[list[int]]) -> None:
            await asyncio.gather(*(engine.generate(p, None, SamplingParams(max_tokens=1)) for p in prompts))

        times: dict[str, list[float]] = {"identical": [], "distinct": []}
        asyncio.run(first_tokens(distinct))  # warm-up
        for _ in range(args.reps):  # alternated, so the host's drift hits both alike
            for name, prompts in (("identical", identical), ("distinct", distinct)):
                t0 = time.perf_counter()
                asyncio.run(first_tokens(prompts))
                times[name].append(time.perf_counter() - t0)
        shared = engine.stats()["prefills_shared"]
    finally:
        engine.shutdown(drain=False)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"\n{args.n} requests admitted together, {length}-token prompts, {base.name}, first token only\n")
    print("| prompts | time to first token, all rows (ms) | × distinct |")
    print("|---|---:|---:|")
    for name in ("distinct", "identical"):
        print(f"| {args.n} {name} | {med[name]:.0f} | {med['distinct'] / med[name]:.2f} |")
    print(json.dumps({"bench": "shared_prefill", "base": base.name, "n": args.n, "prompt_tokens": length,
                      "ms": med, "speedup": med["distinct"] / med["identical"], "prefills_shared": shared}))


if __name__ == "__main__":
    main()
