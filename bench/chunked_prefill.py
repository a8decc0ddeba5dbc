"""Chunked prefill: how long rows that are decoding stall while a long prompt arrives, with and without chunks.

Through the engine on the default model: R requests (OSoRA and LoRA-XS r16 adapters and base rows) are decoding
when a long prompt (L tokens, on an adapter of its own) arrives. Without chunks its whole prefill runs in one
step and every decoding row waits for it; with `prefill_chunk_tokens` C it runs C tokens per step, each followed
by a decode step. Measured from the runner's own decode calls: the longest gap between two decode steps while the
long prompt was being prefilled (the worst inter-token latency the decoding rows saw), the mean gap, how many
tokens they got meanwhile, and the long prompt's time to first token (the price of chunking). The settings
alternate round by round on one engine (the setting is read at each admission), so the host's drift hits all
alike; the long prompt is a different text each round and the prefix cache is off, so every round computes it
whole. Its first token must be the same under every setting (greedy), else the run fails.

    python bench/chunked_prefill.py [--base default] [--rows 8] [--prompt-tokens 1024] [--chunks 0,512,256] [--rounds 3]

Prints a markdown table and a last line of JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mixed_batch import stored_adapters  # noqa: E402
from service.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from svd_adapters.base_model import load_base  # noqa: E402
from svd_adapters.factors import load_or_compute  # noqa: E402


def long_prompt(n: int, seed: int, vocab: int) -> list[int]:
    """n token ids (seeded: a different prompt every round, so nothing is shared between rounds)."""
    return torch.randint(vocab // 20, vocab // 2, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def one_round(eng: Engine, ids: list[str], versions: dict, rows: int, prompt: list[int], decode_ends: list[float]):
    """R decoding rows, then the long prompt; returns (its time to first token s, the decode steps' end times from
    the last before it arrived to the first after its first token, its first token)."""
    params = SamplingParams(max_tokens=1000, ignore_eos=True)
    streams = []
    for i in range(rows):
        aid = ids[i % len(ids)] if i % 4 != 3 else None  # every fourth row on the base model
        short = eng.encode_prompt(f"Tell me a long story about the number {i}.")
        streams.append(eng.stream(short, aid, params, versions.get(aid)))
    for s in streams:
        await s.__anext__()  # every row has its first token: all are decoding
    for _ in range(3):  # a few steady decode steps first
        n = len(decode_ends)
        while len(decode_ends) == n:
            await asyncio.sleep(0.001)
    before = len(decode_ends)
    t0 = time.perf_counter()
    res = await eng.generate(prompt, ids[0], SamplingParams(max_tokens=1), versions[ids[0]])
    t1 = time.perf_counter()
    while decode_ends[-1] <= t1:  # the rows' next step: the gap its prefill left them ends there
        await asyncio.sleep(0.001)
    for s in streams:
        await s.aclose()  # cancels them
    after = next(i for i, t in enumerate(decode_ends) if t > t1)
    return t1 - t0, decode_ends[before - 1 : after + 1], res.token_ids[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--rows", type=int, default=8, help="requests decoding when the long prompt arrives")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--chunks", default="0,512,256", help="prefill_chunk_tokens settings (0 = off, the baseline)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    store, versions = stored_adapters(base, factors, 4, "tenant-", seed=700)
    ids = list(versions)
    eng = Engine(base, factors, store, EngineConfig(max_batch=max(32, args.rows + 2), max_rank=16,
                                                    max_seq_len=args.prompt_tokens + 1100, core_slots=8, lr_slots=1,
                                                    device=args.device, prefix_cache_tokens=0))
    decode_ends: list[float] = []
    real_decode = eng.runner.decode

    def timed_decode(*a, **kw):
        out = real_decode(*a, **kw)
        if out.device.type == "cuda":
            torch.cuda.synchronize()
        decode_ends.append(time.perf_counter())
        return out

    eng.runner.decode = timed_decode
    vocab = base.model.config.vocab_size
    eng.start()
    results: dict[int, dict[str, list]] = {c: {"ttft": [], "max_gap": [], "mean_gap": [], "steps": [], "first": []}
                                           for c in chunks}
    try:
        # warm-up: adapters loaded, kernels and allocator warm
        asyncio.run(one_round(eng, ids, versions, args.rows, long_prompt(64, 0, vocab), decode_ends))
        for r in range(args.rounds):
            prompt = long_prompt(args.prompt_tokens, 1 + r, vocab)
            for c in chunks:
                eng.config.prefill_chunk_tokens = c
                ttft, window, first = asyncio.run(one_round(eng, ids, versions, args.rows, prompt, decode_ends))
                gaps = [b - a for a, b in zip(window, window[1:])]
                results[c]["ttft"].append(ttft)
                results[c]["max_gap"].append(max(gaps) if gaps else float("nan"))
                results[c]["mean_gap"].append(statistics.mean(gaps) if gaps else float("nan"))
                results[c]["steps"].append(len(window) - 1)
                results[c]["first"].append(first)
                print(f"round {r} chunk {c}: ttft {ttft:.2f} s, max gap {results[c]['max_gap'][-1]:.2f} s, "
                      f"{len(window) - 1} decode steps", file=sys.stderr, flush=True)
    finally:
        eng.shutdown(drain=False)

    base_c = chunks[0]
    mismatches = sum(1 for c in chunks for r in range(args.rounds) if results[c]["first"][r] != results[base_c]["first"][r])
    med = {c: {k: statistics.median(v) for k, v in results[c].items() if k != "first"} for c in chunks}
    print(f"\nChunked prefill: {base.name}, {args.rows} rows decoding (OSoRA / LoRA-XS r16 and base) when a "
          f"{args.prompt_tokens}-token prompt arrives; device {args.device}, {torch.get_num_threads()} threads, "
          f"medians of {args.rounds} rounds\n")
    print("| prefill_chunk_tokens | longest decode gap s | × shorter than whole | mean gap s | decode steps during "
          "its prefill | its TTFT s | TTFT × whole |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for c in chunks:
        m = med[c]
        rows[c] = {**m, "stall_reduction": med[base_c]["max_gap"] / m["max_gap"], "ttft_ratio": m["ttft"] / med[base_c]["ttft"]}
        print(f"| {c or 'off (whole)'} | {m['max_gap']:.2f} | {rows[c]['stall_reduction']:.2f} | {m['mean_gap']:.3f} | "
              f"{m['steps']:.0f} | {m['ttft']:.2f} | {rows[c]['ttft_ratio']:.2f} |")
    print(f"\nfirst tokens differing from the unchunked prefill's: {mismatches}")
    print(json.dumps({"bench": "chunked_prefill", "base": base.name, "rows": args.rows, "prompt_tokens": args.prompt_tokens,
                      "rounds": args.rounds, "device": args.device, "results": {str(c): rows[c] for c in chunks},
                      "mismatches": mismatches}))
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
