"""A decode step's group GEMMs with and without their core delta, by kernel path: the diagnostic behind
`core_linear` (`svd_adapters/csrc/core_linear.cpp`), not a target.

    python bench/decode_kernels.py [--rows 32] [--rank 16] [--layers 30] [--reps 25] [--clock cpu]

SmolLM2-135M's four groups per layer (qkv, o, gate/up, down; random weights of the real shapes) for `--layers`
layers, so weights stream through the caches as in a real step; each row reads its cores (and, for OSoRA, its
output scales; OSoRA's diagonal cores as their diagonals, as the runner's pools give them) from its own slot
of a pool; "mix" is the mixed batch's rows (a quarter each OSoRA and LoRA-XS, half SORSA and LoRA, which read no
core adapter). Per step, alternated round by round: the bare GEMMs
(`skinny_linear` over [W; V_rᵀ]); the GEMMs then the core delta as a second call (`core_delta`, the path before
`core_linear`); and both in one call (`core_linear`). The delta's cost is each path's time minus the bare GEMMs'
in the same round (median over rounds). Prints a markdown table and a last line of JSON.
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

from svd_adapters import cpu_kernels  # noqa: E402

# (member widths, input width) of SmolLM2-135M's groups
GROUPS = {"qkv": ([576, 192, 192], 576), "o": ([576], 576), "gate_up": ([1536, 1536], 576), "down": ([576], 1536)}


def group_layers(members: list[int], K: int, R: int, kinds: list[str], layers: int, gen: torch.Generator):
    """One group's inputs for every layer: x, W_aug = [W; V_rᵀ], the slot pools, U_rᵀ, offsets, the rows' slots.
    Row p holds an adapter of kinds[p]: "osora" (diagonal cores, output scales), "loraxs" (dense cores), or "none"
    (slot 0, the zero adapter: a base row, or a low-rank row of a mixed batch)."""
    M, k, rows = sum(members), len(members), len(kinds)
    offsets = [sum(members[:i]) for i in range(k + 1)]
    slots = rows * 2 + 1
    osora = torch.tensor([kd == "osora" for kd in kinds])
    any_scaled = bool(osora.any())
    out = []
    for _ in range(layers):
        row_slots = torch.randperm(slots - 1, generator=gen)[:rows] + 1
        row_slots[torch.tensor([kd == "none" for kd in kinds])] = 0
        S = torch.randn(slots, k, R, generator=gen)
        C = torch.randn(slots, k, R, R, generator=gen)
        diagonal = torch.zeros(slots, dtype=torch.bool)
        diagonal[row_slots[osora]] = True  # as the runner's pools hold them: OSoRA's cores also as their diagonals
        C[diagonal] = torch.diag_embed(S[diagonal])
        o, d = torch.randn(slots, M, generator=gen), torch.randn(slots, k * R, generator=gen)
        o[~diagonal], d[~diagonal] = 1, 0
        C[0], S[0], diagonal[0] = 0, 0, True  # the zero adapter
        out.append(dict(
            x=torch.randn(rows, K, generator=gen), W=torch.randn(M + k * R, K, generator=gen) / K ** 0.5, C=C,
            o=o if any_scaled else None, d=d if any_scaled else None, scaled=osora if any_scaled else None,
            U=torch.randn(R, M, generator=gen), offsets=offsets, M=M, s=S.reshape(slots, k * R), diagonal=diagonal,
            slots=row_slots))
    return out


def bare(a) -> None:
    cpu_kernels.skinny_linear(a["x"], a["W"])


def separate(a) -> None:
    z = cpu_kernels.skinny_linear(a["x"], a["W"])
    cpu_kernels.core_delta(z[:, : a["M"]], z[:, a["M"]:], a["C"], a["o"], a["d"], a["U"], a["offsets"], 1,
                           slots=a["slots"])


def fused(a) -> None:
    cpu_kernels.core_linear(a["x"], a["W"], a["C"], a["o"], a["d"], a["U"], a["offsets"], a["slots"], a["s"],
                            a["diagonal"], scaled=a["scaled"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: one torch thread timed by its own CPU time, robust when other jobs share the machine")
    args = ap.parse_args()
    clock = time.perf_counter
    if args.clock == "cpu":
        clock = time.thread_time
        torch.set_num_threads(1)
    if not cpu_kernels.available():
        sys.exit("the CPU kernels are not available here (see the log above)")
    gen = torch.Generator().manual_seed(0)
    paths = {"bare GEMMs": bare, "GEMMs, then core_delta": separate, "core_linear (fused)": fused}
    results: dict[str, dict[str, float]] = {}
    # the mixed batch's pattern: OSoRA, LoRA-XS, SORSA, LoRA row after row; SORSA's and LoRA's rows read core slot 0
    mix = [("osora", "loraxs", "none", "none")[p % 4] for p in range(args.rows)]
    for method, kinds in (("loraxs", ["loraxs"] * args.rows), ("osora", ["osora"] * args.rows), ("mix", mix)):
        data = {g: group_layers(m, K, args.rank, kinds, args.layers, gen) for g, (m, K) in GROUPS.items()}
        times: dict[str, list[float]] = {p: [] for p in paths}
        for rep in range(args.reps + 1):  # the first round warms caches and threads, untimed
            for name, fn in paths.items():
                t0 = clock()
                for layer in range(args.layers):
                    for g in GROUPS:
                        fn(data[g][layer])
                if rep:
                    times[name].append(clock() - t0)
        bare_t = times["bare GEMMs"]
        results[method] = {"bare_ms": 1e3 * statistics.median(bare_t)}
        for name in list(paths)[1:]:
            results[method][name] = 1e3 * statistics.median([t - b for t, b in zip(times[name], bare_t)])
    print(f"\nCore delta per decode step over the bare GEMMs: SmolLM2-135M shapes, {args.layers} layers, "
          f"{args.rows} rows, rank {args.rank}, {torch.get_num_threads()} threads, clock {args.clock}\n")
    print("| method | bare GEMMs ms | + core_delta after them, ms | + fused (core_linear), ms |")
    print("|---|---:|---:|---:|")
    for method, r in results.items():
        print(f"| {method} | {r['bare_ms']:.2f} | {r['GEMMs, then core_delta']:.2f} | {r['core_linear (fused)']:.2f} |")
    print(json.dumps({"bench": "decode_kernels", "rows": args.rows, "rank": args.rank, "layers": args.layers,
                      "threads": torch.get_num_threads(), "clock": args.clock, "results": results}))


if __name__ == "__main__":
    main()
