"""Request-time merges: how long a merge of stored adapters takes to be ready in a device slot (p50 / p99).

Measures the engine's own path for a request's `merged_adapters` (`Engine._load` with its `MergeSpec`: each
source fetched from Redis and validated — or, for a linear merge, its slot terms taken from the host-memory tier
when held there — merged, turned into slot terms) and the slot write. The baseline, in the same run: the cold
load of each source alone (what serving the sources unmerged costs); the ratio is the merge over the sum of its
sources' loads (> 1: the merge math adds to the fetches).

    python bench/merge_load.py [--base default] [--rank 16] [--n 12] [--redis redis://127.0.0.1:6379/0]

Prints a markdown table and a last line of JSON. Uses its own key prefix and deletes only its keys.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store.format import adapter_to_bytes  # noqa: E402
from adapters_store.records import record_for  # noqa: E402
from bench.adapter_load import load_bench_args, pct, redis_engine  # noqa: E402
from bench.mixed_batch import random_adapter  # noqa: E402
from service.host_tier import HostTier  # noqa: E402
from service.merges import MergeSpec  # noqa: E402
from svd_adapters.adapter import slot_pool  # noqa: E402
from svd_adapters.merge import MergeOptions  # noqa: E402

# name → (the sources' methods, strategy)
MERGES = {
    "linear: 2 LoRA-XS (core slot)": (["loraxs", "loraxs"], "linear"),
    "linear: 2 OSoRA": (["osora", "osora"], "linear"),
    "linear: OSoRA + LoRA-XS + SORSA": (["osora", "loraxs", "sorsa"], "linear"),
    "ties: 2 OSoRA": (["osora", "osora"], "ties"),
    "ties: 2 LoRA-XS": (["loraxs", "loraxs"], "ties"),
    "dare_ties: 2 SORSA": (["sorsa", "sorsa"], "dare_ties"),
}


def main() -> None:
    args = load_bench_args(__doc__.split("\n")[0], 12, "merges of each kind (each of fresh adapters)")
    with redis_engine(args) as (base, factors, store, engine, sync):
        rows = measure(args, base, factors, store, engine, sync)
    report(args, base, rows)


def measure(args, base, factors, store, engine, sync) -> dict[str, dict]:
    counter = iter(range(1 << 30))

    def stored(method: str) -> tuple[str, str]:
        i = next(counter)
        a = random_adapter(method, args.rank, factors, base.name, seed=i)
        blob = adapter_to_bytes(a)
        record = record_for(a, blob, f"{method}-{i}")
        store.put(record, blob)
        return record.adapter_id, record.sha256

    def ready(key: str, spec: MergeSpec | None = None) -> float:
        """Seconds from nothing cached to the adapter written in a slot."""
        t0 = time.perf_counter()
        _, terms, _ = engine._load(key, spec)
        (engine.runner.write_core_slot if slot_pool(terms) == "core" else engine.runner.write_lr_slot)(1, terms)
        sync()
        return time.perf_counter() - t0

    rows = {}
    for name, (methods, strategy) in MERGES.items():
        cold, warm, alone = [], [], []
        for _ in range(args.n):
            sources = [stored(m) for m in methods]
            spec = MergeSpec(tuple(sources), (1.0,) * len(sources), MergeOptions(strategy, density=0.5))
            engine.host_tier = HostTier(engine.host_tier.capacity)  # nothing in host memory
            alone.append(sum(ready(f"{i}@{v}") for i, v in sources))  # the sources alone, cold
            engine.host_tier = HostTier(engine.host_tier.capacity)
            cold.append(ready(spec.cache_key, spec))
            if strategy == "linear":  # its sources are now in host memory: a second merge of them
                other = MergeSpec(spec.sources, (0.5,) * len(sources), spec.options)
                warm.append(ready(other.cache_key, other))
        rows[name] = {
            "sources_alone_p50_ms": 1e3 * statistics.median(alone),
            "merge_ready_p50_ms": 1e3 * statistics.median(cold),
            "merge_ready_p99_ms": 1e3 * pct(cold, 0.99),
            "merge_over_sources": statistics.median(cold) / statistics.median(alone),
            "from_host_memory_p50_ms": 1e3 * statistics.median(warm) if warm else None,
        }
    return rows


def report(args, base, rows: dict[str, dict]) -> None:
    print(f"\nMerge ready in a device slot, sources from Redis: {base.name}, rank {args.rank}, {args.n} merges each, "
          f"device {args.device}, density 0.5 for ties / dare\n")
    print("| merge | its sources loaded alone, p50 ms (baseline) | merge ready p50 ms | p99 ms | × the sources alone | "
          "linear, sources in host memory: p50 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        warm = f"{r['from_host_memory_p50_ms']:.2f}" if r["from_host_memory_p50_ms"] is not None else "—"
        print(f"| {name} | {r['sources_alone_p50_ms']:.2f} | {r['merge_ready_p50_ms']:.2f} | {r['merge_ready_p99_ms']:.2f} "
              f"| {r['merge_over_sources']:.2f} | {warm} |")
    print(json.dumps({"bench": "merge_load", "base": base.name, "rank": args.rank, "n": args.n, "device": args.device,
                      "results": rows}))


if __name__ == "__main__":
    main()
