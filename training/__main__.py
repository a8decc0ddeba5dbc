"""`python -m training {train,eval,tasks,merge,combine}`: the trainer CLI. Progress and logs go to stderr; for `train`
and `eval` the last line of stdout is one JSON object, so scripts can `tail -n1 | jq`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from svd_adapters.log import get_logger
from svd_adapters.merge import SIGN_METHODS, STRATEGIES
from svd_adapters.methods import METHODS
from training.data import DataError, Example, load_jsonl, split_holdout
from training.plots import loss_curve_path, save_loss_curve
from training.tasks import GENERATORS, make_task
from training.trainer import DEFAULT_LR, TrainConfig, train_adapter
from training.upload import UploadError, upload_adapter

log = get_logger("training")


def _examples(args: argparse.Namespace) -> tuple[list[Example], list[Example], str]:
    """(train, test, source) from --task or --data [--eval-data]."""
    if args.task:
        task = make_task(args.task, seed=args.task_seed)
        return task.train, task.test, f"task:{args.task}"
    data = load_jsonl(args.data)
    if getattr(args, "all_data", False):  # eval: the whole file is the test set
        return [], data, str(args.data)
    if getattr(args, "eval_data", None):
        return data, load_jsonl(args.eval_data), str(args.data)
    train, test = split_holdout(data, args.holdout, args.seed)
    return train, test, str(args.data)


def _limit(test: list[Example], limit: int | None) -> list[Example]:
    return test[:limit] if limit else test


def _load(args: argparse.Namespace):
    # Imported late so `tasks` and `--help` stay instant.
    import torch

    from svd_adapters.base_model import load_base
    from svd_adapters.factors import load_or_compute

    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)  # on the CPU, before any move: SVD is a CPU job
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base.model.to(device)
    return base, factors


def _eval(base, factors, adapter, test, args) -> float:
    from training.evaluate import evaluate_adapter

    res = evaluate_adapter(base.model, base.tokenizer, factors, adapter, test, args.eval_batch_size, not args.quiet)
    for prompt, want, got in res.samples:
        log.info("sample: %r → %r (expected %r)", prompt, got, want)
    return res.exact_match


def cmd_train(args: argparse.Namespace) -> dict:
    from adapters_store.format import save_adapter

    t0 = time.perf_counter()
    train, test, source = _examples(args)
    test = _limit(test, args.eval_limit)
    base, factors = _load(args)
    cfg = TrainConfig(
        method=args.method, rank=args.rank, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        alpha=args.alpha, seed=args.seed, weight_decay=args.weight_decay, max_len=args.max_len,
    )
    before = None if args.skip_eval_before else _eval(base, factors, None, test, args)
    result = train_adapter(base, factors, train, cfg, progress=not args.quiet)
    nbytes = save_adapter(result.adapter, args.out)
    after = _eval(base, factors, result.adapter, test, args)
    curve = save_loss_curve(result.losses, loss_curve_path(args.out), f"{cfg.method} r{cfg.rank} on {source}")
    uploaded = None
    if args.upload:
        uploaded = upload_adapter(args.upload, args.out, api_key=args.api_key, adapter_id=args.adapter_id)
        log.info("uploaded to %s as adapter %r", args.upload, uploaded["adapter_id"])
    tail = result.losses[-10:]  # last loss smoothed over ≤10 steps; the first is the untrained loss
    return {
        "method": cfg.method,
        "rank": cfg.rank,
        "alpha": result.adapter.alpha,
        "lr": cfg.peak_lr,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "base": base.name,
        "data": source,
        "n_train": len(train),
        "n_eval": len(test),
        "trainable_params": result.adapter.trainable_params(),
        "adapter_bytes": nbytes,
        "train_loss_first": round(result.losses[0], 4),
        "train_loss_last": round(sum(tail) / len(tail), 4),
        "eval_exact_match_before": before,
        "eval_exact_match_after": after,
        "seconds": round(result.seconds, 1),
        "cpu_seconds": round(result.cpu_seconds, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "out": str(args.out),
        "loss_curve": str(curve),
        "uploaded": uploaded,
    }


def cmd_merge(args: argparse.Namespace) -> dict:
    from training.merge import merge_to_dir

    out = merge_to_dir(args.adapter, args.base, args.out)
    return {"adapter": str(args.adapter), "base": args.base, "out": str(out)}


def cmd_combine(args: argparse.Namespace) -> dict:
    from svd_adapters.merge import MergeOptions
    from training.combine import combine_files

    if args.weights is not None and len(args.weights) != len(args.adapter):
        raise ValueError(f"{len(args.weights)} --weights for {len(args.adapter)} --adapter files; give one per adapter")
    options = MergeOptions(args.strategy, args.density, args.majority_sign_method)
    return combine_files(args.adapter, args.weights, options, args.base, args.out, seed=args.seed)


def cmd_eval(args: argparse.Namespace) -> dict:
    from adapters_store.validate import load_adapter

    t0 = time.perf_counter()
    _, test, source = _examples(args)
    test = _limit(test, args.eval_limit)
    base, factors = _load(args)
    adapter = None
    if args.adapter != "none":
        # Full validation (the same as the server's upload path): a foreign or corrupt file gets a clear error.
        try:
            adapter = load_adapter(Path(args.adapter).read_bytes(), factors, base.name)
        except ValueError as e:
            raise ValueError(f"{args.adapter}: {e}") from None
    em = _eval(base, factors, adapter, test, args)
    print(f"exact match: {em:.3f} on {len(test)} examples ({source})")
    return {
        "adapter": args.adapter,
        "method": adapter.method if adapter else None,
        "base": base.name,
        "data": source,
        "n_eval": len(test),
        "exact_match": em,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def cmd_tasks(args: argparse.Namespace) -> None:
    for name, (description, _) in GENERATORS.items():
        task = make_task(name, seed=args.task_seed)
        ex = task.test[0]
        print(f"{name:10s} {description}  ({len(task.train)} train / {len(task.test)} test)")
        print(f"{'':10s} e.g. {ex.chat()[-1]['content']!r} → {ex.completion!r}")


def _add_source(p: argparse.ArgumentParser, eval_data: bool) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="JSONL: {prompt, completion} or {messages} per line")
    src.add_argument("--task", choices=list(GENERATORS), help="a built-in demo task (see `tasks`)")
    if eval_data:
        p.add_argument("--eval-data", type=Path, help="held-out JSONL (default: split off --holdout of --data)")
    p.add_argument("--holdout", type=float, default=0.1, help="held-out fraction of --data without --eval-data")
    p.add_argument("--task-seed", type=int, default=0, help="seed the built-in task is generated from")
    p.add_argument("--base", default="default", help="'default' (SmolLM2-135M-Instruct), 'tiny', or an HF model dir")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most this many held-out examples")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's choice). On a shared CPU use 1: oversubscribed OpenMP threads "
        "spin against each other and a step can get 10x slower",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train an adapter and save it")
    tr.add_argument("--method", required=True, choices=sorted(METHODS))
    tr.add_argument("--rank", type=int, default=16)
    _add_source(tr, eval_data=True)
    tr.add_argument("--out", type=Path, required=True, help="adapter file to write (.safetensors)")
    tr.add_argument("--steps", type=int, default=60)
    tr.add_argument("--lr", type=float, default=None, help=f"peak lr (default per method: {DEFAULT_LR})")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--alpha", type=float, default=None, help="scale numerator (default: rank)")
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--max-len", type=int, default=256, help="truncate prompts (from the left) beyond this")
    tr.add_argument("--skip-eval-before", action="store_true", help="do not evaluate the base model first")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument("--upload", metavar="URL", default=None, help="after training, upload the adapter to this svdserve (e.g. http://127.0.0.1:8000)")
    tr.add_argument("--api-key", default=None, help="API key for --upload when the server runs with auth on")
    tr.add_argument("--adapter-id", default=None, help="adapter id for --upload (default: the server picks one)")

    mg = sub.add_parser("merge", help="export an adapter merged into its base as a plain HF model directory")
    mg.add_argument("--adapter", type=Path, required=True, help="adapter file (.safetensors)")
    mg.add_argument("--base", default="default", help="'default', 'tiny', or an HF model dir (the adapter's base)")
    mg.add_argument("--out", type=Path, required=True, help="directory to write (config, safetensors, tokenizer)")

    cb = sub.add_parser("combine", help="merge several adapters into one adapter file (what merged_adapters serves)")
    cb.add_argument("--adapter", type=Path, action="append", required=True,
                    help="an adapter file (.safetensors); give --adapter once per adapter")
    cb.add_argument("--weights", type=float, nargs="+", default=None, help="one per adapter (default 1 each)")
    cb.add_argument("--strategy", default="linear", choices=STRATEGIES,
                    help="linear: exactly Σ wᵢ ΔWᵢ, any methods and ranks (a LoRA file unless all are LoRA-XS of one "
                    "rank); ties / dare_*: entry by entry on the parameters, one method at one rank")
    cb.add_argument("--density", type=float, default=1.0, help="ties / dare: the fraction of each change kept")
    cb.add_argument("--majority-sign-method", default="total", choices=SIGN_METHODS)
    cb.add_argument("--seed", type=int, default=None, help="DARE's drop seed (default: from the input files)")
    cb.add_argument("--base", default="default", help="'default', 'tiny', or an HF model dir (the adapters' base)")
    cb.add_argument("--out", type=Path, required=True, help="adapter file to write (.safetensors)")

    ev = sub.add_parser("eval", help="exact match of an adapter (or 'none') on held-out data")
    ev.add_argument("--adapter", required=True, help="adapter file, or 'none' for the base model")
    _add_source(ev, eval_data=False)
    ev.add_argument("--seed", type=int, default=0, help="seed of the held-out split of --data (as in train)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument("--all-data", action="store_true", help="evaluate on every line of --data, not its held-out split")

    ts = sub.add_parser("tasks", help="list the built-in demo tasks")
    ts.add_argument("--task-seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.steps < 1:
        parser.error("--steps must be at least 1")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.command == "tasks":
            cmd_tasks(args)
            return 0
        out = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "combine": cmd_combine}[args.command](args)
    except (DataError, FileNotFoundError, ValueError, UploadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
