"""Time to first token with the prefix cache against without it, through the engine on the default model.

Two workloads, each on its own adapters (OSoRA and LoRA-XS r16, alternating; uploaded to a temp disk store):
- **system prompt**: each tenant's requests start with that tenant's long system prompt, then a short question;
- **chat**: each conversation's next turn is its whole history (earlier questions and the model's answers, as
  text, the way a client sends them) plus a question; a finished answer's keys and values are kept too.
Requests go one at a time (time to first token, max_tokens 1), the same requests through two engines that differ
only in `prefix_cache_tokens` (8192 against 0), alternated request by request so the host's drift hits both
alike. Both must pick the same first token and give the same answers (greedy); a difference is counted and fails
the run.

    python bench/prefix_cache.py [--base default] [--tenants 4] [--questions 6] [--turns 6] [--system-repeat N]

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

TOPICS = ["gardening", "tax forms", "train timetables", "bicycle repair", "chess openings", "bread baking",
          "tide tables", "star charts"]
SYSTEM = ("You are the support assistant of a small shop that sells everything about {topic}. Answer politely and "
          "briefly, in plain words, without lists. If a question is not about {topic}, say that you can only help "
          "with {topic} and suggest where else to ask. Never invent prices, opening hours or stock levels: say that "
          "the customer should check the shop's page. Our shop has served its town for forty years; mention it only "
          "when asked about the shop itself. Keep every answer under three sentences. Use the customer's own words "
          "for the things they ask about, and never correct their spelling.")
QUESTIONS = ["What should I start with?", "Is this hard to learn?", "How much time does it take each week?",
             "Can children do it too?", "What do I need to buy first?", "Where can I read more?",
             "What is the most common mistake?", "Do you have a beginners' guide?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--questions", type=int, default=6, help="requests per tenant in the system-prompt workload")
    ap.add_argument("--turns", type=int, default=6, help="turns per conversation in the chat workload")
    ap.add_argument("--answer-tokens", type=int, default=32, help="tokens of each chat answer (generated, untimed)")
    ap.add_argument("--system-repeat", type=int, default=1,
                    help="each system prompt this many times over (a long shared prefix: few-shot examples, documents)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workloads", default="system prompt,chat", help="comma-separated: system prompt, chat")
    args = ap.parse_args()
    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    # the first tenants' adapters for one workload, the others' for the other
    store, versions = stored_adapters(base, factors, 2 * args.tenants, "tenant-", seed=500)
    ids = list(versions)
    cfg = dict(max_batch=4, max_rank=16, max_seq_len=1024, core_slots=2 * args.tenants + 1, lr_slots=1,
               device=args.device)
    engines = {"off": Engine(base, factors, store, EngineConfig(**cfg, prefix_cache_tokens=0)),
               "on": Engine(base, factors, store, EngineConfig(**cfg, prefix_cache_tokens=8192))}
    for e in engines.values():
        e.start()
    enc = engines["on"].encode_prompt

    def system_requests() -> list[tuple[str, list[int], None]]:
        out = []
        for q in range(args.questions):
            for t in range(args.tenants):
                msgs = [{"role": "system", "content": " ".join([SYSTEM.format(topic=TOPICS[t % len(TOPICS)])] * args.system_repeat)},
                        {"role": "user", "content": QUESTIONS[q % len(QUESTIONS)]}]
                out.append((ids[t], enc(messages=msgs), None))
        return out

    def chat_turns(history: dict[int, list[dict]]):
        """(adapter, prompt, conversation) for each turn of each conversation; the caller appends each answer."""
        for turn in range(args.turns):
            for c in range(args.tenants):
                history[c].append({"role": "user",
                                   "content": f"About {TOPICS[c % len(TOPICS)]}: {QUESTIONS[turn % len(QUESTIONS)]}"})
                yield ids[args.tenants + c], enc(messages=list(history[c])), c

    async def first_token(engine: Engine, adapter_id: str, prompt: list[int]):
        t0 = time.perf_counter()
        res = await engine.generate(prompt, adapter_id, SamplingParams(max_tokens=1))
        return time.perf_counter() - t0, res

    rows, mismatches = {}, 0
    try:
        for aid in ids:  # load every adapter into both engines first: cold loads are not what this measures
            for e in engines.values():
                asyncio.run(e.generate(enc("hello"), aid, SamplingParams(max_tokens=1)))
        for name in [w.strip() for w in args.workloads.split(",")]:
            t = {"off": [], "on": []}
            cached, requests = [], []
            history = {c: [] for c in range(args.tenants)}
            for aid, prompt, conv in (system_requests() if name == "system prompt" else chat_turns(history)):
                firsts = {}
                for mode in ("off", "on"):  # alternated request by request
                    dt, res = asyncio.run(first_token(engines[mode], aid, prompt))
                    t[mode].append(dt)
                    firsts[mode] = res.token_ids
                    if mode == "on":
                        cached.append(res.cached_tokens)
                mismatches += firsts["off"] != firsts["on"]
                requests.append((aid, prompt))
                if conv is not None:  # the turn's answer (untimed), which the next turn's prompt repeats
                    answers = [asyncio.run(engines[m].generate(prompt, aid, SamplingParams(max_tokens=args.answer_tokens)))
                               for m in ("off", "on")]
                    mismatches += answers[0].token_ids != answers[1].token_ids
                    history[conv].append({"role": "assistant", "content": answers[0].text})
            lengths = [len(p) for _, p in requests]
            # the first request of each tenant or conversation finds nothing cached: shown apart
            warm = [i for i, c in enumerate(cached) if c > 0]
            rows[name] = {
                "requests": len(requests), "prompt_tokens_mean": statistics.mean(lengths),
                "cached_tokens_mean": statistics.mean(cached), "requests_hitting": len(warm),
                "ttft_off_p50_ms": 1e3 * statistics.median(t["off"]), "ttft_on_p50_ms": 1e3 * statistics.median(t["on"]),
                "ttft_off_hits_p50_ms": 1e3 * statistics.median(t["off"][i] for i in warm) if warm else None,
                "ttft_on_hits_p50_ms": 1e3 * statistics.median(t["on"][i] for i in warm) if warm else None,
                "total_off_s": sum(t["off"]), "total_on_s": sum(t["on"]),
            }
    finally:
        for e in engines.values():
            e.shutdown(drain=False)
    stats = engines["on"].stats()
    print(f"\nPrefix cache: {base.name}, one request at a time, first token only, {args.tenants} tenants per workload, "
          f"OSoRA / LoRA-XS r16; the same requests with the cache off and on, alternated\n")
    print("| workload | requests | prompt tokens (mean) | cached tokens (mean, on) | TTFT p50 off ms | TTFT p50 on ms "
          "| × off | TTFT p50 of hits, off / on ms | × off (hits) | total off / on s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        hits = (f"{r['ttft_off_hits_p50_ms']:.0f} / {r['ttft_on_hits_p50_ms']:.0f} | "
                f"{r['ttft_off_hits_p50_ms'] / r['ttft_on_hits_p50_ms']:.2f}" if r["requests_hitting"] else "n/a | n/a")
        print(f"| {name} | {r['requests']} | {r['prompt_tokens_mean']:.0f} | {r['cached_tokens_mean']:.0f} "
              f"| {r['ttft_off_p50_ms']:.0f} | {r['ttft_on_p50_ms']:.0f} | {r['ttft_off_p50_ms'] / r['ttft_on_p50_ms']:.2f} "
              f"| {hits} | {r['total_off_s']:.1f} / {r['total_on_s']:.1f} |")
    print(f"\nfirst tokens or answers that differ between off and on: {mismatches}")
    print(json.dumps({"bench": "prefix_cache", "base": base.name, "tenants": args.tenants, "results": rows,
                      "mismatches": mismatches,
                      "prefix_cache": {k: v for k, v in stats.items() if k.startswith("prefix_cache")}}))
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
