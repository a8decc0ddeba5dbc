"""Fair admission across tenants: a tenant's requests behind another tenant's backlog, fair share against FIFO.

Through the engine on the default model: tenant "bulk" queues a backlog (N requests on its OSoRA / LoRA-XS
adapters, max_tokens T, more than the batch's rows), then tenant "chat" sends a few short requests, one every
--gap seconds. First come, first served, each of chat's requests waits until bulk's whole backlog ahead of it
has been admitted; with fair share (the default) it takes the next free row, since chat holds fewer rows than
bulk. Measured: chat's time to first token (p50 / max), bulk's time to finish its backlog and the tokens/s of the
whole run (what fairness must not cost). Both settings run on one engine, alternated round by round.

    python bench/tenant_fairness.py [--base default] [--rows 8] [--backlog 32] [--chat 4] [--rounds 2]

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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from adapters_store.disk import DiskStore  # noqa: E402
from adapters_store.format import adapter_to_bytes  # noqa: E402
from adapters_store.records import record_for  # noqa: E402
from mixed_batch import random_adapter  # noqa: E402
from service.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from svd_adapters.base_model import load_base  # noqa: E402
from svd_adapters.factors import load_or_compute  # noqa: E402


async def one_round(eng: Engine, versions: dict[str, str], args) -> dict:
    ids = sorted(versions)
    t0 = time.perf_counter()
    tokens = 0

    async def bulk(i: int) -> float:
        nonlocal tokens
        aid = ids[i % len(ids)]
        prompt = eng.encode_prompt(f"Write a long report on topic number {i}.")
        res = await eng.generate(prompt, aid, SamplingParams(max_tokens=args.tokens, ignore_eos=True, tenant="bulk"),
                                 versions[aid])
        tokens += len(res.token_ids)
        return time.perf_counter() - t0

    async def chat(i: int) -> float:
        nonlocal tokens
        await asyncio.sleep(args.gap * (i + 1))  # after the backlog is queued
        prompt = eng.encode_prompt(f"Quick question {i}: what is {i} + {i}?")
        start = time.perf_counter()
        async for item in eng.stream(prompt, None, SamplingParams(max_tokens=4, tenant="chat")):
            ttft = time.perf_counter() - start  # the first item is the first token's text (or the result)
            break
        else:
            ttft = float("nan")
        tokens += 1
        return ttft

    backlog = [asyncio.ensure_future(bulk(i)) for i in range(args.backlog)]
    ttfts = await asyncio.gather(*(chat(i) for i in range(args.chat)))
    done = await asyncio.gather(*backlog)
    wall = time.perf_counter() - t0
    return {"chat_ttft": list(ttfts), "bulk_done_s": max(done), "wall_s": wall, "tok_s": tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--rows", type=int, default=8, help="max_batch: fewer rows than the backlog, so it queues")
    ap.add_argument("--backlog", type=int, default=32, help="bulk's requests, queued at once")
    ap.add_argument("--tokens", type=int, default=32, help="bulk's max_tokens")
    ap.add_argument("--chat", type=int, default=4, help="chat's requests, one every --gap seconds")
    ap.add_argument("--gap", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    store = DiskStore(tempfile.mkdtemp(prefix="svdserve-fair-"))
    versions = {}
    for i in range(4):
        a = random_adapter(("osora", "loraxs")[i % 2], 16, factors, base.name, seed=900 + i)
        blob = adapter_to_bytes(a)
        record = record_for(a, blob, f"bulk-{i}")
        store.put(record, blob)
        versions[record.adapter_id] = record.sha256
    eng = Engine(base, factors, store, EngineConfig(max_batch=args.rows, max_rank=16, max_seq_len=256, core_slots=8,
                                                    lr_slots=1, device=args.device, max_waiting=args.backlog + 64,
                                                    prefix_cache_tokens=0))
    eng.start()
    settings = {"FIFO": False, "fair share": True}
    runs: dict[str, list[dict]] = {k: [] for k in settings}
    try:
        asyncio.run(one_round(eng, versions, argparse.Namespace(**{**vars(args), "backlog": args.rows, "chat": 1})))
        for r in range(args.rounds):
            for name, fair in settings.items():
                eng.config.fair_share = fair
                res = asyncio.run(one_round(eng, versions, args))
                runs[name].append(res)
                print(f"round {r} {name}: chat TTFT {[round(t, 2) for t in res['chat_ttft']]} s, bulk done "
                      f"{res['bulk_done_s']:.1f} s, {res['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        eng.shutdown(drain=False)

    rows = {}
    for name, rs in runs.items():
        ttfts = [t for r in rs for t in r["chat_ttft"]]
        rows[name] = {"chat_ttft_p50_s": statistics.median(ttfts), "chat_ttft_max_s": max(ttfts),
                      "bulk_done_s": statistics.median(r["bulk_done_s"] for r in rs),
                      "tok_s": statistics.median(r["tok_s"] for r in rs)}
    fifo = rows["FIFO"]
    for r in rows.values():
        r["chat_ttft_faster"] = fifo["chat_ttft_p50_s"] / r["chat_ttft_p50_s"]
        r["tok_s_ratio"] = r["tok_s"] / fifo["tok_s"]
    print(f"\nTenant fairness: {base.name}, {args.rows} rows; tenant bulk queues {args.backlog} requests (max_tokens "
          f"{args.tokens}), tenant chat sends {args.chat} (max_tokens 4) one every {args.gap} s; device {args.device}, "
          f"{args.rounds} rounds\n")
    print("| admission | chat TTFT p50 s | × faster than FIFO | chat TTFT max s | bulk backlog done s | tokens/s | × FIFO |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['chat_ttft_p50_s']:.2f} | {r['chat_ttft_faster']:.2f} | {r['chat_ttft_max_s']:.2f} | "
              f"{r['bulk_done_s']:.1f} | {r['tok_s']:.1f} | {r['tok_s_ratio']:.2f} |")
    print(json.dumps({"bench": "tenant_fairness", "base": base.name, "rows": args.rows, "backlog": args.backlog,
                      "chat": args.chat, "rounds": args.rounds, "device": args.device, "results": rows}))


if __name__ == "__main__":
    main()
