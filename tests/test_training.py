"""Trainer: data loading and its errors, label masking, tasks, the loop lowers the loss, eval batching, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters_store.format import adapter_from_bytes_unchecked
from training.__main__ import main
from training.data import IGNORE, DataError, Example, encode, load_jsonl, pad_batch, split_holdout
from training.evaluate import generate
from training.tasks import make_task, task_names
from training.trainer import TrainConfig, lr_lambda, train_adapter

REPO = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = {
    "method", "rank", "trainable_params", "adapter_bytes", "train_loss_first", "train_loss_last",
    "eval_exact_match_before", "eval_exact_match_after", "seconds", "out",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model gains nothing from threads, and on a shared CPU spinning OpenMP threads make it slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tiny_base, tiny_factors):
    return tiny_base, tiny_factors


def write(tmp_path: Path, lines: list[str], name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


# --- data ---

def test_load_prompt_completion_and_messages(tmp_path):
    chat = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]}
    p = write(tmp_path, [json.dumps({"prompt": "a?", "completion": "b"}), "", json.dumps(chat)])
    ex = load_jsonl(p)
    assert ex[0] == Example.from_prompt("a?", "b")
    assert ex[1].completion == "4"  # the last assistant message; earlier turns are prompt
    assert ex[1].messages[-1] == ("user", "2+2?") and len(ex[1].messages) == 4


def test_tool_calling_lines_are_written_as_the_server_writes_them(tmp_path):
    from service import tool_format

    fn = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    turns = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Rain in Oslo."},
    ]
    tools = [{"type": "function", "function": fn}]
    call_line = {"tools": tools, "messages": turns[:2]}
    answer_line = {"tools": tools, "messages": turns}
    first, second = load_jsonl(write(tmp_path, [json.dumps(call_line), json.dumps(answer_line)]))
    # the completion learned is the call block the server parses back; the prompt is what the server renders
    assert first.completion == tool_format.call_text("get_weather", {"city": "Oslo"})
    assert tool_format.parse(first.completion)[1] == [tool_format.ToolCall("get_weather", '{"city": "Oslo"}')]
    served = tool_format.plain_turns(turns[:1], [fn])
    assert first.chat() == served
    assert second.completion == "Rain in Oslo."
    assert second.chat() == tool_format.plain_turns(turns[:3], [fn])
    assert second.messages[-1] == ("user", "<tool_response>\nrain\n</tool_response>")


@pytest.mark.parametrize("line, msg", [
    ("{not json", "invalid JSON"),
    ('{"tools": [{"type": "function", "function": {"name": "a b"}}], "messages": [{"role": "user", "content": "x"}, '
     '{"role": "assistant", "content": "y"}]}', "is not a function name"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": null, "tool_calls": '
     '[{"function": {"name": "f", "arguments": "{"}}]}]}', r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"),
    ('{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "y"}]}', "string 'role' and 'content'"),
    ('["a"]', "expected a JSON object"),
    ('{"prompt": "x"}', "missing 'completion'"),
    ('{"prompt": 3, "completion": "y"}', "'prompt' must be a string"),
    ('{"prompt": "x", "completion": "  "}', "'completion' is empty"),
    ('{"text": "x"}', "expected keys"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "no prompt before it"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}]}', r"messages\[2:\] come after the last assistant"),
])
def test_data_errors_name_the_line(tmp_path, line, msg):
    p = write(tmp_path, [json.dumps({"prompt": "ok", "completion": "ok"}), line])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{msg}"):
        load_jsonl(p)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_jsonl(write(tmp_path, [""]))
    with pytest.raises(DataError, match="no such data file"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_labels_cover_completion_and_eos_only(tiny):
    base, _ = tiny
    tok = base.tokenizer
    ids, labels = encode(tok, Example.from_prompt("Say yes", "yes"))
    learned = [t for t in labels if t != IGNORE]
    assert tok.decode(learned) == "yes<|im_end|>"
    assert labels[: len(ids) - len(learned)] == [IGNORE] * (len(ids) - len(learned))
    assert tok.decode(ids[: len(ids) - len(learned)]).endswith("<|im_start|>assistant\n")
    batch = pad_batch([(ids, labels), ([5, 6], [IGNORE, 7])], pad_id=2)
    assert batch["input_ids"].shape == (2, len(ids))
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (len(ids) - 2)
    assert (batch["labels"][1, 2:] == IGNORE).all()


def test_split_holdout_is_deterministic_and_disjoint():
    data = [Example.from_prompt(str(i), "x") for i in range(50)]
    train, test = split_holdout(data, 0.2, seed=1)
    assert (train, test) == split_holdout(data, 0.2, seed=1)
    assert len(test) == 10 and not set(train) & set(test) and len(train) + len(test) == 50


# --- tasks ---

def test_tasks_deterministic_and_disjoint():
    assert len(task_names()) >= 3
    for name in task_names():
        a, b = make_task(name, n_train=200, n_test=50), make_task(name, n_train=200, n_test=50)
        assert a.train == b.train and a.test == b.test
        assert not {e.messages for e in a.train} & {e.messages for e in a.test}
        assert len(a.train) == 200 and len(a.test) == 50
        assert make_task(name, seed=1, n_train=200, n_test=50).test != a.test


def test_the_tools_task_answers_with_calls_the_server_reads_back():
    from service import tool_format

    task = make_task("tools", n_train=60, n_test=10)
    kinds = set()
    for ex in task.train + task.test:
        system, (role, ask) = ex.messages
        assert system[0] == "system" and "<tools>" in system[1] and role == "user"
        content, calls = tool_format.parse(ex.completion)
        if not calls:
            assert content == ex.completion and content in ask  # a word asked for, said plainly
            kinds.add("word")
            continue
        (call,) = calls
        args = json.loads(call.arguments)
        assert content is None and all(str(v) in ask for v in args.values())  # the arguments come from the question
        kinds.add(call.name)
    assert kinds == {"get_weather", "add", "word"}


# --- trainer ---

def test_lr_schedule_warms_up_and_decays():
    f = lr_lambda(10, 0.2)
    vals = [f(s) for s in range(10)]
    assert vals[:2] == [0.5, 1.0] and vals[-1] == pytest.approx(0.125) and vals == sorted(vals[:2]) + vals[2:]
    assert all(a >= b for a, b in zip(vals[1:], vals[2:]))


@pytest.mark.parametrize("method, lr", [("osora", 1e-1), ("loraxs", 1e-1), ("sorsa", 1e-2), ("lora", 1e-2)])
def test_training_lowers_the_loss(tiny, method, lr):
    base, factors = tiny
    # A constant answer is learnable even by the tiny random model, whose tied 0.02-scale embeddings cap how far
    # any adapter can move the logits (its loss floors near 4.6 nats from log(259) ≈ 5.56).
    data = [Example.from_prompt(f"item {i}", "ok") for i in range(32)]
    before = {n: p.clone() for n, p in base.model.state_dict().items()}
    res = train_adapter(base, factors, data, TrainConfig(method=method, rank=8, steps=60, lr=lr), progress=False)
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < first - 0.3, f"{method}: loss {first:.3f} → {last:.3f}"
    assert res.adapter.trainable_params() > 0
    after = base.model.state_dict()  # the base is untouched and unwrapped again
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_sorsa_training_keeps_factors_near_orthonormal(tiny):
    from svd_adapters import sorsa

    base, factors = tiny
    task = make_task("sentiment", n_train=32, n_test=4)
    cfg = TrainConfig(method="sorsa", rank=8, steps=10, lr=1e-2)
    with_reg = train_adapter(base, factors, task.train, cfg, progress=False)
    no_reg = train_adapter(base, factors, task.train, TrainConfig(**{**cfg.__dict__, "gamma": 0.0}), progress=False)
    r_with = sorsa.orthonormal_regularizer(list(with_reg.adapter.params.values())).item()
    r_without = sorsa.orthonormal_regularizer(list(no_reg.adapter.params.values())).item()
    assert r_with < r_without


# --- evaluation ---

def test_batched_generation_matches_one_by_one(tiny):
    base, _ = tiny
    # Prompts of different lengths, so left padding really happens inside a batch.
    exs = [Example.from_prompt("x" * n, "y") for n in (1, 7, 3, 12)]
    batched = generate(base.model, base.tokenizer, exs, max_new_tokens=5, batch_size=4, progress=False)
    single = [generate(base.model, base.tokenizer, [e], max_new_tokens=5, batch_size=1, progress=False)[0] for e in exs]
    assert batched == single


# --- CLI ---

def test_cli_train_last_line_is_json(tmp_path):
    out = tmp_path / "a.safetensors"
    cmd = [sys.executable, "-m", "training", "train", "--method", "osora", "--rank", "4", "--base", "tiny",
           "--task", "sentiment", "--steps", "3", "--eval-limit", "4", "--out", str(out), "--quiet", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SVDSERVE_HOME": str(tmp_path / "home")}  # factors go there
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert REQUIRED_KEYS <= result.keys()
    assert result["adapter_bytes"] == out.stat().st_size
    adapter = adapter_from_bytes_unchecked(out.read_bytes())
    assert (adapter.method, adapter.rank, adapter.trainable_params()) == ("osora", 4, result["trainable_params"])


def test_cli_eval_and_data_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SVDSERVE_HOME", str(tmp_path / "home"))  # the CLI caches tiny factors there, not in ~
    train = write(tmp_path, [json.dumps({"prompt": f"q{i}", "completion": "a"}) for i in range(10)], "train.jsonl")
    out = tmp_path / "b.safetensors"
    assert main(["train", "--method", "lora", "--rank", "2", "--base", "tiny", "--data", str(train),
                 "--steps", "2", "--out", str(out), "--quiet", "--skip-eval-before"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["eval_exact_match_before"] is None and res["n_train"] == 9 and res["n_eval"] == 1

    assert main(["eval", "--adapter", str(out), "--base", "tiny", "--data", str(train), "--all-data"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_eval"] == 10 and 0.0 <= res["exact_match"] <= 1.0

    # An adapter for another base (here: perturbed fingerprint) is refused with a clear error.
    fp = adapter_from_bytes_unchecked(out.read_bytes()).base_fingerprint.encode()
    (tmp_path / "other.safetensors").write_bytes(out.read_bytes().replace(fp, b"0" * len(fp)))
    assert main(["eval", "--adapter", str(tmp_path / "other.safetensors"), "--base", "tiny", "--task", "sentiment"]) == 2
    assert "fingerprint" in capsys.readouterr().err

    bad = write(tmp_path, [json.dumps({"prompt": "q", "completion": "a"}), "{oops"], "bad.jsonl")
    assert main(["train", "--method", "lora", "--base", "tiny", "--data", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err


# --- the real default model (downloads + converts on first use; cached under ~/.cache/svdserve after) ---

@pytest.mark.real_model
def test_real_default_model_answers_a_chat_prompt():
    from svd_adapters import inject
    from svd_adapters.adapter import new_adapter
    from svd_adapters.base_model import load_base
    from svd_adapters.factors import load_or_compute

    base = load_base("default")
    factors = load_or_compute(base.model, base.cache_dir)
    assert len(factors.modules) == 210 and factors.r_max == 64  # 30 layers × 7 target linears
    ex = Example.from_prompt("What is the capital of France? Answer in one word.", "Paris")
    out = generate(base.model, base.tokenizer, [ex], max_new_tokens=8, progress=False)[0]
    assert "Paris" in out
    # With a freshly initialised OSoRA adapter (zero delta) the greedy answer is the same.
    inject.attach(base.model, new_adapter("osora", 16, factors, base.name), factors)
    try:
        assert generate(base.model, base.tokenizer, [ex], max_new_tokens=8, progress=False)[0] == out
    finally:
        inject.detach(base.model)
