"""Exact-match evaluation: batched greedy generation (left padding), answer stripped, compared exactly."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from svd_adapters import inject
from svd_adapters.adapter import Adapter
from svd_adapters.factors import BaseFactors
from training.data import Example, prompt_text


@dataclass
class EvalResult:
    exact_match: float
    n: int
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, expected, generated), a few


def max_answer_tokens(tokenizer: PreTrainedTokenizerBase, examples: list[Example], slack: int = 2) -> int:
    # Longer outputs can't match exactly anyway; capping generation keeps chatty base answers cheap.
    return max(len(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) for e in examples) + slack


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_new_tokens: int,
    batch_size: int = 32,
    progress: bool = True,
) -> list[str]:
    """Greedy completions for the examples' prompts, decoded without special tokens."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation needs prompts right-aligned
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for i in tqdm(range(0, len(examples), batch_size), desc="eval", unit="batch", disable=not progress):
            texts = [prompt_text(tokenizer, e) for e in examples[i : i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                # explicit greedy: the model's generation_config may carry sampling defaults
                temperature=None,
                top_p=None,
                top_k=None,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    batch_size: int = 32,
    progress: bool = True,
    n_samples: int = 3,
) -> EvalResult:
    if not examples:
        raise ValueError("no examples to evaluate")
    outs = generate(model, tokenizer, examples, max_answer_tokens(tokenizer, examples), batch_size, progress)
    hits = [o.strip() == e.completion.strip() for o, e in zip(outs, examples)]
    samples = [(e.chat()[-1]["content"], e.completion, o) for e, o in zip(examples[:n_samples], outs)]
    return EvalResult(exact_match=sum(hits) / len(hits), n=len(hits), samples=samples)


def evaluate_adapter(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    factors: BaseFactors,
    adapter: Adapter | None,
    examples: list[Example],
    batch_size: int = 32,
    progress: bool = True,
) -> EvalResult:
    """Exact match with the adapter attached (None: the base model); the model is left unwrapped."""
    if adapter is not None:
        if adapter.base_fingerprint != factors.fingerprint:
            raise ValueError(
                f"adapter was trained against base fingerprint {adapter.base_fingerprint} ({adapter.base_model}), "
                f"but this base has {factors.fingerprint}"
            )
        device = next(model.parameters()).device
        for mod in inject.attach(model, adapter, factors).values():
            mod.to(device)  # the factors live on the CPU; the adapted layers go where the model is
    try:
        return exact_match(model, tokenizer, examples, batch_size=batch_size, progress=progress)
    finally:
        inject.detach(model)
