"""Speculative decoding by prompt lookup against plain decoding, through the engine on the default model.

Workloads whose answers copy from their prompts (rewriting a text with its typos fixed, editing code, quoting a
document's sentences) and one that copies nothing (a poem), each on the base and on OSoRA / LoRA-XS r16
adapters (uploaded to a temp disk store), and two of them again with a predicted output (OpenAI's `prediction`:
the text the answer is expected to repeat). The same requests go through two engines that differ only in
`speculative` (off and predictions unused; `--tokens` drafted tokens with n-grams of 2–4, predictions drafted 8
tokens at a time), alternated request by request so the host's drift hits both alike: one request at a time (a
single user's latency: where speculation is for), then `--concurrency` at once. Greedy, or sampled and seeded (`--temperature`); both engines must give the same tokens —
a difference is counted, and fails a greedy run (sampled, a draw landing within float rounding of the boundary
between two tokens may pick the neighbour: service/speculative.py).

    python bench/speculative.py [--base default] [--tokens 4] [--max-tokens 128] [--repeats 2] [--concurrency 4]
                                [--temperature T] [--backoff-max N] [--only NAME]

Prints a markdown table and a last line of JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import replace
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mixed_batch import stored_adapters  # noqa: E402
from service.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from service.speculative import SpeculativeConfig  # noqa: E402
from svd_adapters.base_model import load_base  # noqa: E402
from svd_adapters.factors import load_or_compute  # noqa: E402

TEXT = ("Our shop opens at nine in the morning and closes at six in the evening. On Saturdays we open an hour "
        "later. We sell seeds, tools and books about gardening, and we repair lawn mowers in the workshop behind "
        "the shop. Orders over fifty pounds are delivered for free within the town.")
TYPOS = TEXT.replace("morning", "mornig").replace("evening", "evning").replace("Saturdays", "Saturdys") \
    .replace("repair", "repiar").replace("delivered", "deliverd")
CODE = '''def total_price(items, tax):
    total = 0
    for item in items:
        total = total + item.price * item.quantity
    total = total + total * tax
    return round(total, 2)
'''
# Predicted Outputs (OpenAI's `prediction`): the prompt of a workload above, with the text its answer is expected
# to repeat (the sentences to quote; the text to correct) given too: the engine drafts from it, the "off" engine
# ignores it
PREDICTED = {
    "quote, predicted": ("quote", "Our shop opens at nine in the morning and closes at six in the evening. On Saturdays "
                                  "we open an hour later."),
    "fix typos, predicted": ("fix typos", TYPOS),
}
WORKLOADS = {
    "fix typos": f"Fix the spelling mistakes in this text and write the whole corrected text:\n\n{TYPOS}",
    "edit code": f"Rename the function total_price to order_total in this Python code and show the full code:\n\n{CODE}",
    "quote": f"Copy the sentences of this text that talk about opening hours, word for word:\n\n{TEXT}",
    "poem (no copying)": "Write a short poem about the sea at night.",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--tokens", type=int, default=4, help="drafted tokens per step (the speculating engine's)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the workloads × adapters, one at a time")
    ap.add_argument("--concurrency", type=int, default=4, help="requests at once in the batched round; 0 skips it")
    ap.add_argument("--only", default=None, help="run only the workloads whose name contains this text")
    ap.add_argument("--backoff-max", type=int, default=SpeculativeConfig.backoff_max,
                    help="the speculating engine's rest after rejected drafts (0: drafts every step)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0 = greedy; above it every request samples, seeded, so both engines draw the same tokens")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    store, versions = stored_adapters(base, factors, 2, "spec-", seed=700)  # one OSoRA, one LoRA-XS
    adapters = [None] + list(versions)
    cfg = dict(max_batch=max(4, args.concurrency), max_rank=16, max_seq_len=1024, core_slots=4, lr_slots=1,
               device=args.device, prefix_cache_tokens=0)
    spec = SpeculativeConfig(tokens=args.tokens, max_batch=max(4, args.concurrency), backoff_max=args.backoff_max)
    engines = {"off": Engine(base, factors, store, EngineConfig(**cfg, speculative=SpeculativeConfig(prediction_tokens=0))),
               "on": Engine(base, factors, store, EngineConfig(**cfg, speculative=spec))}
    for e in engines.values():
        e.start()
    enc = engines["on"].encode_prompt
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=1234 if args.temperature > 0 else None)
    jobs = {name: (enc(messages=[{"role": "user", "content": text}]), None) for name, text in WORKLOADS.items()}
    for name, (like, predicted) in PREDICTED.items():  # the same prompt, its answer's expected text given too
        jobs[name] = (jobs[like][0], enc(predicted, raw=True))
    jobs = {name: job for name, job in jobs.items() if args.only is None or args.only in name}

    async def timed(engine: Engine, batch: list[tuple[str, str | None]]):
        t0 = time.perf_counter()
        results = await asyncio.gather(*[engine.generate(jobs[name][0], a, replace(params, prediction=jobs[name][1]))
                                         for name, a in batch])
        return time.perf_counter() - t0, results

    def spec_counts() -> dict[str, int]:
        c = engines["on"].counters
        return {k: c[k] for k in ("spec_steps", "spec_draft_tokens", "spec_accepted_tokens", "steps")}

    rows, mismatches = {}, 0
    try:
        for aid in adapters[1:]:  # adapters loaded first: cold loads are not what this measures
            for e in engines.values():
                asyncio.run(e.generate(enc("hello"), aid, SamplingParams(max_tokens=1)))
        rounds = [(name, [(name, a)]) for _ in range(args.repeats) for name in jobs for a in adapters]
        if args.concurrency:  # each workload's requests, `concurrency` at once (adapters mixed)
            rounds += [(f"{name}, {args.concurrency} at once",
                        [(name, adapters[i % len(adapters)]) for i in range(args.concurrency)])
                       for name in jobs]
        for name, batch in rounds:
            r = rows.setdefault(name, {"seconds": {"off": 0.0, "on": 0.0}, "tokens": 0, "requests": 0,
                                       "drafted": 0, "accepted": 0, "spec_steps": 0, "steps": 0})
            before = spec_counts()
            outs = {}
            for mode in ("off", "on"):  # alternated request by request
                dt, outs[mode] = asyncio.run(timed(engines[mode], batch))
                r["seconds"][mode] += dt
            after = spec_counts()
            mismatches += sum(a.token_ids != b.token_ids for a, b in zip(outs["off"], outs["on"]))
            r["tokens"] += sum(o.completion_tokens for o in outs["on"])
            r["requests"] += len(batch)
            for key, field in (("drafted", "spec_draft_tokens"), ("accepted", "spec_accepted_tokens"),
                               ("spec_steps", "spec_steps"), ("steps", "steps")):
                r[key] += after[field] - before[field]
    finally:
        for e in engines.values():
            e.shutdown(drain=False)
    how = f"sampled at temperature {args.temperature} (seeded)" if args.temperature > 0 else "greedy"
    print(f"\nSpeculative decoding by prompt lookup: {base.name}, {args.device}, {how}, max_tokens {args.max_tokens}, "
          f"{args.tokens} drafted tokens a step (back-off to {args.backoff_max} steps); the base and OSoRA / LoRA-XS r16 adapters; the same requests with "
          f"speculation off and on, alternated\n")
    print("| workload | requests | tokens | tok/s off | tok/s on | × off | drafted | accepted | acceptance | "
          "decode steps on (speculative) | tokens a step on |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        off, on = r["tokens"] / r["seconds"]["off"], r["tokens"] / r["seconds"]["on"]
        r.update(tok_s_off=off, tok_s_on=on, ratio=on / off,
                 acceptance=r["accepted"] / r["drafted"] if r["drafted"] else None)
        # every request's first token comes from its prefill, not a decode step
        per_step = (r["tokens"] - r["requests"]) / r["steps"] if r["steps"] else float("nan")
        acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "n/a"
        print(f"| {name} | {r['requests']} | {r['tokens']} | {off:.1f} | {on:.1f} | {on / off:.2f} | {r['drafted']} "
              f"| {r['accepted']} | {acc} | {r['steps']} ({r['spec_steps']}) | {per_step:.2f} |")
    print(f"\nanswers that differ between off and on: {mismatches}")
    print(json.dumps({"bench": "speculative", "base": base.name, "device": args.device, "tokens": args.tokens,
                      "temperature": args.temperature, "backoff_max": args.backoff_max,
                      "max_tokens": args.max_tokens, "results": rows, "mismatches": mismatches}))
    if mismatches and args.temperature == 0:  # sampled, a draw within rounding of a boundary may differ (rarely)
        sys.exit(1)


if __name__ == "__main__":
    main()
