"""Mixed-adapter batch throughput: prefill and decode step, as ratios to the base alone and to PEFT.

One batch of B rows, each with its own adapter (B distinct adapters), through svdserve's batched runner;
the baseline is the same runner with no adapters, measured in the same run, interleaved round by round so
machine noise hits every configuration alike. On the CPU the runner uses svdserve's kernels where they are
faster (`svd_adapters/cpu_kernels.py`), for the baseline too; a context row runs the base with plain torch
ops only, to show what the kernels change. PEFT's mixed-batch LoRA (`adapter_names`) at the same rank runs on
the HF model in the same rounds as svdserve's configurations (a machine that speeds up or slows down during the
run moves both alike); transformers' own forward without adapters is timed once before PEFT goes in (context).
Every configuration runs in the same dtype (--dtype; factors always come from the float32 weights).

    python bench/mixed_batch.py [--base default] [--batch 32] [--rank 16] [--prompt-len 64] [--device cpu] [--dtype bfloat16]

Prints a markdown table and a last line of JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store.disk import DiskStore  # noqa: E402
from adapters_store.format import adapter_to_bytes  # noqa: E402
from adapters_store.records import record_for  # noqa: E402
from svd_adapters import cpu_kernels, gpu_kernels  # noqa: E402
from svd_adapters.adapter import Adapter  # noqa: E402
from svd_adapters.adapter import random_adapter as make_random_adapter  # noqa: E402
from svd_adapters.base_model import load_base  # noqa: E402
from svd_adapters.factors import load_or_compute  # noqa: E402
from svd_adapters.methods import pool_of  # noqa: E402
from svd_adapters.runner import BatchedRunner  # noqa: E402


# Trained-looking deltas on the real base (the tiny model's defaults would swamp SmolLM2's outputs).
BENCH_NOISE = {"osora": 0.02, "loraxs": 0.05, "sorsa": 0.01, "lora": 0.01}


def random_adapter(method: str, rank: int, factors, name: str, seed: int) -> Adapter:
    return make_random_adapter(method, rank, factors, name, seed=seed, scale=BENCH_NOISE)


def stored_adapters(base, factors, n: int, id_prefix: str, seed: int) -> tuple[DiskStore, dict[str, str]]:
    """A new temp disk store holding n OSoRA / LoRA-XS r16 adapters (alternating, seeds seed + i) named
    {id_prefix}{i}, as the engine benchmarks serve them: (the store, adapter id → its sha256 version)."""
    store = DiskStore(tempfile.mkdtemp(prefix="svdserve-bench-"))
    versions = {}
    for i in range(n):
        a = random_adapter(("osora", "loraxs")[i % 2], 16, factors, base.name, seed=seed + i)
        blob = adapter_to_bytes(a)
        record = record_for(a, blob, f"{id_prefix}{i}")
        store.put(record, blob)
        versions[record.adapter_id] = record.sha256
    return store, versions


CLOCK = time.perf_counter


def timed(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def peft_model(base, rank: int, n: int, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(base.model, cfg, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg)
    model.eval()
    return model.to(dtype)


class HFTimer:
    """Prefill and one KV-cached decode step of an HF model (PEFT's included), timed like the runner."""

    def __init__(self, model, ids: torch.Tensor, step_ids: torch.Tensor, sync, **kw):
        self.model, self.ids, self.step_ids, self.sync, self.kw = model, ids, step_ids, sync, kw
        with torch.inference_mode():
            self.past = model(input_ids=ids, use_cache=True, **kw).past_key_values

    @torch.inference_mode()
    def prefill(self) -> float:
        return timed(lambda: (self.model(input_ids=self.ids, use_cache=False, **self.kw), self.sync()))

    @torch.inference_mode()
    def decode_round(self, steps: int) -> float:
        """Seconds per step over `steps` steps, each from the prompt's cache (cropped back untimed), so every
        timed step sees the same context."""
        total = 0.0
        for _ in range(steps):
            total += timed(lambda: (self.model(input_ids=self.step_ids, past_key_values=self.past, use_cache=True,
                                               **self.kw), self.sync()))
            self.past.crop(-1)
        return total / steps


def hf_throughput(timer: HFTimer, args) -> dict[str, float]:
    """Medians of a few rounds of one HF model on its own: the context row."""
    B, L = timer.ids.shape
    pt = [timer.prefill() for _ in range(args.prefill_reps)]
    dt = [timer.decode_round(args.steps_per_round) for _ in range(max(3, args.decode_reps // 2))]
    return {"prefill_tok_s": B * L / statistics.median(pt), "decode_tok_s": B / statistics.median(dt)}


def batch_args(ap: argparse.ArgumentParser) -> None:
    """The batch every mixed-batch measurement runs (this benchmark, bench/decode_profile.py)."""
    ap.add_argument("--base", default="default")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="GPU decode steps launched eagerly, not replayed")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="weights and activations of every configuration, PEFT's included")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    batch_args(ap)
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--decode-reps", type=int, default=6, help="rounds of decode steps per configuration")
    ap.add_argument("--steps-per-round", type=int, default=8)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: one torch thread timed by its own CPU time, robust when other jobs share the machine")
    args = ap.parse_args()
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.thread_time
        torch.set_num_threads(1)
    torch.manual_seed(0)
    B, r, L = args.batch, args.rank, args.prompt_len

    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    dtype = getattr(torch, args.dtype)
    base.model.to(args.device, dtype)  # after the factors: they are computed from (and fingerprint) the fp32 weights
    name = base.name
    mixes = {
        f"osora r{r}": ["osora"] * B,
        f"loraxs r{r}": ["loraxs"] * B,
        f"mix of all methods r{r}": [("osora", "loraxs", "sorsa", "lora")[i % 4] for i in range(B)],
    }
    # Each config gets its own slot range so all of them stay resident and can be interleaved.
    n_core = sum(pool_of(m) == "core" for methods in mixes.values() for m in methods)
    n_lr = sum(len(methods) for methods in mixes.values()) - n_core
    runner = BatchedRunner(base, factors, max_rank=r, max_batch=B, max_seq_len=L + args.decode_reps + 8,
                           core_slots=n_core + 1, lr_slots=n_lr + 1, cuda_graphs=not args.no_cuda_graphs)
    configs: dict[str, tuple[list[int], list[int]]] = {"base (no adapters)": ([0] * B, [0] * B)}
    # context: the same base with every op in plain torch (no svdserve CPU kernels), when the kernels are in use
    TORCH_ONLY = "base, torch ops only (no svdserve CPU kernels)"
    if args.device == "cpu" and cpu_kernels.available():
        configs[TORCH_ONLY] = ([0] * B, [0] * B)

    def kernels_for(c: str) -> None:
        cpu_kernels.force(False if c == TORCH_ONLY else None)  # None: as calibrated, like every other config
    next_core = next_lr = 1
    for cname, methods in mixes.items():
        adapters = [random_adapter(m, r, factors, name, seed=1000 * len(configs) + i) for i, m in enumerate(methods)]
        configs[cname] = runner.place(adapters, factors, next_core, next_lr)
        cores = sum(pool_of(m) == "core" for m in methods)
        next_core, next_lr = next_core + cores, next_lr + len(methods) - cores
    vocab = base.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (L,)).tolist() for _ in range(B)]
    rows = list(range(B))
    tokens = torch.randint(3, vocab, (B,), device=args.device)
    positions = torch.full((B,), L, device=args.device)

    prefill_t = {c: [] for c in configs}
    decode_t = {c: [] for c in configs}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    peft = hf_base = peft_timer = None
    if not args.no_peft:
        ids, step_ids = torch.tensor(prompts, device=args.device), tokens.view(B, 1)
        # transformers' own forward without adapters (context for PEFT's ratio), then PEFT wrapped around it
        # (the runner keeps its own copies of the weights PEFT wraps, so it is unaffected)
        hf_base = hf_throughput(HFTimer(base.model, ids, step_ids, sync), args)
        names = [f"a{i}" for i in range(B)]
        peft_timer = HFTimer(peft_model(base, r, B, dtype), ids, step_ids, sync, adapter_names=names)
        peft_t: dict[str, list[float]] = {"prefill": [], "decode": []}
    for c, (cs, ls) in configs.items():  # warm-up
        kernels_for(c)
        runner.prefill(prompts, rows, cs, ls)
        runner.decode(tokens, positions, runner.mapping(cs, ls))
    for _ in range(args.prefill_reps):
        for c, (cs, ls) in configs.items():
            kernels_for(c)
            prefill_t[c].append(timed(lambda: (runner.prefill(prompts, rows, cs, ls), sync())))
        if peft_timer:
            cpu_kernels.force(None)
            peft_t["prefill"].append(peft_timer.prefill())
    for _ in range(args.decode_reps):
        for c, (cs, ls) in configs.items():
            kernels_for(c)
            # A run of consecutive steps with the same batch, as in serving; its first step also refreshes every
            # row's adapter buffers (all 32 rows change when the configuration switches: the worst case).
            t0 = CLOCK()
            for _ in range(args.steps_per_round):
                mp = runner.mapping(cs, ls)  # built once per step, as the engine does
                runner.decode(tokens, positions, mp, context=L + 1)
            sync()
            decode_t[c].append((CLOCK() - t0) / args.steps_per_round)
        if peft_timer:
            cpu_kernels.force(None)
            peft_t["decode"].append(peft_timer.decode_round(args.steps_per_round))

    cpu_kernels.force(None)
    results = {}
    for c in configs:
        p, d = statistics.median(prefill_t[c]), statistics.median(decode_t[c])
        results[c] = {"prefill_tok_s": B * L / p, "decode_tok_s": B / d, "prefill_s": p, "decode_step_s": d,
                      "prefill_best_s": min(prefill_t[c]), "decode_step_best_s": min(decode_t[c]),
                      # round by round against the base's time in the same round: drift that slows a whole
                      # round (another tenant's burst) cancels out
                      "prefill_x_base_paired": statistics.median(
                          b / t for b, t in zip(prefill_t["base (no adapters)"], prefill_t[c])),
                      "decode_x_base_paired": statistics.median(
                          b / t for b, t in zip(decode_t["base (no adapters)"], decode_t[c]))}
    if peft_timer:
        peft = {"prefill_tok_s": B * L / statistics.median(peft_t["prefill"]),
                "decode_tok_s": B / statistics.median(peft_t["decode"])}

    base_r = results["base (no adapters)"]
    graphs_note = "" if args.device == "cpu" else (" (decode: eager" if args.no_cuda_graphs else " (decode: CUDA graphs")
    if graphs_note:
        graphs_note += ", GEMM and core delta in one kernel)" if gpu_kernels.fused_decode() else ")"
    print(f"\nMixed-adapter batch: {name}, batch {B} rows with {B} distinct adapters, rank {r}, prompt {L} tokens, "
          f"device {args.device}{graphs_note}, {args.dtype}, clock {args.clock}, {torch.get_num_threads()} threads, "
          f"CPU kernels: {cpu_kernels.summary() if args.device == 'cpu' else 'n/a'}\n")
    # "× base" compares medians; "paired" is the median over rounds of the base's time over the configuration's in
    # the same round; "best" compares each configuration's fastest round with the base's: on a shared host, noise
    # only ever adds time, so the best rounds are the least disturbed estimate of the real cost.
    print("| configuration | prefill tok/s | × base | × base, paired | × base, best | × PEFT | decode tok/s | × base "
          "| × base, paired | × base, best | × PEFT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    def x(r: float | None) -> str:
        return "n/a" if r is None else f"{r:.2f}"

    table = {}
    for c, v in results.items():
        pr, dr = v["prefill_tok_s"] / base_r["prefill_tok_s"], v["decode_tok_s"] / base_r["decode_tok_s"]
        pb, db = base_r["prefill_best_s"] / v["prefill_best_s"], base_r["decode_step_best_s"] / v["decode_step_best_s"]
        pp = v["prefill_tok_s"] / peft["prefill_tok_s"] if peft else None  # --no-peft: null in the JSON
        dp = v["decode_tok_s"] / peft["decode_tok_s"] if peft else None
        table[c] = {**v, "prefill_x_base": pr, "decode_x_base": dr, "prefill_x_base_best": pb, "decode_x_base_best": db,
                    "prefill_x_peft": pp, "decode_x_peft": dp}
        print(f"| {c} | {v['prefill_tok_s']:.0f} | {pr:.3f} | {v['prefill_x_base_paired']:.3f} | {pb:.3f} | {x(pp)} "
              f"| {v['decode_tok_s']:.1f} | {dr:.3f} | {v['decode_x_base_paired']:.3f} | {db:.3f} | {x(dp)} |")
    for label, hf in (("HF transformers base (no adapters)", hf_base), (f"PEFT mixed-batch LoRA r{r} (adapter_names)", peft)):
        if hf:
            print(f"| {label} | {hf['prefill_tok_s']:.0f} | {hf['prefill_tok_s'] / base_r['prefill_tok_s']:.3f} | | | "
                  f"{hf['prefill_tok_s'] / peft['prefill_tok_s']:.2f} | {hf['decode_tok_s']:.1f} "
                  f"| {hf['decode_tok_s'] / base_r['decode_tok_s']:.3f} | | | {hf['decode_tok_s'] / peft['decode_tok_s']:.2f} |")
    print(json.dumps({"bench": "mixed_batch", "base": name, "batch": B, "rank": r, "prompt_len": L, "device": args.device, "cuda_graphs": args.device != "cpu" and not args.no_cuda_graphs, "gpu_fused_decode": args.device != "cpu" and gpu_kernels.fused_decode(), "dtype": args.dtype, "clock": args.clock,
                      "threads": torch.get_num_threads(), "cpu_kernels": cpu_kernels.summary() if args.device == "cpu" else None,
                      "results": table, "peft": peft, "hf_base": hf_base}))


if __name__ == "__main__":
    main()
