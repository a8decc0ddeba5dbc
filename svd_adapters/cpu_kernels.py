"""svdserve's CPU kernels (`csrc/`), built once on first use, and the choice of when to use them.

A decode step is nothing but GEMMs with a few rows (one token per running request). BLAS libraries tune for
large products; with 1–64 rows some (MKL on AMD CPUs: 1.2–4× slower, measured) fall far short. And the core
adapters' delta, run as PyTorch ops after the GEMM, is ~6 small ops per member (a few hundred KFLOPs in all,
so op costs, not arithmetic, set its speed).

- `skinny_linear` (`csrc/skinny_linear.cpp`): x · Wᵀ for a few rows: lm_head, and groups without core rows, at
  decode.
- `core_linear` (`csrc/core_linear.cpp`): a decode step's group GEMM and its whole core delta (OSoRA, LoRA-XS,
  base rows) in one call, a block of output columns at a time: the block's U and o are fetched while its GEMM
  runs and its delta is added while its outputs are in L1. (Run separately, the delta's reads waited on memory
  after the GEMM had streamed the weights through every cache; folding the delta into each output's dot
  product instead was measured slower: a per-output epilogue.)
- `core_delta` (`csrc/core_delta.cpp`): one group's core delta added to an output already computed: at prefill, and at
  decode where calibration chose torch's matmul for the GEMM.
- `decode_attention` (`csrc/decode_attention.cpp`): a decode step's attention in one call per layer (and
  `verify_attention`, a speculative step's: a few tokens per row): the rotary
  embedding, the KV cache write, and each row's query heads against its own cached keys up to its position
  (PyTorch's CPU SDPA with a mask took ~1.7× as long, before the rotary and cache-write ops around it).
- `prefill_rotary` (`csrc/prefill_rotary.cpp`): a prefill's rotary embedding of queries and keys, in place, and its
  KV cache write, in one pass per layer (PyTorch: ~12 ops, each a pass; ~5 % of a prefill).
- `rms_norm` (`csrc/rms_norm.cpp`): Llama-family RMSNorm in one call instead of ~7 PyTorch ops (61 of them per
  decode step of SmolLM2).
- `lowrank_delta` (`csrc/lowrank_delta.cpp`): one group's low-rank delta (SORSA, LoRA) in one call, every row's
  A and Bᵀ read from its slot (PyTorch gathered copies of them first, then concatenated and scattered the
  results: at decode ~3× the memory traffic); at prefill in register tiles of its own (per-row products are too
  small for BLAS to reach speed).

Whether the GEMM kernel beats torch's matmul depends on the CPU and its BLAS, so `calibrate` times both once
per weight shape and keeps the faster (`uses_kernel`); base-only batches go through the same choice, so
adapters are compared like for like. Compiled with torch's extension builder (needs a C++ compiler; ~30 s
once) into `$SVDSERVE_HOME/kernels/<cpu capability>` (or `$SVDSERVE_KERNELS_DIR/<cpu capability>`), so a cache
shared between machines never hands one a binary it cannot run. Without a compiler, or with
SVDSERVE_CPU_KERNELS=0, everything runs through plain PyTorch ops (the same results to float rounding, slower).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from svd_adapters.log import get_logger

log = get_logger(__name__)

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / "skinny_linear.cpp", _CSRC / "core_delta.cpp", _CSRC / "core_linear.cpp", _CSRC / "lowrank_delta.cpp",
            _CSRC / "decode_attention.cpp", _CSRC / "rms_norm.cpp", _CSRC / "prefill_rotary.cpp"]
_HEADERS = [_CSRC / "vec.h", _CSRC / "parallel.h", _CSRC / "skinny_gemm.h", _CSRC / "core_tiles.h", _CSRC / "heads.h"]
# Vector flags for the capability torch itself detected on this CPU (the kernels' inner loops are plain C++).
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
_LINEAR_DTYPES = (torch.float32, torch.bfloat16)
_DELTA_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
SKINNY_MAX_ROWS = 64  # above this many rows BLAS is as fast or faster (measured: parity at 256 rows)
_lock = threading.Lock()
_state: dict[str, object] = {}
_skinny_faster: dict[tuple, bool] = {}  # (N, K, dtype) → the kernel beat torch's matmul at calibration
_prefill_plans: dict[tuple, str] = {}  # a group's signature → its fastest way to a prefill's projections


def enabled() -> bool:
    return os.environ.get("SVDSERVE_CPU_KERNELS", "1") not in ("0", "false", "no")


def available() -> bool:
    """Build (once per process; the compiled library is cached on disk) and load the kernels; False if they
    cannot be built here, with the reason logged once."""
    if not enabled():
        return False
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build()
        return bool(_state["ok"])


def _use_pip_ninja() -> None:
    """Put the pip `ninja` package's binary (a dependency) first on PATH when another ninja would be found. Two
    ninja versions hash build commands differently, so with a system ninja on PATH, `.venv/bin/python -m service`
    (system ninja) and the activated venv (pip's) each rebuilt every kernel the other had built (~55 s a start)."""
    try:
        import ninja
    except ImportError:  # torch then uses whichever ninja PATH has
        return
    pip_ninja = Path(ninja.BIN_DIR) / "ninja"
    found = shutil.which("ninja")
    if pip_ninja.exists() and (found is None or Path(found).resolve() != pip_ninja.resolve()):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def kernels_root() -> Path:
    """Where compiled kernels are cached: $SVDSERVE_KERNELS_DIR, else $SVDSERVE_HOME/kernels. Processes with their
    own SVDSERVE_HOME (the tests' service subprocesses) point this at one shared cache instead of compiling every
    kernel again (~1–2 min on a 2-core host)."""
    from svd_adapters.base_model import svdserve_home

    env = os.environ.get("SVDSERVE_KERNELS_DIR")
    return Path(env) if env else svdserve_home() / "kernels"


def kernel_build_dir(cap: str) -> Path:
    """The build directory of this CPU capability's kernels for this checkout and Python environment: the build
    commands name the sources' and torch's paths, so two checkouts (a clean-clone CI run, a benchmark's worktree)
    sharing one directory rebuilt every kernel each time the other had run (~50 s a start)."""
    where = hashlib.sha256(f"{_SOURCES[0].parent.resolve()}\0{Path(torch.__file__).parent.resolve()}".encode())
    return kernels_root() / f"svdserve_kernels_{cap.lower()}-{where.hexdigest()[:10]}"


def _build() -> bool:
    from torch.utils import cpp_extension

    _use_pip_ninja()
    cap = torch.backends.cpu.get_cpu_capability()
    name = f"svdserve_kernels_{cap.lower()}"
    build_dir = kernel_build_dir(cap)
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch rebuilds when a source file changes; a header's digest in the flags makes a header change count too.
    headers = hashlib.sha256(b"".join(h.read_bytes() for h in _HEADERS)).hexdigest()[:16]
    log.info("loading the CPU kernels (%s; compiled once into %s, ~30 s the first time)", cap, build_dir)
    try:
        cpp_extension.load(
            name=name, sources=[str(s) for s in _SOURCES], build_directory=str(build_dir), is_python_module=False,
            extra_cflags=["-O3", "-fopenmp", f"-DSVDSERVE_HEADERS={headers}", *_ARCH_FLAGS.get(cap, [])],
            extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, headers missing: serve through the PyTorch path instead
        log.warning("CPU kernels unavailable, so decode takes the slower PyTorch path (install g++ to get them; "
                    "SVDSERVE_CPU_KERNELS=0 silences this): %s", _reason(exc))
        return False
    return True


def _reason(exc: Exception) -> str:
    """The line of a failed build that says why (the compiler's error), not the whole command line."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]  # the compiler's (or linker's) own message
    return (errors or lines or [type(exc).__name__])[0][:300]


def skinny_linear(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """x (T, K) · Wᵀ, W (N, K), by the kernel; `matmul_t` decides when to use it."""
    return torch.ops.svdserve.skinny_linear(x, W)


def core_delta(y: torch.Tensor, h: torch.Tensor, Ct: torch.Tensor, o: torch.Tensor | None, d: torch.Tensor | None,
               U: torch.Tensor, offsets: list[int], tokens_per_row: int = 1, out: torch.Tensor | None = None,
               slots: torch.Tensor | None = None) -> None:
    """y (T, M) += one group's core delta, in place; see `csrc/core_delta.cpp`.

    h (T, k·R) the tokens' shared projections; token t belongs to request row t // tokens_per_row, whose core
    Ct[row] (k, R, R) is transposed and whose o (rows, M), d (rows, k·R) are given for output-scaling rows or
    None; U (R, M) the members' U_rᵀ side by side in float32 (float64 for a float64 y); offsets: the members'
    column bounds. With `out` (T, M/2), for a gate/up group: also out = silu(gate) · up of the final y (without
    output scales, each chunk of tokens right after its delta, while its rows are in cache). Check `serves(y)`
    first. With `slots` (rows,) int64: Ct, o and d are slot pools (slots, ...) and row p reads slot slots[p]; slot 0
    is the pools' zero adapter, and a prefill skips its rows (their y as given; with `out`, the bare activation)."""
    torch.ops.svdserve.core_delta(y, h, Ct, o, d, U, offsets, tokens_per_row, out, slots)


def core_linear(x: torch.Tensor, W_aug: torch.Tensor, Ct: torch.Tensor, o: torch.Tensor | None, d: torch.Tensor | None,
                U: torch.Tensor, offsets: list[int], slots: torch.Tensor, s: torch.Tensor | None = None,
                diagonal: torch.Tensor | None = None, blas: bool = False,
                scaled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's GEMM of one group fused with its core delta (`csrc/core_linear.cpp`): x (T, K), one token per
    row, and W_aug (M + k·R, K) = [the members' weights; their V_rᵀ] give y (T, M), base outputs plus each row's
    core delta, and the shared projections h (T, k·R). The terms as for `core_delta` with `slots`; float32 or
    bfloat16. With s (S, k·R) and diagonal (S,) bool on the host: slots flagged diagonal have the diagonals of
    their cores in s, and their Ct is not read. The GEMM is the kernel's own where `uses_kernel(x, W_aug)`, else
    pass `blas=True`: torch's GEMM (MKL; oneDNN's AMX for bfloat16) inside the same call, y and h views of its
    product. Rows reading slot 0 (the pools' zero adapter) get the GEMM's outputs alone. With o and d, `scaled`
    (T,) bool on the host flags the rows whose slots scale outputs (OSoRA's); the others (o = 1, d = 0 in their
    slots) take the unscaled arithmetic, same bits. Without it every row with o and d is taken as scaled."""
    return torch.ops.svdserve.core_linear(x, W_aug, Ct, o, d, U, offsets, slots, s, diagonal, blas, scaled)


def lowrank_delta(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bt: list[torch.Tensor], offsets: list[int],
                  slots: torch.Tensor, ranks: torch.Tensor, tokens_per_row: int = 1, h: torch.Tensor | None = None,
                  d: torch.Tensor | None = None, U: torch.Tensor | None = None) -> None:
    """y (T, M) += each token's low-rank delta, in place; see `csrc/lowrank_delta.cpp`.

    x (T, n) the tokens' inputs, token t of request row t // tokens_per_row; A (S, k·K, n) and Bt[i] (S, K, m_i)
    one layer's slot pools; offsets the members' column bounds; slots (rows,) int64 on the host, each row's slot
    (0: none); ranks (S,) int64, each slot's filled rows of K. With h (T, k·R) the tokens' shared projections,
    d (S, k·R) the slots' d-terms and U (R, M) the members' U_rᵀ in the accumulation dtype: also U_r (d ⊙ h).
    Check `serves(y)` first."""
    torch.ops.svdserve.lowrank_delta(y, x, A, Bt, offsets, slots, ranks, tokens_per_row, h, d, U)


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float) -> torch.Tensor:
    """A decode step's attention, one new token per row (`csrc/decode_attention.cpp`): q (T, Hq, D), k_new and
    v_new (T, Hkv, D) before the rotary embedding (each row's heads contiguous; rows may be strided); cos, sin
    (T, D) the rows' rotary terms; k, v the KV cache (rows, Hkv, S, D), row t at index t, into which row t's
    rotated key and its value are written at positions[t] (int64, (T,)) before it attends to keys
    [0, positions[t]]. Returns (T, Hq, D). Check `attends` first."""
    return torch.ops.svdserve.decode_attention(q, k_new, v_new, k, v, positions, cos, sin, scale)


def verify_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     starts: torch.Tensor, lengths: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """A speculative step's attention (`csrc/decode_attention.cpp`): R rows of L new tokens each, q (R·L, Hq, D),
    k_new and v_new (R·L, Hkv, D) as for `decode_attention`, cos, sin (R·L, D); row r's first lengths[r] tokens
    are real, at positions starts[r] onwards (int64, (R,)), the rest padding. Writes the real tokens' rotated keys
    and values into cache row r, then each attends to the keys up to its own position. Returns (R·L, Hq, D), zeros
    at the pads. Check `attends` first."""
    return torch.ops.svdserve.verify_attention(q, k_new, v_new, k, v, starts, lengths, cos, sin, scale)


def _runs_on(t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether a kernel can take t at all: a CPU tensor of one of `dtypes`, kernels loaded and not forced off."""
    return t.device.type == "cpu" and t.dtype in dtypes and bool(_state.get("ok")) and _state.get("force") is not False


def attends(query_heads: int, k: torch.Tensor) -> bool:
    """Whether `decode_attention` takes queries of `query_heads` heads against the KV cache k (rows, Hkv, S, D): a
    contiguous CPU cache of a kernel dtype, kernels loaded and not forced off, head size a multiple of 16 up to
    256, at most 1024 query numbers per KV head."""
    D, group = k.shape[-1], query_heads // k.shape[1]
    return _runs_on(k, _LINEAR_DTYPES) and k.is_contiguous() and D % 16 == 0 and D <= 256 and group * D <= 1024


def prefill_rotary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor, tokens_per_row: int) -> None:
    """A prefill's rotary embedding and KV cache write in one pass (`csrc/prefill_rotary.cpp`): q (T, Hq, D), k and
    v (T, Hkv, D) (each row's heads contiguous; rows may be strided), token t of request row t // tokens_per_row;
    cos, sin (T, D). Rotates q and k in place, the same bits as `runner.rotate`, and writes request row p's keys
    and values into the caches (rows, Hkv, S, D) at cache row rows[p] (a CPU int64 vector), positions from 0.
    Check `rotates` first."""
    torch.ops.svdserve.prefill_rotary(q, k, v, cos, sin, k_cache, v_cache, rows, tokens_per_row)


def rotates(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `prefill_rotary` takes q, k, v and the KV cache: CPU tensors of a kernel dtype, each row's heads
    contiguous, a contiguous cache, kernels loaded and not forced off."""
    return (_runs_on(q, _LINEAR_DTYPES) and all(x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]
                                                for x in (q, k, v)) and k_cache.is_contiguous())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm of x (T, H) with `weight` (H,), in one call (`csrc/rms_norm.cpp`). Check `normalizes`."""
    return torch.ops.svdserve.rms_norm(x, weight, eps)


def normalizes(x: torch.Tensor) -> bool:
    """Whether `rms_norm` takes x: rows on the CPU in a kernel dtype, kernels loaded and not forced off."""
    return _runs_on(x, _LINEAR_DTYPES) and x.dim() == 2 and x.stride(-1) == 1


def gated_silu(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for y = [gate | up] (T, 2m) in one pass: what `core_delta`'s `out` gives, without adapters."""
    return torch.ops.svdserve.gated_silu(y)


def serves(y: torch.Tensor) -> bool:
    """Whether `core_delta` takes this output: a CPU tensor of a dtype it is built for, kernels loaded."""
    return _runs_on(y, _DELTA_DTYPES)


def _key(W: torch.Tensor) -> tuple:
    return (W.shape[0], W.shape[1], W.dtype)


def uses_kernel(x: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether x · Wᵀ goes through the kernels: a few rows, and calibration found them faster for W's shape
    (or `force` says so)."""
    if not (_state.get("ok") and x.shape[0] <= SKINNY_MAX_ROWS and x.device.type == "cpu" and x.dtype in _LINEAR_DTYPES):
        return False
    forced = _state.get("force")
    return bool(_skinny_faster.get(_key(W))) if forced is None else bool(forced)


def force(use: bool | None) -> None:
    """Use the kernels for every shape they take (True), for none (False), or as calibrated (None): for
    benchmarks' A/B runs and for tests of either path."""
    _state["force"] = use


def matmul_t(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """x · Wᵀ (W as nn.Linear stores it): by the kernel where `uses_kernel`, else torch's matmul."""
    return skinny_linear(x, W) if uses_kernel(x, W) else x @ W.T


def _best_times(fns: dict[str, object], reps: int) -> dict[str, float]:
    """Fastest seconds of each callable over `reps` rounds, the callables alternating within a round; a first,
    untimed round warms caches and thread pools. The fastest, not the median: on a shared host noise only adds
    time, and a burst over a few rounds of one callable had flipped medians (a 3072x576 decode GEMM measured at
    0.66x torch in one process and 1.09x in the next, the kernel then left unused for the server's lifetime)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(reps + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def calibrate(weights: list[torch.Tensor], rows: int, reps: int = 9) -> None:
    """Time the kernel against torch's matmul for each weight shape not timed yet, at `rows` rows (a full decode
    batch), alternating the two; keep the faster. Both give the same results to float rounding."""
    if not available():
        return
    todo = {}
    for W in weights:
        if W.device.type == "cpu" and W.dtype in _LINEAR_DTYPES and W.is_contiguous() and _key(W) not in _skinny_faster:
            todo.setdefault(_key(W), W)
    if not todo:
        return
    rows = max(1, min(rows, SKINNY_MAX_ROWS))
    report = []
    with torch.inference_mode():
        for key, W in todo.items():
            x = torch.randn(rows, W.shape[1], dtype=W.dtype)
            t = _best_times({"kernel": lambda: skinny_linear(x, W), "torch": lambda: x @ W.T}, reps)
            kernel, blas = t["kernel"], t["torch"]
            _skinny_faster[key] = kernel < blas
            report.append(f"{key[0]}x{key[1]} {blas / kernel:.2f}x")
    log.info("decode GEMMs at %d rows, kernel speed relative to torch's matmul (kernel used where > 1): %s",
             rows, ", ".join(report))


def prefill_plan(key: tuple) -> str | None:
    """The plan `calibrate_prefill` found fastest for a group with this signature, or None if not timed."""
    return _prefill_plans.get(key)


def calibrate_prefill(groups: list[tuple[tuple, str, torch.Tensor, dict[str, Callable[[torch.Tensor], object]]]],
                      rows: int = 1024, reps: int = 6) -> None:
    """For each group (signature, label for the log, a weight of its input width and dtype, its plans: ways to a
    prefill's base outputs and shared projections, the same numbers to float rounding) whose signature was not timed
    yet: time every plan on `rows` random rows, alternating, and keep the fastest (`prefill_plan`). Which wins depends
    on the CPU and its BLAS (see `LinearGroup.prefill_plans`). SmolLM2's plans differ by 1–7 % on an AMX Xeon;
    6 rounds (~0.3 s for its four groups) picked the same plan where they differed by more than 2 %."""
    report = []
    with torch.inference_mode():
        for key, label, like, plans in groups:
            if key in _prefill_plans or like.device.type != "cpu" or not plans:
                continue
            x = torch.randn(rows, like.shape[1], dtype=like.dtype)
            t = _best_times({name: (lambda f=f: f(x)) for name, f in plans.items()}, reps)
            ranked = sorted(t, key=t.get)
            _prefill_plans[key] = ranked[0]
            margin = f", {t[ranked[1]] / t[ranked[0]]:.2f}x the next" if len(ranked) > 1 else ""
            report.append(f"{label}: {ranked[0]}{margin}")
    if report:
        log.info("prefill projections at %d rows, the fastest plan per group: %s", rows, "; ".join(report))


def keep_large_blocks() -> bool:
    """Have glibc's malloc serve blocks up to 32 MB from its heap and keep freed memory for reuse (process-wide,
    once; False where there is no glibc).

    By default malloc maps each large block fresh and unmaps it on free, so every prefill's activations (a
    2048-token gate/up output is 25 MB) are page-faulted in again on every use: measured 5–8 % of a prefill's
    time here, for the base model and adapters alike (the reason CPU inference guides suggest jemalloc or
    tcmalloc). The cost: freed memory stays in the process (up to 1 GB) instead of going back to the system."""
    if "malloc" in _state:
        return bool(_state["malloc"])
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        ok = False
    _state["malloc"] = ok
    log.info("large activations: %s", "reused from malloc's heap" if ok else "left to the system allocator (no glibc)")
    return ok


def summary() -> str:
    """One line for logs and benchmark headers: built or not, and where calibration chose the GEMM kernel."""
    if not _state.get("ok"):
        return "not in use (PyTorch path)"
    return (f"core delta kernel on; GEMM kernel for {sum(_skinny_faster.values())}/{len(_skinny_faster)} decode weight "
            f"shapes; prefill projections: {', '.join(sorted(set(_prefill_plans.values()))) or 'not timed'}")
