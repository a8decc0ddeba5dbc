"""Compare the four adapter methods at one rank on one built-in task: params, bytes, exact match, train time.

    python bench/methods.py --task sentiment --rank 16 --steps 60 --threads 1

Prints a markdown table and, as the last line of stdout, one JSON object with the same rows.
The base model's exact match ("before") is measured once: every method starts from the same base.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from adapters_store.format import save_adapter  # noqa: E402
from svd_adapters.base_model import load_base  # noqa: E402
from svd_adapters.factors import load_or_compute  # noqa: E402
from svd_adapters.log import get_logger  # noqa: E402
from training.evaluate import evaluate_adapter  # noqa: E402
from training.tasks import GENERATORS, make_task  # noqa: E402
from training.trainer import DEFAULT_LR, TrainConfig, train_adapter  # noqa: E402

log = get_logger("bench.methods")
METHODS = ["osora", "loraxs", "sorsa", "lora"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="default")
    ap.add_argument("--task", default="sentiment", choices=list(GENERATORS))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    base.model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    task = make_task(args.task)
    test = task.test[: args.eval_limit]
    before = evaluate_adapter(base.model, base.tokenizer, factors, None, test).exact_match
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            cfg = TrainConfig(method=method, rank=args.rank, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
            res = train_adapter(base, factors, task.train, cfg)
            nbytes = save_adapter(res.adapter, str(Path(tmp) / f"{method}.safetensors"))
            t0 = time.perf_counter()
            after = evaluate_adapter(base.model, base.tokenizer, factors, res.adapter, test).exact_match
            rows.append({
                "method": method, "rank": args.rank, "lr": cfg.peak_lr,
                "trainable_params": res.adapter.trainable_params(), "adapter_bytes": nbytes,
                "exact_match_before": before, "exact_match_after": after,
                "train_loss_first": round(res.losses[0], 4), "train_loss_last": round(sum(res.losses[-10:]) / len(res.losses[-10:]), 4),
                "train_seconds": round(res.seconds, 1), "train_cpu_seconds": round(res.cpu_seconds, 1),
                "eval_seconds": round(time.perf_counter() - t0, 1),
            })
            log.info("%s", rows[-1])

    print(f"\nTask `{args.task}` ({len(task.train)} train / {len(test)} held-out), base {base.name}, "
          f"{args.steps} steps × batch {args.batch_size}, threads {torch.get_num_threads()}\n")
    print("| method | rank | lr | trainable params | adapter bytes | exact match before | after | train s (CPU s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['rank']} | {r['lr']:g} | {r['trainable_params']:,} | {r['adapter_bytes']:,} | "
              f"{r['exact_match_before']:.0%} | {r['exact_match_after']:.0%} | {r['train_seconds']:.0f} ({r['train_cpu_seconds']:.0f}) |")
    print(json.dumps({"base": base.name, "task": args.task, "steps": args.steps, "batch_size": args.batch_size,
                      "threads": torch.get_num_threads(), "default_lr": DEFAULT_LR, "rows": rows}))


if __name__ == "__main__":
    main()
