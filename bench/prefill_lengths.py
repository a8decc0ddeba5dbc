"""Prefill of prompts of different lengths: one padded call against the engine's split into calls by length.

    python bench/prefill_lengths.py [--base default] [--reps 5] [--call-tokens N] [--device cpu]

A step's admitted prompts are prefilled together, padded to the longest. The engine splits them into calls of
similar length where a call's fixed cost (`service/prefill_groups.py`) is less than the padding saved. Each
scenario is one engine step's prompts within its budget of 4096 padded tokens (`EngineConfig.max_prefill_tokens`),
every row with its own adapter (OSoRA and LoRA-XS r16 alternately, as served). Per scenario, alternated round by
round: the prompts as one padded call (the engine's behaviour before the split, the baseline) and as the planned
calls; the table gives real prompt tokens per second for both, their ratio, the tokens each computes, and the
largest difference between the two ways' last-token logits (the same numbers up to float rounding). It also
times prefills of 1 × 4 and 1 × 256 tokens: a call's fixed cost in tokens' worth, what `--call-tokens` should be.

Prints a markdown table and a last line of JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mixed_batch import random_adapter  # noqa: E402
from service import prefill_groups  # noqa: E402
from svd_adapters.base_model import load_base  # noqa: E402
from svd_adapters.factors import load_or_compute  # noqa: E402
from svd_adapters.runner import BatchedRunner  # noqa: E402


def scenarios() -> dict[str, list[int]]:
    rng = random.Random(0)
    return {
        "equal lengths (32 × 64)": [64] * 32,
        "one long among short (1 × 256, 15 × 16)": [256] + [16] * 15,
        "two clusters (8 × 24, 8 × 200)": [24, 200] * 8,
        "log-uniform 8–256 (16 prompts)": [round(8 * 32 ** rng.random()) for _ in range(16)],
        "chat-like 40–120 (32 prompts)": [rng.randint(40, 120) for _ in range(32)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--call-tokens", type=int, default=None, help="a call's fixed cost in tokens (default: the device's)")
    args = ap.parse_args()
    torch.manual_seed(0)
    call_cost = args.call_tokens if args.call_tokens is not None else prefill_groups.call_tokens(args.device)
    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    base.model.to(args.device)
    runner = BatchedRunner(base, factors, max_rank=16, max_batch=32, max_seq_len=264, core_slots=33, lr_slots=2,
                           cuda_graphs=False)
    adapters = [random_adapter(("osora", "loraxs")[i % 2], 16, factors, base.name, seed=i) for i in range(32)]
    slots, _ = runner.place(adapters, factors)
    vocab = base.model.config.vocab_size
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(fn) -> tuple[float, torch.Tensor]:
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out

    # a call's fixed cost: a tiny prefill against a large one's time per token
    fixed = {L: [] for L in (4, 256)}
    for rep in range(args.reps + 1):
        for L in fixed:
            t, _ = timed(lambda: runner.prefill([list(range(3, 3 + L))], [0], [0], [0]))
            if rep:
                fixed[L].append(t)
    t4, t256 = statistics.median(fixed[4]), statistics.median(fixed[256])
    measured_call_tokens = t4 / (t256 / 256)

    rows_out, results = [], {}
    for name, lengths in scenarios().items():
        P = len(lengths)
        prompts = [torch.randint(3, vocab, (n,)).tolist() for n in lengths]
        cs, ls, rows = slots[:P], [0] * P, list(range(P))
        groups = prefill_groups.plan(lengths, call_cost)

        def padded() -> torch.Tensor:
            return runner.prefill(prompts, rows, cs, ls)

        def planned() -> torch.Tensor:
            parts = [runner.prefill([prompts[i] for i in g], [rows[i] for i in g], [cs[i] for i in g],
                                    [ls[i] for i in g]) for g in groups]
            out = parts[0].new_empty(P, parts[0].shape[1])
            for g, part in zip(groups, parts):
                out[torch.tensor(g, device=out.device)] = part
            return out

        times = {"padded": [], "planned": []}
        outs = {}
        for rep in range(args.reps + 1):  # the first round warms up, untimed
            for way, fn in (("padded", padded), ("planned", planned)):
                t, outs[way] = timed(fn)
                if rep:
                    times[way].append(t)
        real = sum(lengths)
        tp, tg = statistics.median(times["padded"]), statistics.median(times["planned"])
        paired = statistics.median(a / b for a, b in zip(times["padded"], times["planned"]))
        diff = float((outs["padded"] - outs["planned"]).abs().max())
        computed_padded = prefill_groups.computed_tokens(lengths, [list(range(P))])
        computed_planned = prefill_groups.computed_tokens(lengths, groups)
        results[name] = {"lengths": lengths, "groups": groups, "real_tokens": real, "padded_tokens": computed_padded,
                         "planned_tokens": computed_planned, "padded_s": tp, "planned_s": tg,
                         "padded_tok_s": real / tp, "planned_tok_s": real / tg, "x_padded": tp / tg,
                         "x_padded_paired": paired, "max_abs_logit_diff": diff}
        rows_out.append(f"| {name} | {real} | {computed_padded} | {len(groups)}: {computed_planned} | {real / tp:.0f} "
                        f"| {real / tg:.0f} | **{tp / tg:.2f}** | {paired:.2f} | {diff:.1e} |")

    print(f"\nPrefill of prompts of different lengths: {base.name}, device {args.device}, {torch.get_num_threads()} "
          f"threads, OSoRA / LoRA-XS r16 rows, medians of {args.reps} alternated rounds; a call's fixed cost "
          f"{call_cost} tokens (measured here: a 1 × 4 prefill {t4 * 1e3:.1f} ms, a 1 × 256 one {t256 * 1e3:.1f} ms: "
          f"{measured_call_tokens:.0f} tokens' worth)\n")
    print("| prompts | real tokens | padded: tokens computed | planned: calls: tokens computed | padded tok/s "
          "| planned tok/s | × padded | × padded, paired | max abs logit diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows_out))
    print(json.dumps({"bench": "prefill_lengths", "base": base.name, "device": args.device,
                      "threads": torch.get_num_threads(), "call_tokens": call_cost,
                      "measured_call_tokens": measured_call_tokens, "results": results}))


if __name__ == "__main__":
    main()
