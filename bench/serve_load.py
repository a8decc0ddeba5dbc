"""The real server under concurrent clients on distinct adapters vs the same requests one at a time.

Starts `python -m service` (disk store in a temp dir, auth off, prefix cache off) on a free loopback port, uploads N adapters
(OSoRA and LoRA-XS, rank 16), then measures in the same run:
- cold vs warm time to first token (streamed /generate; cold = the adapter's first use, fetched from the store),
- the same request list sent one at a time, and from C concurrent clients: tokens/s ratio, p50/p99 latency.

    python bench/serve_load.py [--base default] [--clients 32] [--adapters 32] [--requests 64] [--max-tokens 32]

With --sampled, the concurrent phase runs once more with the same requests sampled (temperature 0.8, top_p 0.9,
a seed per request), to show what sampling costs against greedy in the same run.

Prints a markdown table and a last line of JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters_store.format import adapter_to_bytes  # noqa: E402
from bench.mixed_batch import random_adapter  # noqa: E402
from svd_adapters.base_model import load_base  # noqa: E402
from svd_adapters.factors import load_or_compute  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name a primary color.", "Give me a word that rhymes with cat.",
             "What is 2 plus 3?", "Say hello in Spanish.", "What do bees make?", "Name a planet.", "What is ice?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


SAMPLED = {"temperature": 0.8, "top_p": 0.9}  # --sampled: the same requests again, sampled (seeded per request)


async def generate(client: httpx.AsyncClient, adapter_id: str, i: int, max_tokens: int,
                   sampling: dict | None = None) -> tuple[float, int]:
    t0 = time.perf_counter()
    body = {"adapter_id": adapter_id, "prompt": QUESTIONS[i % len(QUESTIONS)], "max_tokens": max_tokens,
            **({"temperature": 0} if sampling is None else {**sampling, "seed": i})}
    r = await client.post("/generate", json=body)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]


async def first_token(client: httpx.AsyncClient, adapter_id: str) -> float:
    t0 = time.perf_counter()
    async with client.stream("POST", "/generate", json={"adapter_id": adapter_id, "prompt": QUESTIONS[0],
                                                         "max_tokens": 8, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                return time.perf_counter() - t0
    raise RuntimeError("stream ended without data")


def summary(results: list[tuple[float, int]], seconds: float) -> dict:
    tokens = sum(t for _, t in results)
    lat = [l for l, _ in results]
    return {"tok_s": tokens / seconds, "p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99), "tokens": tokens}


async def run(args, url: str, ids: list[str]) -> dict:
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        # cold (first use: fetched from the store into a slot) vs warm first-token latency, one at a time
        cold_ids = ids[: args.cold]
        cold = [await first_token(client, a) for a in cold_ids]
        warm = [await first_token(client, a) for a in cold_ids]
        for a in ids[args.cold :]:  # warm every adapter so both phases below see the same cache state
            await generate(client, a, 0, 1)
        reqs = [(ids[i % len(ids)], i) for i in range(args.requests)]
        t0 = time.perf_counter()
        seq = [await generate(client, a, i, args.max_tokens) for a, i in reqs]
        seq_s = time.perf_counter() - t0
        sem = asyncio.Semaphore(args.clients)

        async def bounded(a, i, sampling=None):
            async with sem:
                return await generate(client, a, i, args.max_tokens, sampling)

        t0 = time.perf_counter()
        conc = await asyncio.gather(*(bounded(a, i) for a, i in reqs))
        conc_s = time.perf_counter() - t0
        sampled = None
        if args.sampled:
            t0 = time.perf_counter()
            samp = await asyncio.gather(*(bounded(a, i, SAMPLED) for a, i in reqs))
            sampled = summary(samp, time.perf_counter() - t0)
    return {
        "sequential": summary(seq, seq_s),
        "concurrent": summary(conc, conc_s),
        **({"concurrent_sampled": sampled} if sampled else {}),
        "ttft_cold_p50_ms": 1e3 * statistics.median(cold),
        "ttft_warm_p50_ms": 1e3 * statistics.median(warm),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cold", type=int, default=8, help="adapters whose first use is timed (cold)")
    ap.add_argument("--sampled", action="store_true",
                    help=f"also run the concurrent phase sampled ({SAMPLED}), against the greedy one")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the server's --dtype")
    args = ap.parse_args()

    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SVDSERVE_AUTH": "off", "PYTHONUNBUFFERED": "1"}
        log = open(Path(tmp) / "server.log", "w")
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "--base", args.base, "--store", str(Path(tmp) / "adapters"),
             "--port", str(port), "--auth", "off", "--max-batch", str(args.clients), "--dtype", args.dtype,
             # the phases send the same requests: with a prefix cache, a later phase would reuse an earlier one's
             # prompts and look faster for that (bench/prefix_cache.py measures the cache)
             "--prefix-cache-tokens", "0"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.time() + 300
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"server did not start; see {log.name}: {open(log.name).read()[-2000:]}")
                time.sleep(0.5)
            ids = []
            for i in range(args.adapters):
                a = random_adapter(("osora", "loraxs")[i % 2], 16, factors, base.name, seed=i)
                r = httpx.post(f"{url}/adapters", files={"file": ("a.safetensors", adapter_to_bytes(a))},
                               data={"adapter_id": f"bench-{i}"}, timeout=60)
                r.raise_for_status()
                ids.append(r.json()["adapter_id"])
            try:
                res = asyncio.run(run(args, url, ids))
            except Exception:
                log.flush()
                print(open(log.name).read()[-4000:], file=sys.stderr)  # the server's side of the failure
                raise
        finally:
            server.terminate()
            server.wait(timeout=60)

    s, c = res["sequential"], res["concurrent"]
    print(f"\nServer under load: {base.name}, {args.requests} requests over {args.adapters} distinct adapters "
          f"(OSoRA/LoRA-XS r16), max_tokens {args.max_tokens}, greedy, {args.dtype}\n")
    print("| mode | tokens/s | × one-at-a-time | p50 latency s | p99 latency s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| one at a time | {s['tok_s']:.1f} | 1.00 | {s['p50_s']:.2f} | {s['p99_s']:.2f} |")
    print(f"| {args.clients} concurrent clients | {c['tok_s']:.1f} | {c['tok_s'] / s['tok_s']:.2f} | {c['p50_s']:.2f} | {c['p99_s']:.2f} |")
    if "concurrent_sampled" in res:
        x = res["concurrent_sampled"]
        print(f"| {args.clients} concurrent clients, sampled (temperature {SAMPLED['temperature']}, top_p {SAMPLED['top_p']}) "
              f"| {x['tok_s']:.1f} | {x['tok_s'] / s['tok_s']:.2f} ({x['tok_s'] / c['tok_s']:.2f} × greedy) "
              f"| {x['p50_s']:.2f} | {x['p99_s']:.2f} |")
    print(f"\n| first token | p50 ms |\n|---|---:|\n| cold adapter (first use, from the store) | {res['ttft_cold_p50_ms']:.1f} |"
          f"\n| warm adapter (resident) | {res['ttft_warm_p50_ms']:.1f} |")
    print(json.dumps({"bench": "serve_load", "base": base.name, "clients": args.clients, "adapters": args.adapters,
                      "requests": args.requests, "max_tokens": args.max_tokens, "dtype": args.dtype,
                      "speedup": c["tok_s"] / s["tok_s"], **res}))


if __name__ == "__main__":
    main()
