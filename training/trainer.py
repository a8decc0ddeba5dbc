"""The training loop: attach an adapter, AdamW on its tensors only, warmup + linear decay, clip at 1.0.

SORSA follows its reference recipe: after clipping, the gradient of (γ / lr_peak)·R (R the orthonormal
regularizer) is added to U_p / V_p's gradients, so the regularizer is never clipped away and its strength
does not depend on the schedule.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from svd_adapters import inject, sorsa
from svd_adapters.adapter import Adapter, new_adapter
from svd_adapters.base_model import BaseModel
from svd_adapters.factors import TARGET_MODULES, BaseFactors
from svd_adapters.log import get_logger
from training.data import IGNORE, Example, batches, encode, pad_batch

log = get_logger(__name__)

# Peak learning rates that worked on SmolLM2-135M (see bench/RESULTS.md). OSoRA and LoRA-XS train very few
# numbers with a fixed, well-conditioned basis, so they need far larger steps than LoRA's A/B.
DEFAULT_LR = {"osora": 1e-2, "loraxs": 1e-2, "sorsa": 1e-4, "lora": 1e-3}


@dataclass
class TrainConfig:
    method: str
    rank: int = 16
    steps: int = 60
    lr: float | None = None  # None → DEFAULT_LR[method]
    batch_size: int = 8
    alpha: float | None = None  # None → rank (scale 1 for LoRA / LoRA-XS)
    seed: int = 0
    warmup_frac: float = 0.1
    # No decay by default: OSoRA's O (init 1) and S (init σ) and SORSA's factors would be pulled toward 0.
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = 256
    gamma: float = sorsa.GAMMA
    target_modules: tuple[str, ...] = TARGET_MODULES

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


@dataclass
class TrainResult:
    adapter: Adapter
    losses: list[float] = field(default_factory=list)  # per step, before that step's update
    seconds: float = 0.0  # wall clock of the loop
    cpu_seconds: float = 0.0  # process CPU time of the loop (all threads): honest on a shared machine


def lr_lambda(steps: int, warmup_frac: float):
    """Linear warmup to the peak, then linear decay to 0 at the last step."""
    warmup = max(1, math.ceil(steps * warmup_frac)) if warmup_frac > 0 else 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return f


def completion_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over completion tokens.

    The LM head only runs on positions that carry a label: with a 49k vocabulary and a few answer tokens
    per row this is most of the head's cost saved (and logits for the prompt are never needed).
    """
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    decoder, head = getattr(model, "get_decoder", lambda: None)(), model.get_output_embeddings()
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    else:  # any other architecture: full logits
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), labels[keep])


def train_adapter(
    base: BaseModel,
    factors: BaseFactors,
    examples: list[Example],
    cfg: TrainConfig,
    progress: bool = True,
) -> TrainResult:
    """Train a fresh adapter on the examples; the base model is left as it was (adapter detached)."""
    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(cfg.seed)
    model, tok = base.model, base.tokenizer
    device = next(model.parameters()).device
    adapter = new_adapter(cfg.method, cfg.rank, factors, base.name, cfg.alpha, cfg.target_modules, cfg.seed)
    encoded = [encode(tok, e, cfg.max_len) for e in examples]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    wrapped = inject.attach(model, adapter, factors)
    wrapped = {name: mod.to(device) for name, mod in wrapped.items()}
    params = [p for mod in wrapped.values() for p in mod.params.values()]
    opt = torch.optim.AdamW(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.steps, cfg.warmup_frac))
    reg_coef = cfg.gamma / cfg.peak_lr if cfg.method == "sorsa" else 0.0
    log.info(
        "training %s rank %d: %d trainable params, lr %.3g, %d steps × batch %d on %d examples",
        cfg.method, cfg.rank, sum(p.numel() for p in params), cfg.peak_lr, cfg.steps, cfg.batch_size, len(examples),
    )

    losses: list[float] = []
    stream = batches(len(encoded), cfg.batch_size, cfg.seed)
    was_training = model.training
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        bar = tqdm(range(cfg.steps), desc=f"train {cfg.method}", unit="step", disable=not progress)
        for step in bar:
            batch = {k: v.to(device) for k, v in pad_batch([encoded[i] for i in next(stream)], pad_id).items()}
            loss = completion_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if reg_coef:
                reg = sorsa.orthonormal_regularizer([dict(m.params) for m in wrapped.values()])
                (reg_coef * reg).backward()  # accumulates onto the clipped task gradient
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % 10 == 0 or step == cfg.steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        trained = inject.collect(adapter, wrapped)
    finally:
        inject.detach(model)
        model.train(was_training)
    log.info("trained in %.1f s (%.1f CPU s): loss %.4f → %.4f", seconds, cpu_seconds, losses[0], losses[-1])
    return TrainResult(adapter=trained, losses=losses, seconds=seconds, cpu_seconds=cpu_seconds)
