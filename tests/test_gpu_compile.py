"""The Triton kernels compile for an H100 / H200 (sm_90) down to a cubin, on this machine without a GPU.

Triton's interpreter (tests/test_gpu_kernels.py) runs a kernel's code with NumPy: it checks indexing, masks and
arithmetic, but accepts code the real compiler rejects and says nothing about registers. Compiling each kernel the
way gpu_kernels.py launches it (the NVIDIA backend and its ptxas ship with the pinned Triton wheel) catches both:
a kernel that would fail to build on a GPU fails here, and the fused decode kernel must not spill registers (ptxas
-v). Runs in a subprocess: the interpreter, which tests/conftest.py turns on, replaces the kernels' JIT objects.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, sys.argv[1])
from svd_adapters import gpu_kernels
from svd_adapters.triton_core_delta import core_delta_kernel
from svd_adapters.triton_linear_core import linear_core_kernel
from svd_adapters.triton_lowrank_delta import lowrank_delta_kernel

target = GPUTarget("cuda", 90, 32)
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
out = []

def build(name, fn, pointers, dtype, ints, consts, warps=4):
    index = ("rows_ptr", "slots_ptr", "ranks_ptr")  # int64 on the device, as gpu_kernels passes them
    sig = {p: "*fp32" if p == "u_ptr" else "*i64" if p in index else f"*{dtype}" for p in pointers}
    sig.update({i: "i32" for i in ints})
    sig.update({c: "constexpr" for c in consts})
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options={"num_warps": warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ck.asm["ptx"])
    info = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", info.stdout + info.stderr))
    out.append({"kernel": name, "dtype": dtype, "consts": {k: v for k, v in consts.items() if k in ("K", "SCALED", "BT", "NMEM", "SUB")},
                "cubin_bytes": len(ck.asm["cubin"]), "spill_bytes": spills})

for dtype in ("fp32", "bf16"):
    for K, scaled in ((3, True), (2, False), (1, True)):
        build("core_delta", core_delta_kernel, ["y_ptr", "h_ptr", "c_ptr", "o_ptr", "d_ptr", "u_ptr"], dtype,
              ["T", "M", "R", "tokens_per_row", "b1", "b2", "s_yt", "s_ht", "s_cp", "s_ck", "s_cr", "s_op", "s_dp", "s_ur"],
              {"K": K, "SCALED": scaled, "R_PAD": 16, "BT": gpu_kernels.BLOCK_T, "BN": gpu_kernels.BLOCK_N})
        for BT in (16, 32, 64):
            build("linear_core", linear_core_kernel, ["x_ptr", "w_ptr", "y_ptr", "h_ptr", "c_ptr", "o_ptr", "d_ptr", "u_ptr"],
                  dtype, ["T", "M", "R", "b1", "b2", "s_xt", "s_yt", "s_ht", "s_cp", "s_ck", "s_cr", "s_op", "s_dp", "s_ur"],
                  {"KIN": 576, "K": K, "SCALED": scaled, "R_PAD": 16, "BT": BT, "BN": gpu_kernels.LINEAR_BN,
                   "BK": gpu_kernels.linear_bk(BT), "IEEE": dtype == "fp32"}, warps=gpu_kernels.LINEAR_WARPS)
    for sub in (True, False):  # SmolLM2's q/k/v group: 576 inputs, members of 576, 192 and 192 columns
        build("lowrank_delta", lowrank_delta_kernel,
              ["y_ptr", "x_ptr", "a_ptr", "b0_ptr", "b1_ptr", "b2_ptr", "rows_ptr", "slots_ptr", "ranks_ptr", "h_ptr",
               "d_ptr", "u_ptr"], dtype,
              ["R", "s_yt", "s_xt", "s_as", "s_ak", "s_b0s", "s_b1s", "s_b2s", "s_ht", "s_ds", "s_ur"],
              {"N_IN": 576, "b1": 576, "b2": 768, "M": 960, "NMEM": 3, "K": 32, "K_PAD": 32, "R_PAD": 16, "BK_IN": 64,
               "BN": 64, "SUB": sub})
print(json.dumps(out))
'''


def test_triton_kernels_compile_for_sm90_without_spilling_the_fused_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")  # compiled afresh, not taken from a cache
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    built = json.loads(done.stdout.strip().splitlines()[-1])
    assert {b["kernel"] for b in built} == {"core_delta", "linear_core", "lowrank_delta"}
    assert all(b["cubin_bytes"] > 0 for b in built)
    spilled = [b for b in built if b["kernel"] == "linear_core" and b["spill_bytes"]]
    assert not spilled, f"the fused decode kernel spills registers on sm_90: {spilled}"
