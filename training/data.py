"""Training data: JSONL loading, chat-template tokenization with completion-only labels, padding.

A JSONL line is either {"prompt": ..., "completion": ...} or {"messages": [{"role", "content"}, ...]};
for `messages` the last assistant message is the completion and everything before it is the prompt. A
`messages` line may carry OpenAI's function calling: "tools" beside "messages", assistant turns with
"tool_calls", "tool" turns with results; they are written into the text as the server writes them
(service/tool_format.py), so the adapter learns to call tools in the format the server reads back.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from service import tool_format

IGNORE = -100  # label value cross-entropy skips: prompt and padding tokens carry no loss
ROLES = {"system", "user", "assistant", "tool"}


class DataError(ValueError):
    """A bad data file; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    messages: tuple[tuple[str, str], ...]  # the prompt as (role, content) pairs, ending before the answer
    completion: str

    @classmethod
    def from_prompt(cls, prompt: str, completion: str) -> "Example":
        return cls(messages=(("user", prompt),), completion=completion)

    @classmethod
    def from_chat(cls, turns: list[dict[str, str]], completion: str) -> "Example":
        """From {role, content} turns (as tool_format.plain_turns writes them) before the completion."""
        return cls(messages=tuple((t["role"], t["content"]) for t in turns), completion=completion)

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def to_json(self) -> dict:
        if len(self.messages) == 1 and self.messages[0][0] == "user":
            return {"prompt": self.messages[0][1], "completion": self.completion}
        return {"messages": self.chat() + [{"role": "assistant", "content": self.completion}]}


def parse_record(obj: object) -> Example:
    """One decoded JSON line → Example; raises ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            calls = isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls")
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                    isinstance(content, str) or (calls and content is None)):
                raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content' (content may be "
                                 "null on an assistant turn with tool_calls)")
            if m["role"] not in ROLES:
                raise ValueError(f"messages[{i}] has unknown role {m['role']!r} (expected one of {sorted(ROLES)})")
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError("'messages' has no assistant message to learn as the completion")
        if last == 0:
            raise ValueError("the last assistant message has no prompt before it")
        if last != len(msgs) - 1:
            raise ValueError(f"messages[{last + 1}:] come after the last assistant message (nothing would learn them)")
        try:  # tools, tool calls and tool results written as the server writes them (service/tool_format.py)
            functions = tool_format.check_tools(obj["tools"]) if obj.get("tools") is not None else None
            turns = tool_format.plain_turns(msgs, functions)
        except tool_format.ToolFormatError as exc:
            raise ValueError(str(exc)) from None
        completion = turns[-1]["content"]
        if not completion.strip():
            raise ValueError("the last assistant message is empty")
        return Example.from_chat(turns[:-1], completion)
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise ValueError(f"'{key}' must be a string" if key in obj else f"missing '{key}'")
        if not obj["completion"].strip():
            raise ValueError("'completion' is empty")
        return Example.from_prompt(obj["prompt"], obj["completion"])
    raise ValueError("expected keys 'prompt' and 'completion', or 'messages'")


def load_jsonl(path: str | Path) -> list[Example]:
    """Read a JSONL data file; blank lines are skipped, anything else malformed raises DataError(file:line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    examples = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            try:
                examples.append(parse_record(obj))
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def write_jsonl(examples: list[Example], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex.to_json()) + "\n")


def split_holdout(examples: list[Example], frac: float = 0.1, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Deterministic train/test split (seeded shuffle), used when --data comes without --eval-data."""
    if len(examples) < 2:
        raise DataError("need at least 2 examples to split off a held-out part (or pass --eval-data)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test = min(len(examples) - 1, max(1, round(len(examples) * frac)))
    test_idx = set(order[:n_test])
    train = [e for i, e in enumerate(examples) if i not in test_idx]
    test = [e for i, e in enumerate(examples) if i in test_idx]
    return train, test


def prompt_text(tokenizer: PreTrainedTokenizerBase, example: Example) -> str:
    # The same text the model sees at inference: chat template + generation prompt.
    return tokenizer.apply_chat_template(example.chat(), tokenize=False, add_generation_prompt=True)


def encode(tokenizer: PreTrainedTokenizerBase, example: Example, max_len: int = 256) -> tuple[list[int], list[int]]:
    """input_ids and labels: prompt tokens masked with IGNORE, completion + eos learned."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; the completion needs one to stop on")
    prompt_ids = tokenizer(prompt_text(tokenizer, example), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + answer_ids
    labels = [IGNORE] * len(prompt_ids) + answer_ids
    if len(ids) > max_len:
        # Keep the answer: drop prompt tokens from the left (the system prompt goes first).
        ids, labels = ids[-max_len:], labels[-max_len:]
    return ids, labels


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (training); padded positions have attention 0 and label IGNORE."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batches(n: int, batch_size: int, seed: int):
    """Endless stream of index batches: a fresh seeded shuffle every epoch."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n, batch_size):
            chunk = order[i : i + batch_size]
            if len(chunk) < batch_size and n >= batch_size:
                # top up a short tail batch so every step sees batch_size examples
                chunk += order[: batch_size - len(chunk)]
            yield chunk
