"""Function calling end to end: a tool-calling adapter from svdserve's trainer, served through
/v1/chat/completions, against the base model in the same run.

The held-out prompts of the trainer's built-in `tools` task (two tools offered: a weather question should call
get_weather, a sum should call add, a request for a word should be answered without a call) go to the app (the
real FastAPI app and engine, in process) with `tools` and tool_choice "auto" — the answer read back for call
blocks — and "required" — the answer held to call blocks by grammar; with parallel_tool_calls false to one —
on the base model and on the adapter (uploaded
through POST /adapters). An answer is right when its calls (names and arguments) and its content are exactly the
expected ones. With `--adapter` missing, the adapter is trained first (LoRA-XS r16, 60 steps, as the CLI
`python -m training train --method loraxs --rank 16 --task tools --max-len 320` does).

    python bench/tool_calling.py [--adapter runs/loraxs-tools.safetensors] [--n 60] [--concurrency 8]

Prints a markdown table and a last line of JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from adapters_store.disk import DiskStore  # noqa: E402
from service import tool_format  # noqa: E402
from service.app import create_app  # noqa: E402
from service.config import Settings  # noqa: E402
from svd_adapters.base_model import load_base  # noqa: E402
from svd_adapters.factors import load_or_compute  # noqa: E402
from training.data import Example  # noqa: E402
from training.tasks import TOOL_FUNCTIONS, make_task  # noqa: E402

TOOLS = [{"type": "function", "function": f} for f in TOOL_FUNCTIONS]


def train(base, factors, out: Path, threads: int) -> None:
    import torch

    from adapters_store.format import save_adapter
    from training.trainer import TrainConfig, train_adapter

    torch.set_num_threads(threads)
    print(f"training a LoRA-XS r16 tool-calling adapter into {out} (the `tools` task, 60 steps) …", flush=True)
    result = train_adapter(base, factors, make_task("tools").train,
                           TrainConfig(method="loraxs", rank=16, steps=60, lr=1e-2, max_len=320))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(result.adapter, out)
    print(f"trained in {result.seconds:.0f} s; loss {result.losses[0]:.3f} → {result.losses[-1]:.4f}", flush=True)


def expected(example: Example) -> tuple[str | None, list[tuple[str, dict]]]:
    content, calls = tool_format.parse(example.completion)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def _arguments(text: str) -> dict | str:
    """A call's arguments, or their text when max_tokens cut them (never equal to an expected object)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def score(answer: dict, want: tuple[str | None, list[tuple[str, dict]]]) -> dict[str, bool]:
    msg = answer["choices"][0]["message"]
    got = [(c["function"]["name"], _arguments(c["function"]["arguments"])) for c in msg.get("tool_calls") or []]
    content, calls = want
    return {"exact": got == calls and (msg["content"] or None) == content,
            "called": bool(got), "should_call": bool(calls),
            "name": bool(calls) and [n for n, _ in got] == [n for n, _ in calls]}


async def run(args: argparse.Namespace) -> dict[str, dict]:
    base = load_base(args.base)
    factors = load_or_compute(base.model, base.cache_dir)
    if not args.adapter.exists():
        train(base, factors, args.adapter, args.threads)
    test = make_task("tools").test[: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        store = DiskStore(Path(tmp) / "store")
        settings = Settings(base=args.base, store=repr(store), device="cpu", max_batch=args.concurrency, max_rank=16,
                            max_seq_len=512, core_slots=2, lr_slots=2, max_waiting=256)
        app = create_app(settings, base=base, factors=factors, store=store)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svdserve",
                                         timeout=600) as http:
                resp = await http.post("/adapters", files={"file": ("a.safetensors", args.adapter.read_bytes())},
                                       data={"adapter_id": "tools"})
                if resp.status_code != 201:
                    raise SystemExit(f"upload failed: {resp.status_code} {resp.text}")
                rows = {}
                for model, label in ((base.name, "base"), ("tools", "LoRA-XS r16 `tools` adapter")):
                    for choice, parallel in (("auto", True), ("required", True), ("required", False)):
                        cases = [e for e in test if choice == "auto" or expected(e)[1]]
                        name = f"{label}, {choice}" + ("" if parallel else ", parallel_tool_calls false")
                        rows[name] = await measure(http, model, choice, parallel, cases, args)
        store.close()
    return rows


async def measure(http: httpx.AsyncClient, model: str, choice: str, parallel: bool, cases: list[Example],
                  args: argparse.Namespace) -> dict:
    gate = asyncio.Semaphore(args.concurrency)

    async def one(example: Example) -> tuple[dict, int]:
        messages = [{"role": "user", "content": example.messages[-1][1]}]
        async with gate:
            resp = await http.post("/v1/chat/completions", json={
                "model": model, "messages": messages, "tools": TOOLS, "tool_choice": choice,
                "parallel_tool_calls": parallel, "max_tokens": 48, "temperature": 0})
        if resp.status_code != 200:
            raise SystemExit(f"{model}: {resp.status_code} {resp.text}")
        body = resp.json()
        return score(body, expected(example)), body["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(e) for e in cases))
    seconds = time.perf_counter() - t0
    marks = [m for m, _ in results]
    calls = [m for m in marks if m["should_call"]]
    words = [m for m in marks if not m["should_call"]]
    return {"n": len(marks), "exact": sum(m["exact"] for m in marks) / len(marks),
            "exact_when_due": sum(m["exact"] for m in calls) / max(1, len(calls)),
            "exact_when_not": (sum(m["exact"] for m in words) / len(words)) if words else None,
            "right_function": sum(m["name"] for m in calls) / max(1, len(calls)),
            "call_when_due": sum(m["called"] for m in calls) / max(1, len(calls)),
            "call_when_not": (sum(m["called"] for m in words) / len(words)) if words else None,
            "tokens": sum(t for _, t in results) / len(results), "seconds": seconds}


def report(rows: dict[str, dict], args: argparse.Namespace) -> None:
    print(f"\n{args.n} held-out prompts of the `tools` task (weather, sum or word, drawn at random; tool_choice "
          f"required: only those due a call), greedy, max_tokens 48\n")
    print("| model, tool_choice | prompts | exactly right (calls + content) | … of those due a call | … of the others "
          "| right function | a call when due | a call when not due | tokens / answer | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def share(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    for name, r in rows.items():
        print(f"| {name} | {r['n']} | {r['exact']:.2f} | {r['exact_when_due']:.2f} | {share(r['exact_when_not'])} "
              f"| {r['right_function']:.2f} | {r['call_when_due']:.2f} | {share(r['call_when_not'])} "
              f"| {r['tokens']:.1f} | {r['seconds']:.1f} |")
    print(json.dumps({"bench": "tool_calling", "n": args.n, "rows": rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--adapter", type=Path, default=ROOT / "runs" / "loraxs-tools.safetensors",
                    help="the tool-calling adapter (trained first when the file is missing)")
    ap.add_argument("--n", type=int, default=60, help="held-out prompts (of the task's 100)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads while training")
    args = ap.parse_args()
    report(asyncio.run(run(args)), args)


if __name__ == "__main__":
    main()
