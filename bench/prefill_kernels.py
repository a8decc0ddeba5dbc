"""A prefill's adapter delta per group, by kernel build: the diagnostic behind the prefill sweeps of `core_delta`
(`svd_adapters/csrc/core_delta.cpp`: OSoRA, LoRA-XS) and `lowrank_delta` (`csrc/lowrank_delta.cpp`: SORSA, LoRA),
not a target.

    python bench/prefill_kernels.py [--rows 32] [--tokens 64] [--rank 16] [--reps 30] [--against GIT_REV]

SmolLM2-135M's four groups (qkv, o, gate/up, down; random data of the real shapes), one prefill of `--rows` rows
of `--tokens` tokens. OSoRA and LoRA-XS rows read their cores (OSoRA: also its output scales and d) from their own
slots of a pool, as the runner calls the kernel: the delta added into the GEMM's output y, and for gate/up the
activation silu(gate) · up written from the final outputs. SORSA and LoRA rows read their A and Bᵀ (SORSA: also d,
through the shared projections h) from their slots, the delta added into y (gate/up's activation is then the
base's pass, not timed again). The base's own pass at the same point is timed beside it (for gate/up the one-pass
activation `gated_silu`; the other groups have none): the difference is what adapters add. With `--against`, the
same calls through that git revision's kernels too, built into a namespace of their own and alternated with this
tree's in every round (one process, one machine state: the way to compare two builds on a noisy host). Every call
reads a y no call has read for a while (calls cycle through `--copies` of every input, more than the caches
hold), as a prefill's GEMM output comes. `--tokens 1 --copies 8` times a decode step's calls instead (one token
per row; the low-rank rows' A and Bᵀ then come from memory, as in a real step). Prints a markdown table and a
last line of JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from svd_adapters import cpu_kernels  # noqa: E402

GROUPS = {"qkv": [576, 192, 192], "o": [576], "gate_up": [1536, 1536], "down": [576]}  # SmolLM2-135M's members
INPUTS = {"qkv": 576, "o": 576, "gate_up": 576, "down": 1536}  # and their input widths
KERNELS = {"loraxs": "core_delta", "osora": "core_delta", "sorsa": "lowrank_delta", "lora": "lowrank_delta"}


def build_revision(rev: str, sources: tuple[str, ...] = ("core_delta.cpp", "lowrank_delta.cpp")) -> None:
    """`rev`'s kernels in `sources` as torch.ops.svdserve_rev.* (sources and headers from git)."""
    from torch.utils import cpp_extension

    src = Path(tempfile.mkdtemp(prefix="svdserve_rev_"))
    listed = subprocess.run(["git", "ls-tree", "--name-only", rev, "svd_adapters/csrc/"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split()
    headers = tuple(Path(p).name for p in listed if p.endswith(".h"))
    for f in sources + headers:
        text = subprocess.run(["git", "show", f"{rev}:svd_adapters/csrc/{f}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        (src / f).write_text(text.replace("TORCH_LIBRARY_FRAGMENT(svdserve,", "TORCH_LIBRARY_FRAGMENT(svdserve_rev,")
                             .replace("TORCH_LIBRARY_IMPL(svdserve,", "TORCH_LIBRARY_IMPL(svdserve_rev,"))
    cap = torch.backends.cpu.get_cpu_capability()
    cpp_extension.load(name="svdserve_rev", sources=[str(src / f) for f in sources],
                       build_directory=str(src),
                       is_python_module=False, extra_ldflags=["-fopenmp"], verbose=False,
                       extra_cflags=["-O3", "-fopenmp", *cpu_kernels._ARCH_FLAGS.get(cap, [])])


def group_inputs(members: list[int], R: int, P: int, L: int, scaled: bool, gen: torch.Generator) -> dict:
    M, k, S = sum(members), len(members), P + 1
    C = torch.diag_embed(torch.randn(S, k, R, generator=gen)) if scaled else torch.randn(S, k, R, R, generator=gen) / R
    o = torch.randn(S, M, generator=gen) if scaled else None
    d = torch.randn(S, k * R, generator=gen) if scaled else None
    C[0] = 0  # slot 0: the pools' zero adapter
    return dict(y=torch.randn(P * L, M, generator=gen), h=torch.randn(P * L, k * R, generator=gen), C=C, o=o, d=d,
                U=torch.randn(R, M, generator=gen) / R ** 0.5, offsets=[sum(members[:i]) for i in range(k + 1)],
                L=L, slots=torch.arange(1, P + 1), out=torch.empty(P * L, M // 2) if k == 2 else None)


def lowrank_inputs(members: list[int], n: int, R: int, P: int, L: int, sub: bool, gen: torch.Generator) -> dict:
    """A layer's low-rank pools (K = 2R rows per member, R of them filled, as a rank-R adapter in the runner's
    pools) with every row in its own slot; SORSA (`sub`) also has d = −σ_r and the shared projections."""
    M, k, S, K = sum(members), len(members), P + 1, 2 * R
    A = torch.zeros(S, k * K, n)
    Bt = [torch.zeros(S, K, m) for m in members]
    for i in range(k):
        A[1:, i * K : i * K + R] = torch.randn(P, R, n, generator=gen) / n ** 0.5
        Bt[i][1:, :R] = torch.randn(P, R, members[i], generator=gen) / R ** 0.5
    d = torch.rand(S, k * R, generator=gen) if sub else None
    return dict(y=torch.randn(P * L, M, generator=gen), x=torch.randn(P * L, n, generator=gen), A=A, Bt=Bt,
                offsets=[sum(members[:i]) for i in range(k + 1)], slots=torch.arange(1, P + 1),
                ranks=torch.tensor([0] + [R] * P), L=L, h=torch.randn(P * L, k * R, generator=gen) if sub else None,
                d=d, U=torch.randn(R, M, generator=gen) / R ** 0.5 if sub else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--copies", type=int, default=5, help="inputs cycled through, so y comes from memory")
    ap.add_argument("--against", metavar="GIT_REV", help="also time this revision's kernels, alternated")
    args = ap.parse_args()
    if not cpu_kernels.available():
        sys.exit("the CPU kernels are not available here (see the log above)")
    if args.against:
        build_revision(args.against)
    builds = {"this tree": torch.ops.svdserve}
    if args.against:
        builds[args.against] = torch.ops.svdserve_rev
    gen = torch.Generator().manual_seed(0)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for method, kernel in KERNELS.items():
        for group, members in GROUPS.items():
            if kernel == "core_delta":
                data = [group_inputs(members, args.rank, args.rows, args.tokens, method == "osora", gen)
                        for _ in range(args.copies)]
            else:
                data = [lowrank_inputs(members, INPUTS[group], args.rank, args.rows, args.tokens, method == "sorsa", gen)
                        for _ in range(args.copies)]
            gated = len(members) == 2 and kernel == "core_delta"  # the core sweep writes the activation itself
            calls = {"base": (lambda a: cpu_kernels.gated_silu(a["y"])) if gated else (lambda a: None)}
            for name, ns in builds.items():
                if kernel == "core_delta":
                    calls[name] = lambda a, op=ns.core_delta: op(a["y"], a["h"], a["C"], a["o"], a["d"], a["U"],
                                                                 a["offsets"], a["L"], a["out"], a["slots"])
                else:
                    calls[name] = lambda a, op=ns.lowrank_delta: op(a["y"], a["x"], a["A"], a["Bt"], a["offsets"],
                                                                    a["slots"], a["ranks"], a["L"], a["h"], a["d"], a["U"])
            times: dict[str, list[float]] = {c: [] for c in calls}
            for rep in range(args.reps + 1):  # the first round warms up, untimed
                for ci, (c, fn) in enumerate(calls.items()):
                    a = data[(rep * len(calls) + ci) % args.copies]  # not the copy the call before just read
                    t0 = time.perf_counter()
                    fn(a)
                    if rep:
                        times[c].append(time.perf_counter() - t0)
            results.setdefault(method, {})[group] = {c: 1e3 * statistics.median(t) for c, t in times.items()}
    print(f"\nA prefill's adapter delta per group: SmolLM2-135M shapes, {args.rows} rows × {args.tokens} tokens, rank "
          f"{args.rank}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}; medians of "
          f"{args.reps} rounds, ms per call (\"base\": the base's own pass there)\n")
    names = list(builds)
    print("| method | group | base ms | " + " | ".join(f"{n} ms" for n in names) + " |")
    print("|---|---|---:|" + "---:|" * len(names))
    for method, groups in results.items():
        for group, r in groups.items():
            print(f"| {method} | {group} | {r['base']:.2f} | " + " | ".join(f"{r[n]:.2f}" for n in names) + " |")
        total = {c: sum(r[c] for r in groups.values()) for c in ["base", *names]}
        print(f"| {method} | one layer | {total['base']:.2f} | " + " | ".join(f"{total[n]:.2f}" for n in names) + " |")
    print(json.dumps({"bench": "prefill_kernels", "rows": args.rows, "tokens": args.tokens, "rank": args.rank,
                      "threads": torch.get_num_threads(), "against": args.against, "results": results}))


if __name__ == "__main__":
    main()
