"""The low-rank rows' share of a mixed decode step against the memory floor: a diagnostic behind
`csrc/lowrank_delta.cpp`'s decode path, not a target.

    python bench/lowrank_decode.py [--base default] [--batch 32] [--rank 16] [--reps 12] [--against GIT_REV]

The mixed-batch benchmark's "mix of all methods" (OSoRA, LoRA-XS, SORSA, LoRA in turn, every row its own
adapter) runs one real decode step with every `lowrank_delta` call recorded (4 groups × the layers, real slot
pools); the calls are then replayed alone, each round after a 256 MB write that leaves nothing of them in any
cache, as in a real step, where the step's weight GEMMs stream between them. Beside them, in the same rounds: torch's
own sums over strided views of exactly the bytes those calls read (the A and Bᵀ rows of the filled ranks: each
SORSA/LoRA row streams its whole adapter, ~20 MB for SmolLM2 at rank 16, every step), and a sum over as many
contiguous bytes. When the kernel's time is near the strided sums', the low-rank rows cost what reading their
adapters costs on this host, and only fewer bytes (not a faster loop) would move it. (`prefill_kernels.py --tokens
1` times the same calls on random pools, whose smaller groups stay in L3 between rounds: faster than a real step.)
With `--against`, the calls also go through that git revision's kernel (built as `prefill_kernels.py --against`
builds it), alternated with this tree's in every round.

Prints a markdown table and a last line of JSON.
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

from bench.mixed_batch import batch_args, random_adapter  # noqa: E402
from bench.prefill_kernels import build_revision  # noqa: E402
from svd_adapters import cpu_kernels  # noqa: E402
from svd_adapters.base_model import load_base  # noqa: E402
from svd_adapters.factors import load_or_compute  # noqa: E402
from svd_adapters.runner import BatchedRunner  # noqa: E402


def record_calls(runner: BatchedRunner, tokens: torch.Tensor, positions: torch.Tensor, mp, context: int) -> list:
    """One decode step's lowrank_delta calls, as (args, kwargs)."""
    calls, real = [], cpu_kernels.lowrank_delta

    def record(*a, **k):
        calls.append((a, k))
        real(*a, **k)

    cpu_kernels.lowrank_delta = record
    try:
        runner.decode(tokens, positions, mp, context=context)
    finally:
        cpu_kernels.lowrank_delta = real
    return calls


def read_views(runner: BatchedRunner, first: int, end: int, rank: int) -> list[torch.Tensor]:
    """Strided views of the bytes the step's calls read, one per pool (all layers): the A and Bᵀ rows of the
    filled rank of low-rank slots [first, end) (few views: torch's per-op cost stays out of the comparison)."""
    views = []
    for p in runner.pools.values():
        A = p.A[:, first:end]
        views.append(A.reshape(*A.shape[:2], p.k, p.K, A.shape[-1])[:, :, :, :rank])
        views += [Bt[:, first:end, :rank] for Bt in p.Bt]
    return views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    batch_args(ap)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--against", metavar="GIT_REV", help="also replay the calls through this revision's kernel, alternated")
    args = ap.parse_args()
    if args.device != "cpu" or not cpu_kernels.available():
        sys.exit("this diagnostic times the CPU kernel: run it on the CPU, with the kernels built")
    torch.manual_seed(0)
    B, r, L = args.batch, args.rank, args.prompt_len
    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    runner = BatchedRunner(base, factors, max_rank=r, max_batch=B, max_seq_len=L + 8, core_slots=B + 1,
                           lr_slots=B + 1, cuda_graphs=False)
    methods = [("osora", "loraxs", "sorsa", "lora")[i % 4] for i in range(B)]
    adapters = [random_adapter(m, r, factors, base.name, seed=i) for i, m in enumerate(methods)]
    cs, ls = runner.place(adapters, factors, 1, 1)
    vocab = base.model.config.vocab_size
    runner.prefill([torch.randint(3, vocab, (L,)).tolist() for _ in range(B)], list(range(B)), cs, ls)
    calls = record_calls(runner, torch.randint(3, vocab, (B,)), torch.full((B,), L), runner.mapping(cs, ls), L + 1)
    lr = sorted(s for s in ls if s)
    assert lr == list(range(1, len(lr) + 1)), "the low-rank rows' slots are 1..n (runner.place from 1)"
    views = read_views(runner, 1, len(lr) + 1, r)
    nbytes = sum(v.numel() * v.element_size() for v in views)
    assert nbytes == sum(a[6][s] * (a[2].shape[-1] * len(a[3]) + sum(Bt.shape[-1] for Bt in a[3])) * 4
                         for a, _ in calls for s in a[5].tolist() if s), "the views cover what the calls read"
    contiguous = torch.empty(nbytes // 4)
    contiguous.fill_(1.0)
    flush = torch.empty(64 << 20)  # 256 MB written before every timed pass

    def kernel(ops=torch.ops.svdserve) -> None:
        for a, k in calls:
            ops.lowrank_delta(*a, **k)

    def strided_sums() -> None:
        for v in views:
            v.sum()

    paths = {"lowrank_delta calls (the kernel)": kernel, "torch sums over the same bytes (strided views)": strided_sums,
             "torch sum over as many contiguous bytes": lambda: contiguous.sum()}
    if args.against:  # the same calls through that revision's kernel, in the same rounds
        build_revision(args.against)
        paths[f"lowrank_delta calls, {args.against}'s kernel"] = lambda: kernel(torch.ops.svdserve_rev)
    threads = sorted({1, torch.get_num_threads()})
    times: dict[tuple[str, int], list[float]] = {(p, t): [] for p in paths for t in threads}
    full = torch.get_num_threads()
    for rep in range(args.reps + 1):  # the first round warms threads and page tables, untimed
        for t in threads:
            torch.set_num_threads(t)
            for name, fn in paths.items():
                flush.fill_(rep)
                t0 = time.perf_counter()
                fn()
                if rep:
                    times[(name, t)].append(time.perf_counter() - t0)
    torch.set_num_threads(full)
    n_lr = len(lr)
    print(f"\nLow-rank delta of one decode step from memory: {base.name}, {B} rows ({n_lr} SORSA/LoRA), rank {r}, "
          f"{len(calls)} calls, {nbytes / 1e6:.0f} MB of adapter rows read; medians of {args.reps} rounds\n")
    print("| path | " + " | ".join(f"{t} thread{'s' * (t > 1)} ms | GB/s" for t in threads) + " |")
    print("|---|" + "---:|---:|" * len(threads))
    results = {}
    for name in paths:
        row = []
        for t in threads:
            ms = 1e3 * statistics.median(times[(name, t)])
            results[f"{name} / {t} threads"] = {"ms": ms, "gb_s": nbytes / ms / 1e6}
            row.append(f"{ms:.2f} | {nbytes / ms / 1e6:.1f}")
        print(f"| {name} | " + " | ".join(row) + " |")
    print(json.dumps({"bench": "lowrank_decode", "base": base.name, "rows": B, "lowrank_rows": n_lr, "rank": r,
                      "calls": len(calls), "bytes": nbytes, "against": args.against, "results": results}))


if __name__ == "__main__":
    main()
