"""`python -m service`: load the base model and its SVD factors, open the adapter store, serve the API.

    python -m service                                  # SmolLM2-135M-Instruct, disk store ./data/adapters
    python -m service --base tiny --port 8001          # tiny random Llama (for trying the API)
    python -m service --store redis://127.0.0.1:6379/0 # shared Redis store (or set REDIS_URL)
    SVDSERVE_ADMIN_KEY=$(openssl rand -hex 32) python -m service   # tenants + API keys (auth on); see service/auth.py

Flags override SVDSERVE_* environment variables (see service/config.py), which override the defaults.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from svd_adapters.log import get_logger

log = get_logger("service")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="default | tiny | path to an HF model directory (env SVDSERVE_BASE)")
    p.add_argument("--store", help="adapter store: a directory, or redis://host:port/db (env SVDSERVE_STORE, REDIS_URL)")
    p.add_argument("--redis-prefix", help="key prefix in Redis (default svdserve:)")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8000)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="serving dtype of weights and adapters (default float32; bfloat16 ~1.7x faster decode on CPUs "
                        "with AVX512-BF16/AMX, and the usual choice on GPUs; float16: GPU only)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                   help="on a GPU, replay decode steps from captured CUDA graphs (default on; env SVDSERVE_CUDA_GRAPHS)")
    p.add_argument("--max-batch", type=int, help="rows decoded together (default 32)")
    p.add_argument("--max-rank", type=int, help="largest adapter rank served (default 16)")
    p.add_argument("--max-seq-len", type=int, help="prompt + generated tokens per request (default 1024)")
    p.add_argument("--core-slots", type=int, help="device cache slots for OSoRA/LoRA-XS adapters (default 64)")
    p.add_argument("--lr-slots", type=int, help="device cache slots for SORSA/LoRA adapters (default 8)")
    p.add_argument("--prefix-cache-tokens", type=int,
                   help="prompt tokens whose keys and values are kept for later prompts that start alike, per adapter "
                        "(default 8192; 0 = off)")
    p.add_argument("--host-cache-mb", type=int,
                   help="MiB of validated adapters kept in host memory once evicted from their device slot, so they "
                        "return without the store (default 1024; 0 = off)")
    p.add_argument("--prefill-chunk-tokens", type=int,
                   help="a longer prompt arriving while others decode is prefilled this many tokens per step, between "
                        "their decode steps (default 512; 0 = whole prompts)")
    p.add_argument("--fair-share", action=argparse.BooleanOptionalAction,
                   help="admit waiting requests from the tenant holding the fewest batch rows first (default on; "
                        "--no-fair-share: first come, first served across tenants)")
    p.add_argument("--speculative-tokens", type=int,
                   help="speculative decoding by prompt lookup: tokens drafted per step from each request's own context "
                        "(vLLM's ngram method; the same tokens, sooner where answers repeat their prompts) (default 0 = off)")
    p.add_argument("--speculative-ngram-max", type=int, help="longest context suffix looked up for a draft (default 4)")
    p.add_argument("--speculative-ngram-min", type=int, help="shortest context suffix looked up (default 2)")
    p.add_argument("--speculative-max-batch", type=int,
                   help="speculate only while at most this many requests decode (default 4)")
    p.add_argument("--speculative-prediction-tokens", type=int,
                   help="tokens drafted per step from a request's predicted output (OpenAI's `prediction`) "
                        "(default 8; 0 = predictions unused)")
    p.add_argument("--speculative-backoff-max", type=int,
                   help="a request whose draft was rejected outright drafts again after 1, 2, 4, … decode steps, at "
                        "most this many (default 16; 0 = drafts every step)")
    p.add_argument("--max-waiting", type=int, help="queued requests before 429 (default 256)")
    p.add_argument("--max-upload-bytes", type=int, help="largest adapter file accepted (default 64 MiB)")
    p.add_argument("--max-request-bytes", type=int, help="largest other request body, e.g. /generate (default 1 MiB)")
    p.add_argument("--request-timeout", type=float, help="seconds a generation may take, queueing included; 0 = none (default 300)")
    p.add_argument("--shutdown-timeout", type=float, help="seconds SIGTERM waits for in-flight requests (default 30)")
    p.add_argument("--r-max", type=int, help="rank of the cached SVD factors (default 64)")
    p.add_argument("--factors-dir", help="where SVD factors are cached (default: beside the base model)")
    p.add_argument(
        "--auth", choices=("auto", "on", "off"),
        help="tenant API keys: on | off (single user, tenant 'default') | auto = on when an admin key is set (env SVDSERVE_AUTH)",
    )
    p.add_argument(
        "--admin-key", help="admin key for /admin/... (tenants, API keys); prefer env SVDSERVE_ADMIN_KEY (flags show in ps)"
    )
    p.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH",
                   help="vLLM's flag: adapters stored at start-up from server paths (a PEFT LoRA directory or an "
                        "adapter .safetensors), NAME=PATH or JSON {\"name\", \"path\", \"tenant\"} (env SVDSERVE_LORA_MODULES)")
    p.add_argument("--allow-runtime-lora-updating", action=argparse.BooleanOptionalAction, default=None,
                   help="serve vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (default off)")
    p.add_argument("--lora-path-roots", metavar="DIR[:DIR...]",
                   help="directories those runtime paths must lie in (required with API keys on)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Heavy imports after argument parsing, so -h is instant.
    from adapters_store import StoreError
    from service.app import create_app, open_configured_store
    from service.graceful import serve
    from service.config import Settings, resolve_device
    from svd_adapters.base_model import load_base
    from svd_adapters.factors import load_or_compute
    from svd_adapters.threads import in_fresh_thread

    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings.from_env(**overrides)
    except (TypeError, ValueError) as exc:
        log.error("bad settings: %s", exc)
        return 2

    t0 = time.perf_counter()
    log.info("loading base model %r", settings.base)
    try:
        base = in_fresh_thread(load_base, settings.base)  # off the main thread: see svd_adapters/threads.py
    except (FileNotFoundError, OSError, ValueError) as exc:
        log.error("cannot load base model %r: %s", settings.base, exc)
        return 2
    log.info("base model %s loaded in %.1f s", base.name, time.perf_counter() - t0)

    t1 = time.perf_counter()
    factors_dir = Path(settings.factors_dir) if settings.factors_dir else base.cache_dir
    log.info("loading SVD factors (r_max %d) from %s; computed once if missing", settings.r_max, factors_dir)
    factors = in_fresh_thread(load_or_compute, base.model, factors_dir, settings.r_max)
    log.info("SVD factors %s ready in %.1f s (%d matrices)", factors.fingerprint, time.perf_counter() - t1, len(factors.modules))
    if settings.max_rank > factors.r_max:
        log.error("max_rank %d exceeds this base's factor rank %d; lower --max-rank", settings.max_rank, factors.r_max)
        return 2

    try:
        store = open_configured_store(settings)
    except StoreError as exc:
        log.error("cannot open the adapter store: %s", exc)
        return 2
    if not store.ping():
        log.warning("adapter store %r is not reachable now; uploads and cold adapters answer 503 until it is", store)
    log.info("adapter store: %r; device: %s; dtype: %s", store, resolve_device(settings.device), settings.dtype)

    app = create_app(settings, base=base, factors=factors, store=store)
    try:
        # log_config=None: uvicorn's loggers propagate to the root logger, i.e. svdserve's one log format.
        # SIGTERM drains: in-flight requests finish, new ones get 503 shutting_down, then exit 0 (service/graceful.py).
        serve(
            app,
            host=settings.host,
            port=settings.port,
            drain_timeout=settings.shutdown_timeout,
            log_config=None,
            log_level=logging.getLevelName(logging.getLogger().level).lower(),
        )
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
