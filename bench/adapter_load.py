"""Cold adapter load latency, Redis → ready in a device slot, per method (p50 / p99).

Measures the engine's own path: `Engine._load` of the key a request makes (adapter id and the version the API
authorised: fetch the blob from the store, which checks it against its record and the record against that
version, validate it completely, turn it into slot terms) followed by the slot write the engine thread does before
the adapter can serve.
A baseline in the same run: a bare Redis GET of the same blob (the floor any design pays). The adapters of one
method share their header layout (as a trainer's adapters of one method, rank and targets do), so after the first
load of each method the validator's header checks are remembered (`adapters_store.validate`): the p50 is such a
load, whose data is still checked; the p99 includes the first, checked in full.
Then the same adapter wanted again after its slot was reused: from the engine's host-memory tier
(`service/host_tier.py`: the terms the load produced, kept in RAM), which skips the store and the validation.

    python bench/adapter_load.py [--base default] [--rank 16] [--n 40] [--redis redis://127.0.0.1:6379/0] [--device cuda]

On a GPU the slot write includes the host → device copy: the clock stops after the device has finished it.

Prints a markdown table and a last line of JSON. Uses its own key prefix and deletes only its keys.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store.format import adapter_to_bytes  # noqa: E402
from adapters_store.records import record_for  # noqa: E402
from adapters_store.redis_store import RedisStore  # noqa: E402
from bench.mixed_batch import random_adapter  # noqa: E402
from svd_adapters.methods import pool_of  # noqa: E402
from service.engine import Engine, EngineConfig  # noqa: E402
from svd_adapters.base_model import BaseModel, load_base  # noqa: E402
from svd_adapters.factors import BaseFactors, load_or_compute  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def load_bench_args(description: str, n_default: int, n_help: str) -> argparse.Namespace:
    """The options the load benchmarks share (this one and merge_load.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--base", default="default")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--n", type=int, default=n_default, help=n_help)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args()


@contextmanager
def redis_engine(args: argparse.Namespace) -> Iterator[tuple[BaseModel, BaseFactors, RedisStore, Engine, Callable[[], None]]]:
    """(base, factors, a Redis store under its own key prefix, an engine on them, a device sync): the keys
    deleted and the engine shut down on the way out."""
    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    prefix = f"svdserve-bench:{uuid.uuid4().hex[:8]}:"
    store = RedisStore(args.redis, prefix=prefix)
    engine = Engine(base, factors, store, EngineConfig(max_batch=4, max_rank=args.rank, max_seq_len=64,
                                                       core_slots=4, lr_slots=4, device=args.device))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    try:
        yield base, factors, store, engine, sync
    finally:
        for key in store._client.scan_iter(match=f"{prefix}*"):
            store._client.delete(key)
        engine.shutdown(drain=False)


def main() -> None:
    args = load_bench_args(__doc__.split("\n")[0], 40, "adapters per method")
    methods = ["osora", "loraxs", "sorsa", "lora"]
    rows = {}
    with redis_engine(args) as (base, factors, store, engine, sync):
        for method in methods:
            ids = []
            for i in range(args.n):
                a = random_adapter(method, args.rank, factors, base.name, seed=i)
                blob = adapter_to_bytes(a)
                aid = f"{method}-{i}"
                record = record_for(a, blob, aid)
                store.put(record, blob)
                ids.append(f"{aid}@{record.sha256}")  # the engine's key: id and the version the API authorised
            size = len(blob)
            get_t, load_t, write_t, total_t, host_t = [], [], [], [], []
            for key in ids:
                aid = key.partition("@")[0]
                t0 = time.perf_counter()
                store._client.get(store._blob_key(aid))
                get_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                m, terms, _ = engine._load(key)  # fetch + validate + terms, as the loader thread does
                t1 = time.perf_counter()
                slot = 1
                if pool_of(m) == "core":
                    engine.runner.write_core_slot(slot, terms)
                else:
                    engine.runner.write_lr_slot(slot, terms)
                sync()
                t2 = time.perf_counter()
                load_t.append(t1 - t0)
                write_t.append(t2 - t1)
                total_t.append(t2 - t0)
                # evicted and wanted again: the host tier holds what the load produced (Engine._from_host_tier)
                engine.host_tier.put(key, m, terms)
                t0 = time.perf_counter()
                entry = engine.host_tier.get(key)
                if pool_of(m) == "core":
                    engine.runner.write_core_slot(slot, entry.terms)
                else:
                    engine.runner.write_lr_slot(slot, entry.terms)
                sync()
                host_t.append(time.perf_counter() - t0)
            rows[method] = {
                "adapter_bytes": size,
                "redis_get_p50_ms": 1e3 * statistics.median(get_t),
                "load_validate_p50_ms": 1e3 * statistics.median(load_t),
                "slot_write_p50_ms": 1e3 * statistics.median(write_t),
                "ready_p50_ms": 1e3 * statistics.median(total_t),
                "ready_p99_ms": 1e3 * pct(total_t, 0.99),
                "host_tier_ready_p50_ms": 1e3 * statistics.median(host_t),
                "host_tier_ready_p99_ms": 1e3 * pct(host_t, 0.99),
                "store_over_host_tier": statistics.median(total_t) / statistics.median(host_t),
            }

    print(f"\nCold adapter load, Redis → ready in a device slot: {base.name}, rank {args.rank}, {args.n} adapters per method, "
          f"device {args.device}\n")
    print("| method | adapter bytes | Redis GET p50 ms (floor) | fetch+validate p50 ms | slot write p50 ms | ready p50 ms | "
          "ready p99 ms | from host memory p50 ms | p99 ms | × faster than the store |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, r in rows.items():
        print(f"| {m} | {r['adapter_bytes']:,} | {r['redis_get_p50_ms']:.2f} | {r['load_validate_p50_ms']:.2f} | "
              f"{r['slot_write_p50_ms']:.2f} | {r['ready_p50_ms']:.2f} | {r['ready_p99_ms']:.2f} | "
              f"{r['host_tier_ready_p50_ms']:.2f} | {r['host_tier_ready_p99_ms']:.2f} | {r['store_over_host_tier']:.1f} |")
    print(json.dumps({"bench": "adapter_load", "base": base.name, "rank": args.rank, "n": args.n, "device": args.device, "results": rows}))


if __name__ == "__main__":
    main()
