"""Service settings: defaults, then environment variables, then command-line flags (see `python -m service -h`).

Environment (all optional):
    SVDSERVE_BASE             default | tiny | path to an HF model directory          (default: default)
    REDIS_URL                 redis://… — use the shared Redis store (wins over the disk default)
    SVDSERVE_STORE            a store spec: a directory or a redis:// URL (wins over REDIS_URL)
    SVDSERVE_DATA             data directory; the disk store is $SVDSERVE_DATA/adapters (default ./data)
    SVDSERVE_REDIS_PREFIX     key prefix in Redis                                     (default svdserve:)
    SVDSERVE_HOST / _PORT     where uvicorn listens                                   (127.0.0.1:8000)
    SVDSERVE_DEVICE           auto | cpu | cuda | cuda:N                              (default auto)
    SVDSERVE_DTYPE            float32 | bfloat16 | float16 (GPU only)                 (default float32)
    SVDSERVE_CUDA_GRAPHS      1 | 0: replay GPU decode steps from CUDA graphs          (default 1)
    SVDSERVE_MAX_BATCH, SVDSERVE_MAX_RANK, SVDSERVE_MAX_SEQ_LEN, SVDSERVE_CORE_SLOTS, SVDSERVE_LR_SLOTS,
    SVDSERVE_MAX_WAITING, SVDSERVE_MAX_UPLOAD_BYTES, SVDSERVE_R_MAX, SVDSERVE_FACTORS_DIR
    SVDSERVE_PREFIX_CACHE_TOKENS prompt tokens the prefix cache keeps; 0 = off               (default 8192)
    SVDSERVE_HOST_CACHE_MB    MiB of evicted adapters kept in host memory; 0 = off      (default 1024)
    SVDSERVE_PREFILL_CHUNK_TOKENS a long prompt's tokens prefilled per step while others decode; 0 = off (512)
    SVDSERVE_FAIR_SHARE       1 | 0: admit from the tenant holding the fewest batch rows first (default 1)
    SVDSERVE_SPECULATIVE_TOKENS tokens drafted per decode step by prompt lookup; 0 = off        (default 0)
    SVDSERVE_SPECULATIVE_NGRAM_MAX / _NGRAM_MIN, SVDSERVE_SPECULATIVE_MAX_BATCH    (default 4 / 2, 4 rows)
    SVDSERVE_REQUEST_TIMEOUT  seconds a generation may take, queueing included; 0 = no limit (default 300)
    SVDSERVE_MAX_REQUEST_BYTES largest request body other than adapter uploads (default 1 MiB)
    SVDSERVE_SHUTDOWN_TIMEOUT seconds to drain in-flight requests on SIGTERM (default 30)
    SVDSERVE_AUTH             auto | on | off: tenant API keys (default auto: on when an admin key is set)
    SVDSERVE_ADMIN_KEY        the admin key for /admin/... (tenants and their API keys); see service/auth.py
    SVDSERVE_LORA_MODULES     adapters stored at start-up from server paths, vLLM's `name=path` entries
                              separated by spaces (JSON entries quoted as in a shell); see service/lora_modules.py
    SVDSERVE_ALLOW_RUNTIME_LORA_UPDATING 1 | 0: vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (default 0;
                              vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING=True turns it on too)
    SVDSERVE_LORA_PATH_ROOTS  directories (':'-separated) those paths must lie in; required with API keys on
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path

from adapters_store.validate import DEFAULT_MAX_BYTES
from service.engine import EngineConfig, check_dtype
from service.speculative import SpeculativeConfig
from svd_adapters.factors import DEFAULT_R_MAX

ENV_PREFIX = "SVDSERVE_"
AUTH_MODES = ("auto", "on", "off")


def default_store() -> str:
    """SVDSERVE_STORE, else REDIS_URL, else the disk directory $SVDSERVE_DATA/adapters (./data/adapters)."""
    if spec := os.environ.get(ENV_PREFIX + "STORE"):
        return spec
    if url := os.environ.get("REDIS_URL"):
        return url
    return str(Path(os.environ.get(ENV_PREFIX + "DATA", "data")) / "adapters")


def resolve_device(device: str) -> str:
    """`auto` → cuda when a GPU is visible, else cpu; anything else is passed through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Settings:
    base: str = "default"
    store: str = field(default_factory=default_store)
    redis_prefix: str = "svdserve:"
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = EngineConfig.dtype
    cuda_graphs: bool = EngineConfig.cuda_graphs
    # engine (defaults are the engine's own, so the two never drift apart)
    max_batch: int = EngineConfig.max_batch
    max_rank: int = EngineConfig.max_rank
    max_seq_len: int = EngineConfig.max_seq_len
    core_slots: int = EngineConfig.core_slots
    lr_slots: int = EngineConfig.lr_slots
    max_waiting: int = EngineConfig.max_waiting
    prefix_cache_tokens: int = EngineConfig.prefix_cache_tokens
    host_cache_mb: int = EngineConfig.host_cache_bytes >> 20
    prefill_chunk_tokens: int = EngineConfig.prefill_chunk_tokens
    fair_share: bool = EngineConfig.fair_share
    speculative_tokens: int = SpeculativeConfig.tokens
    speculative_ngram_max: int = SpeculativeConfig.ngram_max
    speculative_ngram_min: int = SpeculativeConfig.ngram_min
    speculative_max_batch: int = SpeculativeConfig.max_batch
    speculative_backoff_max: int = SpeculativeConfig.backoff_max
    speculative_prediction_tokens: int = SpeculativeConfig.prediction_tokens
    shutdown_timeout: float = 30.0
    request_timeout: float = 300.0  # 0 = no limit
    max_request_bytes: int = 1024 * 1024  # bodies of /generate and other JSON routes (uploads: max_upload_bytes)
    # uploads
    max_upload_bytes: int = DEFAULT_MAX_BYTES
    # SVD factors
    r_max: int = DEFAULT_R_MAX
    factors_dir: str | None = None  # default: beside the base model (BaseModel.cache_dir)
    # tenants and API keys (service/auth.py)
    auth: str = "auto"  # auto: on when admin_key is set, off otherwise (single user, tenant "default")
    admin_key: str | None = field(default=None, repr=False)
    # adapters named by server paths, as vLLM names them (service/lora_modules.py)
    lora_modules: tuple[str, ...] = ()
    allow_runtime_lora_updating: bool = False
    lora_path_roots: str | None = None

    @classmethod
    def from_env(cls, **overrides: object) -> "Settings":
        """Defaults ← SVDSERVE_* environment variables ← `overrides` (keys that are None are ignored)."""
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = os.environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and f.name == "lora_modules":
                values[f.name] = tuple(shlex.split(raw))
            elif raw is not None and f.name != "store":  # store: see default_store()
                values[f.name] = _parse(f, raw)
        vllm_flag = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower()
        if "allow_runtime_lora_updating" not in values and vllm_flag in ("1", "true"):  # vLLM's switch, same meaning
            values["allow_runtime_lora_updating"] = True
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        for name in ("max_batch", "max_rank", "max_seq_len", "core_slots", "lr_slots", "max_upload_bytes", "r_max",
                     "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("request_timeout", "shutdown_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0 seconds, got {getattr(self, name)}")
        for name in ("max_waiting", "prefix_cache_tokens", "host_cache_mb", "prefill_chunk_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        block = EngineConfig.prefix_block_tokens
        if 0 < self.prefix_cache_tokens < block:
            raise ValueError(f"prefix_cache_tokens {self.prefix_cache_tokens} holds no {block}-token block; "
                             f"give at least {block}, or 0 to turn the prefix cache off")
        self.speculative.check()
        self.auth = str(self.auth).strip().lower()
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_MODES)}, got {self.auth!r}")
        check_dtype(self.dtype, resolve_device(self.device))
        from service.lora_modules import parse_lora_modules

        self.lora_modules = tuple(self.lora_modules)
        parse_lora_modules(self.lora_modules)  # malformed entries stop the server before the model loads
        if self.max_rank > self.r_max:
            raise ValueError(f"max_rank {self.max_rank} exceeds r_max {self.r_max} (the SVD factors' rank)")

    @property
    def speculative(self) -> SpeculativeConfig:
        return SpeculativeConfig(tokens=self.speculative_tokens, ngram_max=self.speculative_ngram_max,
                                 ngram_min=self.speculative_ngram_min, max_batch=self.speculative_max_batch,
                                 backoff_max=self.speculative_backoff_max,
                                 prediction_tokens=self.speculative_prediction_tokens)

    @property
    def auth_enabled(self) -> bool:
        """auth on, or auto with an admin key configured."""
        return self.auth == "on" or (self.auth == "auto" and bool(self.admin_key))

    @property
    def store_is_redis(self) -> bool:
        from adapters_store import REDIS_SCHEMES

        return self.store.startswith(REDIS_SCHEMES)

    def replace(self, **changes: object) -> "Settings":
        return dataclasses.replace(self, **changes)


def _parse(f: dataclasses.Field, raw: str) -> object:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                    "off": False}[raw.strip().lower()]
    except KeyError:
        raise ValueError(f"environment variable {ENV_PREFIX}{f.name.upper()}={raw!r}: expected 1 or 0") from None
    except ValueError:
        raise ValueError(f"environment variable {ENV_PREFIX}{f.name.upper()}={raw!r} is not a number") from None
    if kind.startswith("str | None"):
        return raw or None  # an empty value means "unset"
    return raw
