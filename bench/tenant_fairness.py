"""Fair admission across tenants: a tenant's requests beside another tenant's standing backlog, fair share
against FIFO.

Through the engine on the default model: tenant "bulk" keeps more requests queued than the batch has rows (C
closed-loop clients on its OSoRA / LoRA-XS adapters, each sending its next request, max_tokens T, as soon as the
last is answered), while tenant "chat" sends a short request every --gap seconds. First come, first served, each
of chat's requests waits behind the bulk requests queued before it; with fair share (the default) it takes the
next free row, since chat holds fewer rows than bulk. Measured over a fixed window: chat's time to first token
(p50 / max) and the tokens/s the engine generated in all (what fairness must not cost: the same steady load, so
no end-of-backlog tail favours either). A third setting sends chat's requests as bulk's tenant, so fair share
cannot tell them apart, with vLLM's `priority` -1 (bulk's are 0): admitted before any of bulk's waiting requests.
The settings run on one engine, alternated round by round.

    python bench/tenant_fairness.py [--base default] [--rows 8] [--bulk-clients 24] [--seconds 20] [--rounds 2]
    python bench/tenant_fairness.py --bulk-clients 40 --max-waiting 16     # bulk also fills the queue

With --max-waiting under bulk's clients the queue is full all the time: FIFO refuses chat's requests (429
queue_full), while fair share lets each take the place of bulk's newest waiting request; refusals are counted.

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
from service.engine import Engine, EngineConfig, QueueFull, SamplingParams  # noqa: E402
from svd_adapters.base_model import load_base  # noqa: E402
from svd_adapters.factors import load_or_compute  # noqa: E402


async def one_round(eng: Engine, versions: dict[str, str], args) -> dict:
    ids = sorted(versions)
    t0 = time.perf_counter()
    stop_at = t0 + args.seconds

    async def bulk(i: int) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            aid = ids[(i + n) % len(ids)]
            prompt = eng.encode_prompt(f"Write a long report on topic number {i}-{n}.")
            try:
                await eng.generate(prompt, aid, SamplingParams(max_tokens=args.tokens, ignore_eos=True, tenant="bulk"),
                                   versions[aid])
            except QueueFull as exc:  # as a client would: wait as told, then send it again
                await asyncio.sleep(min(exc.retry_after or 1.0, 1.0))
            n += 1

    async def chat(i: int) -> float:
        await asyncio.sleep(args.warmup + args.gap * i)  # once the backlog stands
        prompt = eng.encode_prompt(f"Quick question {i}: what is {i} + {i}?")
        start, first = time.perf_counter(), float("nan")
        try:
            async for _ in eng.stream(prompt, None, SamplingParams(max_tokens=4, ignore_eos=True, tenant=args.chat_tenant,
                                                                   priority=args.chat_priority)):
                if first != first:  # the first item: the first token's text (or the result); the rest is read too
                    first = time.perf_counter() - start
        except QueueFull:
            return None  # refused: 429
        return first

    async def window() -> dict:
        await asyncio.sleep(args.warmup)
        keys = ("completion_tokens", "steps", "prompt_tokens", "prefill_calls")
        first = {k: eng.counters.get(k, 0) for k in keys}
        await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
        return {k: eng.counters.get(k, 0) - first[k] for k in keys}

    n_chat = max(1, int((args.seconds - args.warmup) / args.gap) - 1)
    clients = [asyncio.ensure_future(bulk(i)) for i in range(args.bulk_clients)]
    counted = asyncio.ensure_future(window())
    ttfts = await asyncio.gather(*(chat(i) for i in range(n_chat)))
    counts = await counted
    await asyncio.gather(*clients)
    return {"chat_ttft": [t for t in ttfts if t is not None], "chat_refused": sum(t is None for t in ttfts),
            "chat_sent": len(ttfts), "tok_s": counts["completion_tokens"] / (args.seconds - args.warmup),
            "rows_per_decode_step": counts["completion_tokens"] / max(1, counts["steps"]),
            "prefill_calls": counts["prefill_calls"], "decode_steps": counts["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--rows", type=int, default=8, help="max_batch: fewer rows than bulk's clients, so it queues")
    ap.add_argument("--bulk-clients", type=int, default=24, help="bulk's closed-loop clients")
    ap.add_argument("--tokens", type=int, default=32, help="bulk's max_tokens")
    ap.add_argument("--seconds", type=float, default=20.0, help="each round's length")
    ap.add_argument("--warmup", type=float, default=4.0, help="seconds before chat starts and tokens are counted")
    ap.add_argument("--gap", type=float, default=1.5, help="seconds between chat's requests")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-waiting", type=int, default=None,
                    help="the engine's queue (default: room for every client; fewer than bulk's clients fills it)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    store, versions = stored_adapters(base, factors, 4, "bulk-", seed=900)
    eng = Engine(base, factors, store, EngineConfig(max_batch=args.rows, max_rank=16, max_seq_len=256, core_slots=8,
                                                    lr_slots=1, device=args.device, max_waiting=args.max_waiting or args.bulk_clients + 64,
                                                    prefix_cache_tokens=0))
    real_prefill = eng.runner.prefill

    def counted_prefill(*a, **kw):  # every prefill call, chunks included: each stalls the decoding rows
        eng.counters["prefill_calls"] = eng.counters.get("prefill_calls", 0) + 1
        return real_prefill(*a, **kw)

    eng.runner.prefill = counted_prefill
    eng.start()
    # name → (fair share, chat's tenant, chat's priority)
    settings = {"FIFO": (False, "chat", 0), "fair share": (True, "chat", 0),
                "one tenant, chat priority -1": (True, "bulk", -1)}
    runs: dict[str, list[dict]] = {k: [] for k in settings}
    try:
        asyncio.run(one_round(eng, versions, argparse.Namespace(**{**vars(args), "seconds": 3.0, "warmup": 1.0,
                                                                     "chat_tenant": "chat", "chat_priority": 0})))
        for r in range(args.rounds):
            for name, (fair, tenant, priority) in settings.items():
                eng.config.fair_share = fair
                res = asyncio.run(one_round(eng, versions, argparse.Namespace(
                    **{**vars(args), "chat_tenant": tenant, "chat_priority": priority})))
                runs[name].append(res)
                print(f"round {r} {name}: chat TTFT {[round(t, 2) for t in res['chat_ttft']]} s, refused "
                      f"{res['chat_refused']}/{res['chat_sent']}, "
                      f"{res['tok_s']:.1f} tok/s, {res['decode_steps']} decode steps of {res['rows_per_decode_step']:.2f} "
                      f"rows, {res['prefill_calls']} prefill calls", file=sys.stderr, flush=True)
    finally:
        eng.shutdown(drain=False)

    rows = {}
    for name, rs in runs.items():
        ttfts = [t for r in rs for t in r["chat_ttft"]]
        rows[name] = {"chat_ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan"),
                      "chat_ttft_max_s": max(ttfts, default=float("nan")),
                      "chat_refused": f"{sum(r['chat_refused'] for r in rs)}/{sum(r['chat_sent'] for r in rs)}",
                      "tok_s": statistics.median(r["tok_s"] for r in rs),
                      "rows_per_decode_step": statistics.median(r["rows_per_decode_step"] for r in rs),
                      "prefill_calls": statistics.median(r["prefill_calls"] for r in rs)}
    fifo = rows["FIFO"]
    for r in rows.values():
        r["chat_ttft_faster"] = fifo["chat_ttft_p50_s"] / r["chat_ttft_p50_s"]
        r["tok_s_ratio"] = r["tok_s"] / fifo["tok_s"]
    print(f"\nTenant fairness: {base.name}, {args.rows} rows; tenant bulk keeps {args.bulk_clients} requests in flight "
          f"(max_tokens {args.tokens}), tenant chat sends one (max_tokens 4) every {args.gap} s; {args.seconds:g} s "
          f"rounds, the first {args.warmup:g} s uncounted; device {args.device}, {args.rounds} rounds\n")
    print("| admission | chat refused (429) | chat TTFT p50 s | × faster than FIFO | chat TTFT max s | tokens/s (all) | "
          "× FIFO | rows per decode step | prefill calls |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['chat_refused']} | {r['chat_ttft_p50_s']:.2f} | {r['chat_ttft_faster']:.2f} | {r['chat_ttft_max_s']:.2f} | "
              f"{r['tok_s']:.1f} | {r['tok_s_ratio']:.2f} | {r['rows_per_decode_step']:.2f} | {r['prefill_calls']:.0f} |")
    print(json.dumps({"bench": "tenant_fairness", "base": base.name, "rows": args.rows, "bulk_clients": args.bulk_clients,
                      "seconds": args.seconds, "rounds": args.rounds, "device": args.device, "results": rows}))


if __name__ == "__main__":
    main()
