"""The fused CPU kernel of the decode-step core delta (`csrc/core_delta.cpp`), built once on first use.

At decode the adapter work of a group is a few hundred KFLOPs spread over ~6 PyTorch ops per member, so op
costs, not arithmetic, set its speed; the C++ kernel does a whole group in one call. It is compiled with
torch's extension builder (needs a C++ compiler; ~1 min once) into `$SVDSERVE_HOME/kernels/<cpu>`, one build
per CPU capability, so a cache shared between machines never hands one a binary it cannot run. Without a
compiler, or with SVDSERVE_CPU_KERNELS=0, serving falls back to the plain PyTorch path (same results).
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import torch

from svd_adapters.log import get_logger

log = get_logger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "core_delta.cpp"
# Vector flags for the capability torch itself detected on this CPU (the kernel's inner loops are plain C++).
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
_lock = threading.Lock()
_state: dict[str, object] = {}


def enabled() -> bool:
    return os.environ.get("SVDSERVE_CPU_KERNELS", "1") not in ("0", "false", "no")


def available() -> bool:
    """Build (once per process; the compiled library is cached on disk) and load the kernel; False if it
    cannot be built here, with the reason logged once."""
    if not enabled():
        return False
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build()
        return bool(_state["ok"])


_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def serves(y: torch.Tensor) -> bool:
    """Whether the kernel takes this output: a CPU tensor of a dtype it is built for, kernel loaded."""
    return y.device.type == "cpu" and y.dtype in _DTYPES and bool(_state.get("ok"))


def _build() -> bool:
    from torch.utils import cpp_extension

    from svd_adapters.base_model import svdserve_home

    try:  # the pip `ninja` package's binary, also when the venv's bin/ is not on PATH (.venv/bin/python -m service)
        import ninja

        if shutil.which("ninja") is None:
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()
    name = f"svdserve_core_delta_{cap.lower()}"
    build_dir = svdserve_home() / "kernels" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("loading the fused CPU kernel (%s; compiled once into %s, ~1 min the first time)", cap, build_dir)
    try:
        cpp_extension.load(
            name=name, sources=[str(_SOURCE)], build_directory=str(build_dir), is_python_module=False,
            extra_cflags=["-O3", "-fopenmp", *_ARCH_FLAGS.get(cap, [])], extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, headers missing: serve through the PyTorch path instead
        log.warning("fused CPU kernel unavailable, so decode takes the slower PyTorch path (install g++ to get it; "
                    "SVDSERVE_CPU_KERNELS=0 silences this): %s", _reason(exc))
        return False
    return True


def _reason(exc: Exception) -> str:
    """The line of a failed build that says why (the compiler's error), not the whole command line."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and not ln.startswith("[")]
    return (errors or lines or [type(exc).__name__])[0][:300]


def core_delta_decode(y: torch.Tensor, h: torch.Tensor, Ct: torch.Tensor, o: torch.Tensor | None, d: torch.Tensor | None,
                      U: torch.Tensor, offsets: list[int]) -> None:
    """y (P, M) += the core delta of one group, in place; see `csrc/core_delta.cpp`. Call `available()` first."""
    torch.ops.svdserve.core_delta_decode(y, h, Ct, o, d, U, offsets)
