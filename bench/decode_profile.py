"""Where a decode step's time goes, per configuration: wall time, operator calls and (on a GPU) kernel launches
and kernel time per step, from torch.profiler. A diagnostic for the mixed-batch benchmark, not a target.

    python bench/decode_profile.py [--base default] [--batch 32] [--rank 16] [--device cuda] [--dtype float32]

Prints a markdown table, each configuration's top operators, and a last line of JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mixed_batch import batch_args, random_adapter  # noqa: E402
from svd_adapters.base_model import load_base  # noqa: E402
from svd_adapters.factors import load_or_compute  # noqa: E402
from svd_adapters.runner import BatchedRunner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    batch_args(ap)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    B, r, L = args.batch, args.rank, args.prompt_len
    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    base.model.to(args.device, getattr(torch, args.dtype))
    runner = BatchedRunner(base, factors, max_rank=r, max_batch=B, max_seq_len=L + 2 * args.steps + 8,
                           core_slots=2 * B + 1, lr_slots=2, cuda_graphs=not args.no_cuda_graphs)
    configs = {"base": [0] * B}
    for i, method in enumerate(("loraxs", "osora")):
        adapters = [random_adapter(method, r, factors, base.name, seed=100 * i + j) for j in range(B)]
        configs[method] = runner.place(adapters, factors, first_core_slot=1 + i * B)[0]
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    vocab = base.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (L,)).tolist() for _ in range(B)]
    tokens = torch.randint(3, vocab, (B,), device=args.device)
    positions = torch.full((B,), L, device=args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows, tops = {}, {}
    for name, cs in configs.items():
        lr = [0] * B
        runner.prefill(prompts, list(range(B)), cs, lr)
        for _ in range(3):  # warm-up, and the row buffers refreshed for this configuration
            runner.decode(tokens, positions, runner.mapping(cs, lr), context=L + 1)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            runner.decode(tokens, positions, runner.mapping(cs, lr), context=L + 1)
        sync()
        wall = (time.perf_counter() - t0) / args.steps
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                runner.decode(tokens, positions, runner.mapping(cs, lr), context=L + 1)
            sync()
        events = prof.key_averages()
        ops = sum(e.count for e in events if e.key.startswith("aten::") and not e.is_legacy)
        kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        n_kernels = sum(e.count for e in kernels)
        kernel_us = sum(e.self_device_time_total for e in kernels)
        rows[name] = {"wall_ms": 1e3 * wall, "aten_ops": ops / args.steps, "kernels": n_kernels / args.steps,
                      "kernel_ms": kernel_us / 1e3 / args.steps}
        # the same for one prefill of the batch's prompts
        sync()
        t0 = time.perf_counter()
        runner.prefill(prompts, list(range(B)), cs, lr)
        sync()
        pwall = time.perf_counter() - t0
        with profile(activities=activities) as prof:
            runner.prefill(prompts, list(range(B)), cs, lr)
            sync()
        pk = [e for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        rows[name].update({"prefill_wall_ms": 1e3 * pwall, "prefill_kernels": sum(e.count for e in pk),
                           "prefill_kernel_ms": sum(e.self_device_time_total for e in pk) / 1e3})
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        tops[name] = events.table(sort_by=sort, row_limit=12)
    print(f"\nDecode step profile: {base.name}, batch {B}, rank {r}, device {args.device}, {args.dtype}\n")
    print("| configuration | wall ms/step | × base | aten ops/step | kernels/step | kernel ms/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, v in rows.items():
        print(f"| {name} | {v['wall_ms']:.2f} | {rows['base']['wall_ms'] / v['wall_ms']:.3f} | {v['aten_ops']:.0f} | "
              f"{v['kernels']:.0f} | {v['kernel_ms']:.3f} |")
    print("\n| configuration | prefill wall ms | × base | kernels | kernel ms |\n|---|---:|---:|---:|---:|")
    for name, v in rows.items():
        print(f"| {name} | {v['prefill_wall_ms']:.2f} | {rows['base']['prefill_wall_ms'] / v['prefill_wall_ms']:.3f} | "
              f"{v['prefill_kernels']:.0f} | {v['prefill_kernel_ms']:.3f} |")
    for name, t in tops.items():
        print(f"\n### {name}\n{t}")
    print(json.dumps({"bench": "decode_profile", "base": base.name, "batch": B, "rank": r, "device": args.device,
                      "dtype": args.dtype, "results": rows}))


if __name__ == "__main__":
    main()
