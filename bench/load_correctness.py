"""Load with correctness (issue #5): many tenants' adapters under concurrent clients, every answer checked.

A real server (`python -m service` in a subprocess, or uvicorn in a thread) on a free 127.0.0.1 port, disk
store in a temp dir, auth off. N adapters (OSoRA, LoRA-XS, SORSA, LoRA; ranks 1–8, LoRA up to 16) are
uploaded, then C concurrent clients (httpx.AsyncClient) send R greedy requests over them (plus some for the
base model, and some for request-time merges of two of them — linear, and TIES where two share a method and rank;
some streamed; some with a predicted output: their reference answer, or it with a third replaced). Every answer is
compared with that adapter's (or merge's) solo reference, computed here with the
adapter (the merge's weighted deltas) merged into a copy of the HF model (`svd_adapters.inject`), one prompt at a time:
any difference is a mismatch (cross-tenant leakage shows up as one). The queue is kept small (max_waiting),
so some requests are refused with 429 + Retry-After; clients honour Retry-After and retry. Faults are mixed in
while the load runs: clients that hang up mid-stream, and malformed uploads (each must get a 4xx).

    python bench/load_correctness.py                         # tiny base: 1000 requests, 100 adapters, 64 clients
    python bench/load_correctness.py --base default --requests 300 --max-tokens 8

Prints a table and, last, one line of JSON. Exits 1 if any check failed (mismatch, 5xx, unbounded queue, a bad
upload accepted, a batch row left busy). `run(...)` is the same thing as a function (tests/test_load_correctness.py).
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adapters_store.format import adapter_to_bytes  # noqa: E402
from svd_adapters.adapter import Adapter, new_adapter  # noqa: E402
from svd_adapters.base_model import BaseModel, load_base  # noqa: E402
from svd_adapters.factors import BaseFactors, load_or_compute  # noqa: E402
from svd_adapters.inject import merge_into, merge_weighted_into  # noqa: E402
from svd_adapters.merge import MergeOptions, lowrank_rows, parameter_merge  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Name a primary colour.", "Give me a word that rhymes with cat.",
    "What is 2 plus 3?", "Say hello in Spanish.", "What do bees make?", "Name a planet.", "What is ice?",
    "Spell the word 'tree'.", "Count to five.", "What colour is the sky?", "Name a fruit that is yellow.",
]
METHODS = ("osora", "loraxs", "sorsa", "lora")
# Perturbation from init (tests/conftest.py's make_blob scales), times --scale: 10 on the tiny random base, so
# that every adapter answers differently there (a leak of one tenant's delta into another's row changes the
# text); 1 on a real base, where these already change every answer and stronger ones make the network chaotic
# (float rounding alone then flips greedy choices).
SCALE = {"osora": 0.1, "loraxs": 2.0, "sorsa": 0.05, "lora": 0.1}
NEAR_TIE = 1e-2  # a reference top-2 logit gap below this at the divergence point: float rounding can flip it


# --- adapters and their references ----------------------------------------------------------------------


def make_adapters(n: int, base: BaseModel, factors: BaseFactors, seed: int, scale: float = 1.0) -> dict[str, Adapter]:
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        method = METHODS[i % 4]
        rank = rng.randint(1, 16 if method == "lora" else 8)
        a = new_adapter(method, rank, factors, base.name, seed=seed * 1000 + i)
        g = torch.Generator().manual_seed(seed * 1000 + i)
        for params in a.params.values():
            for k, v in params.items():
                params[k] = v + scale * SCALE[method] * torch.randn(v.shape, generator=g)
        out[f"lc-{i:03d}-{method}-r{rank}"] = a
    return out


def encode(base: BaseModel, prompt: str) -> list[int]:
    """As the server does for a plain prompt: one user turn through the chat template."""
    tok = base.tokenizer
    msgs = [{"role": "user", "content": prompt}]
    if getattr(tok, "chat_template", None) is None:
        return tok.encode(prompt, add_special_tokens=False)
    return list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))


def eos_ids(base: BaseModel) -> set[int]:
    ids = {base.tokenizer.eos_token_id} if base.tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(base.model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    return ids


@torch.no_grad()
def greedy(model, prompt: list[int], max_new: int, eos: set[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens, and at each step the gap between the chosen logit and the runner-up."""
    out: list[int] = []
    gaps: list[float] = []
    res = model(torch.tensor([prompt]), use_cache=True)
    for _ in range(max_new):
        top = torch.topk(res.logits[0, -1].float(), 2)
        tok = int(top.indices[0])
        gaps.append(float(top.values[0] - top.values[1]))
        if tok in eos:
            break
        out.append(tok)
        res = model(torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
    return out, gaps


@dataclass
class Reference:
    text: str
    completion_tokens: int
    finish_reason: str
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # top-2 logit gap at each step

    def divergence(self, got_text: str, tokenizer) -> tuple[int, float | None]:
        """(first step where got_text leaves this reference, the reference's top-2 gap there)."""
        k = 0
        while k < len(self.tokens) and got_text.startswith(
            tokenizer.decode(self.tokens[: k + 1], skip_special_tokens=True).rstrip("\ufffd")
        ):
            k += 1
        return k, (self.gaps[k] if k < len(self.gaps) else None)


def references(base: BaseModel, factors: BaseFactors, adapters: dict[str, Adapter | None],
               prompts_of: dict[str | None, list[int]], max_tokens: int,
               merges: dict[str, dict] | None = None) -> dict[tuple[str | None, int], Reference]:
    """Each (adapter, prompt) alone through the HF model with that adapter merged into its weights; for a merge
    (`merges`: label → its merged_adapters body), its sources' weighted deltas (linear) or their TIES merge."""
    eos = eos_ids(base)
    refs = {}
    for adapter_id, prompt_idx in prompts_of.items():
        model = copy.deepcopy(base.model)
        if merges and adapter_id in merges:
            spec = merges[adapter_id]
            sources = [adapters[i] for i in spec["ids"]]
            if spec["merge_strategy"] == "linear":
                merge_weighted_into(model, list(zip(sources, spec["weights"])), factors)
            else:
                merge_into(model, parameter_merge(sources, spec["weights"], MergeOptions(spec["merge_strategy"]),
                                                  factors), factors)
        elif adapter_id is not None:
            merge_into(model, adapters[adapter_id], factors)
        model.eval()
        for p in prompt_idx:
            ids = encode(base, PROMPTS[p])
            out, gaps = greedy(model, ids, max_tokens, eos)
            text = base.tokenizer.decode(out, skip_special_tokens=True)
            refs[(adapter_id, p)] = Reference(text, len(out), "length" if len(out) == max_tokens else "stop", len(ids), out, gaps)
        del model
    return refs


SERVER_MAX_RANK = 8  # the server's --max-rank: the adapters' ranks are 1–8 (LoRA up to 16 = 2 × 8)


def pick_merges(adapters: dict[str, Adapter], n: int, rng: random.Random) -> dict[str, dict]:
    """n request-time merges of two adapters each (label → merged_adapters body): TIES for a pair of one method at
    one rank where there is one, else linear, within a low-rank slot's rows (2 × the server's max_rank)."""
    ids, out = list(adapters), {}
    pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
    rng.shuffle(pairs)
    same = [p for p in pairs if (adapters[p[0]].method, adapters[p[0]].rank) == (adapters[p[1]].method, adapters[p[1]].rank)]
    for a, b in same[:1] + pairs:
        if len(out) >= n:
            break
        tie = (a, b) in same[:1]
        rows = lowrank_rows([adapters[a].method, adapters[b].method], [adapters[a].rank, adapters[b].rank])
        if not tie and rows > 2 * SERVER_MAX_RANK:
            continue
        out.setdefault(f"merge:{a},{b}", {"ids": [a, b], "weights": [1.0, 0.5] if tie else [0.6, 0.8],
                                          "merge_strategy": "ties" if tie else "linear"})
    return out


# --- malformed uploads mixed into the load --------------------------------------------------------------


def bad_uploads(good: bytes, n: int) -> list[tuple[str, bytes]]:
    import pickle

    n_hdr = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + n_hdr])

    def with_meta(**kv) -> bytes:
        h = json.loads(json.dumps(header))
        h["__metadata__"].update(kv)
        raw = json.dumps(h).encode()
        return len(raw).to_bytes(8, "little") + raw + good[8 + n_hdr :]

    kinds = [
        ("truncated", good[: len(good) // 2]),
        ("empty", b""),
        ("pickle", pickle.dumps({"w": [1.0]}, protocol=4)),
        ("zip", b"PK\x03\x04" + bytes(60)),
        ("fingerprint", with_meta(base_fingerprint="0" * 32)),
        ("unknown_method", with_meta(method="dora")),
        ("rank_lie", with_meta(rank="1" if header["__metadata__"]["rank"] != "1" else "2")),
        ("huge_header", (1 << 40).to_bytes(8, "little") + b"{}"),
        ("garbage", random.Random(5).randbytes(4096)),
        ("trailing", good + b"payload"),
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


# --- the server -------------------------------------------------------------------------------------------


class Server:
    def __init__(self, mode: str, base_spec: str, store_dir: Path, factors_dir: Path, args, base=None, factors=None):
        self.mode, self.port = mode, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.thread = None
        opts = dict(max_batch=args.max_batch, max_waiting=args.max_waiting, core_slots=args.core_slots,
                    lr_slots=args.lr_slots, max_rank=SERVER_MAX_RANK, max_seq_len=512)
        if args.host_cache_mb is not None:
            opts["host_cache_mb"] = args.host_cache_mb
        if args.prefill_chunk_tokens is not None:
            opts["prefill_chunk_tokens"] = args.prefill_chunk_tokens
        if args.speculative_tokens:
            opts["speculative_tokens"] = args.speculative_tokens
        opts["speculative_max_batch"] = args.speculative_max_batch  # predicted outputs draft up to it too
        if mode == "process":
            cmd = [sys.executable, "-m", "service", "--base", base_spec, "--store", str(store_dir), "--host", "127.0.0.1",
                   "--port", str(self.port), "--factors-dir", str(factors_dir), "--device", "cpu", "--auth", "off"]
            for k, v in opts.items():
                cmd += [f"--{k.replace('_', '-')}", str(v)]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "SVDSERVE_AUTH": "off"}
            env.pop("REDIS_URL", None)
            env.pop("SVDSERVE_STORE", None)
            self.log_path = store_dir.parent / "server.log"
            self._log = open(self.log_path, "w")
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        else:
            import threading

            import uvicorn

            from adapters_store.disk import DiskStore
            from service.app import create_app
            from service.config import Settings

            self.store = DiskStore(store_dir)
            settings = Settings(base=base_spec, store=str(store_dir), device="cpu", auth="off", **opts)
            self.app = create_app(settings, base=base, factors=factors, store=self.store)
            self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
            self.thread = threading.Thread(target=self.server.run, daemon=True)
            self.thread.start()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def rss_mib(self) -> float | None:
        pid = self.proc.pid if self.proc is not None else os.getpid()
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._log.close()
        else:
            self.server.should_exit = True
            self.thread.join(timeout=60)
            self.store.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# --- the load ---------------------------------------------------------------------------------------------


@dataclass
class Tally:
    ok: int = 0
    mismatches: list[dict] = field(default_factory=list)
    status: dict[int, int] = field(default_factory=dict)
    retries_429: int = 0
    retry_after_s: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # end to end, retries included
    tokens: int = 0
    streamed: int = 0
    disconnects: int = 0
    predicted: int = 0  # answers to requests carrying a predicted output
    prediction_kept: int = 0  # their prediction tokens drafted and kept
    bad_uploads_refused: dict[str, int] = field(default_factory=dict)
    bad_uploads_accepted: list[str] = field(default_factory=list)
    max_waiting_seen: int = 0
    max_active_seen: int = 0
    errors: list[str] = field(default_factory=list)


def _prediction(job: dict, ref_text: str) -> dict:
    """A predicted output for the job: its reference answer itself, or with its middle third replaced (the
    answer must come out the same either way; only how many drafted tokens are kept differs)."""
    if job.get("predict") is None:
        return {}
    if job["predict"] == "edited":
        third = len(ref_text) // 3
        ref_text = ref_text[:third] + "~" * third + ref_text[2 * third:]
    return {"prediction": ref_text}


async def _one(client: httpx.AsyncClient, job: dict, refs, tally: Tally, tokenizer) -> None:
    target = {"merged_adapters": job["merge"]} if job.get("merge") else {"adapter_id": job["adapter"]}
    ref = refs[(job["adapter"], job["prompt"])]
    body = {**target, "prompt": PROMPTS[job["prompt"]], "max_tokens": job["max_tokens"], **_prediction(job, ref.text)}
    t0 = time.perf_counter()
    while True:
        resp_json: dict = {}
        if job["stream"]:
            async with client.stream("POST", "/generate", json={**body, "stream": True}) as resp:
                status = resp.status_code
                raw = (await resp.aread()).decode()
            answer = None
            if status == 200:
                last = raw.strip().split("\n\n")[-1]
                kind, data = last.split("\n", 1)
                if kind == "event: done":
                    answer = json.loads(data.removeprefix("data: "))
                else:
                    tally.errors.append(f"stream ended with {last[:300]}")
                    status = 599
            elif raw.startswith("{"):
                resp_json = json.loads(raw)
        else:
            resp = await client.post("/generate", json=body)
            status = resp.status_code
            answer = resp.json() if status == 200 else None
            if status != 200 and resp.headers.get("content-type", "").startswith("application/json"):
                resp_json = resp.json()
        tally.status[status] = tally.status.get(status, 0) + 1
        if status == 429:
            tally.retries_429 += 1
            wait = int(resp.headers.get("retry-after", "1"))
            tally.retry_after_s.append(wait)
            await asyncio.sleep(wait)
            continue
        break
    tally.latencies.append(time.perf_counter() - t0)
    if status != 200:
        tally.errors.append(f"{job['adapter']}: HTTP {status} {json.dumps(resp_json)[:300]}")
        return
    got = (answer["text"], answer["usage"]["completion_tokens"], answer["finish_reason"], answer["usage"]["prompt_tokens"])
    want = (ref.text, ref.completion_tokens, ref.finish_reason, ref.prompt_tokens)
    tally.tokens += answer["usage"]["completion_tokens"]
    tally.streamed += job["stream"]
    if job.get("predict"):
        tally.predicted += 1
        tally.prediction_kept += answer["usage"]["accepted_prediction_tokens"]
    if got != want or answer["adapter_id"] != job["adapter"]:
        step, gap = ref.divergence(got[0], tokenizer)
        tally.mismatches.append({"adapter": job["adapter"], "prompt": job["prompt"], "stream": job["stream"],
                                 "got": got, "want": want, "divergence_step": step, "ref_top2_gap": gap,
                                 "near_tie": gap is not None and gap < NEAR_TIE})
    else:
        tally.ok += 1


async def _disconnect(client: httpx.AsyncClient, adapter_id: str, tally: Tally) -> None:
    """A client that hangs up after the first streamed text."""
    body = {"adapter_id": adapter_id, "prompt": PROMPTS[0], "max_tokens": 200, "stream": True}
    try:
        while True:
            async with client.stream("POST", "/generate", json=body) as resp:
                tally.status[resp.status_code] = tally.status.get(resp.status_code, 0) + 1
                if resp.status_code == 200:
                    async for line in resp.aiter_lines():
                        if line.startswith("event: delta"):
                            break
                    # leaving the block closes the connection mid-stream
            if resp.status_code == 429:
                tally.retries_429 += 1
                await asyncio.sleep(int(resp.headers.get("retry-after", "1")))
                continue
            if resp.status_code == 200:
                tally.disconnects += 1
            else:
                tally.errors.append(f"disconnect client: HTTP {resp.status_code}")
            return
    except httpx.HTTPError as exc:
        tally.errors.append(f"disconnect client: {exc!r}")


async def _bad_upload(client: httpx.AsyncClient, kind: str, blob: bytes, i: int, tally: Tally) -> None:
    resp = await client.post("/adapters", files={"file": ("a.safetensors", blob)}, data={"adapter_id": f"bad-{i:04d}"})
    if 400 <= resp.status_code < 500:
        code = resp.json()["error"]["code"]
        tally.bad_uploads_refused[code] = tally.bad_uploads_refused.get(code, 0) + 1
    else:
        tally.bad_uploads_accepted.append(f"{kind}: HTTP {resp.status_code}")
    tally.status[resp.status_code] = tally.status.get(resp.status_code, 0) + 1


async def _watch(client: httpx.AsyncClient, tally: Tally, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            stats = (await client.get("/health")).json()["engine"]
            tally.max_waiting_seen = max(tally.max_waiting_seen, stats["waiting"])
            tally.max_active_seen = max(tally.max_active_seen, stats["active"])
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        await asyncio.sleep(0.05)


async def _load(url: str, jobs: list[dict], refs, clients: int, faults: list, tally: Tally, tokenizer) -> float:
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        queue: asyncio.Queue = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(("job", job))
        for fault in faults:  # spread through the load
            queue.put_nowait(fault)
        items = list(queue._queue)  # type: ignore[attr-defined]
        random.Random(1).shuffle(items)
        queue = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)

        async def worker() -> None:
            while True:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    if item[0] == "job":
                        await _one(client, item[1], refs, tally, tokenizer)
                    elif item[0] == "disconnect":
                        await _disconnect(client, item[1], tally)
                    else:
                        await _bad_upload(client, item[1], item[2], item[3], tally)
                except Exception as exc:  # noqa: BLE001 — a client-side failure is a finding, not a crash
                    tally.errors.append(f"{item[0]}: {exc!r}")

        stop = asyncio.Event()
        watcher = asyncio.ensure_future(_watch(client, tally, stop))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        stop.set()
        await watcher
    return wall


def run(*, base_spec: str = "tiny", n_requests: int = 1000, n_adapters: int = 100, clients: int = 64,
        max_tokens: int = 16, prompts_per_adapter: int = 3, max_batch: int = 32, max_waiting: int = 16,
        core_slots: int = 32, lr_slots: int = 8, base_share: float = 0.05, stream_share: float = 0.2,
        disconnects: int = 50, n_bad_uploads: int = 100, server: str = "process", seed: int = 0,
        factors_dir: Path | None = None, scale: float | None = None, host_cache_mb: int | None = None,
        prefill_chunk_tokens: int | None = None, merges: int = 0, merge_share: float = 0.1,
        speculative_tokens: int = 0, speculative_max_batch: int = 4, prediction_share: float = 0.0,
        log=print) -> dict:
    """The whole benchmark; returns the result dict (see the JSON line)."""
    t_setup = time.perf_counter()
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    if server == "thread":  # the server's per-request logs would drown the report
        for name in ("service", "svd_adapters", "adapters_store", "uvicorn"):
            logging.getLogger(name).setLevel(logging.WARNING)
    base = load_base(base_spec)
    factors_dir = Path(factors_dir) if factors_dir is not None else base.cache_dir
    factors = load_or_compute(base.model, factors_dir)
    scale = scale if scale is not None else (10.0 if base_spec == "tiny" else 1.0)
    adapters = make_adapters(n_adapters, base, factors, seed, scale)
    ids = list(adapters)
    rng = random.Random(seed)
    prompts_of: dict[str | None, list[int]] = {a: rng.sample(range(len(PROMPTS)), prompts_per_adapter) for a in ids}
    prompts_of[None] = list(range(len(PROMPTS)))
    merge_specs = pick_merges(adapters, merges, rng)
    for label, spec in merge_specs.items():
        prompts_of[label] = prompts_of[spec["ids"][0]]
    labels = list(merge_specs)
    jobs = []
    for i in range(n_requests):
        r = rng.random()
        adapter = None if r < base_share else (labels[i % len(labels)] if r < base_share + merge_share and labels
                                                else ids[i % n_adapters])
        predict = rng.choice(("exact", "edited")) if rng.random() < prediction_share else None
        jobs.append({"adapter": adapter, "prompt": rng.choice(prompts_of[adapter]), "max_tokens": max_tokens,
                     "stream": rng.random() < stream_share, "merge": merge_specs.get(adapter), "predict": predict})
    used = {}
    for job in jobs:
        used.setdefault(job["adapter"], set()).add(job["prompt"])
    log(f"computing {sum(len(v) for v in used.values())} solo references (merged weights) ...")
    t_ref = time.perf_counter()
    refs = references(base, factors, {**adapters, None: None}, {a: sorted(p) for a, p in used.items()}, max_tokens,
                      merge_specs)
    ref_s = time.perf_counter() - t_ref
    # not vacuous: adapters really change the answers (how many distinct answers each prompt has)
    distinct = {p: len({refs[k].text for k in refs if k[1] == p}) for p in range(len(PROMPTS))}
    differs_from_base = sum(1 for (a, p), r in refs.items() if a is not None and (None, p) in refs and r.text != refs[(None, p)].text)
    with_base = sum(1 for (a, p) in refs if a is not None and (None, p) in refs)
    # adapters whose answers to the same prompt are unique among all adapters asked that prompt
    by_prompt: dict[int, list[str]] = {}
    for (a, p), r in refs.items():
        if a is not None:
            by_prompt.setdefault(p, []).append(r.text)
    unique_answers = sum(1 for (a, p), r in refs.items() if a is not None and by_prompt[p].count(r.text) == 1)

    tmp = Path(tempfile.mkdtemp(prefix="svdserve-lc-"))

    class Args:
        pass

    args = Args()
    args.max_batch, args.max_waiting, args.core_slots, args.lr_slots = max_batch, max_waiting, core_slots, lr_slots
    args.host_cache_mb = host_cache_mb
    args.prefill_chunk_tokens = prefill_chunk_tokens
    args.speculative_tokens, args.speculative_max_batch = speculative_tokens, speculative_max_batch
    srv = Server(server, base_spec, tmp / "store", factors_dir, args, base=base, factors=factors)
    tally = Tally()
    try:
        srv.wait_ready()
        rss_start = srv.rss_mib()
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            for adapter_id, a in adapters.items():
                r = c.post("/adapters", files={"file": ("a.safetensors", adapter_to_bytes(a))}, data={"adapter_id": adapter_id})
                if r.status_code != 201:
                    raise RuntimeError(f"upload of {adapter_id} failed: {r.status_code} {r.text[:300]}")
        good = adapter_to_bytes(adapters[ids[0]])
        faults = [("disconnect", ids[i % n_adapters]) for i in range(disconnects)]
        faults += [("bad", kind, blob, i) for i, (kind, blob) in enumerate(bad_uploads(good, n_bad_uploads))]
        setup_s = time.perf_counter() - t_setup
        log(f"load: {n_requests} requests, {clients} clients, {disconnects} disconnects, {n_bad_uploads} bad uploads ...")
        wall = asyncio.run(_load(srv.url, jobs, refs, clients, faults, tally, base.tokenizer))
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            # rows of disconnected clients are freed: the engine ends idle
            deadline = time.monotonic() + 30
            while True:
                health = c.get("/health").json()
                if health["engine"]["active"] == 0 and health["engine"]["waiting"] == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            stored = {a["adapter_id"] for a in c.get("/adapters").json()["adapters"]}
        rss_end = srv.rss_mib()
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    engine = health["engine"]
    n5xx = sum(n for s, n in tally.status.items() if s >= 500)
    checks = {
        "zero_mismatches": not tally.mismatches,
        "zero_5xx": n5xx == 0,
        "no_client_errors": not tally.errors,
        "every_request_answered_correctly": tally.ok == n_requests,
        "every_merge_asked": all(any(j["adapter"] == label for j in jobs) for label in merge_specs),
        "queue_bounded": tally.max_waiting_seen <= max_waiting,
        "bad_uploads_all_refused": not tally.bad_uploads_accepted and sum(tally.bad_uploads_refused.values()) == n_bad_uploads,
        "store_holds_exactly_the_good_adapters": stored == set(ids),
        "engine_idle_after": engine["active"] == 0 and engine["waiting"] == 0,
    }
    result = {
        "bench": "load_correctness",
        "base": base.name,
        "server": server,
        "requests": n_requests,
        "adapters": n_adapters,
        "merges": {label: spec["merge_strategy"] for label, spec in merge_specs.items()},
        "merged_requests": sum(1 for j in jobs if j.get("merge")),
        "methods": {m: sum(1 for a in adapters.values() if a.method == m) for m in METHODS},
        "clients": clients,
        "max_tokens": max_tokens,
        "max_batch": max_batch,
        "max_waiting": max_waiting,
        "core_slots": core_slots,
        "lr_slots": lr_slots,
        "answered_ok": tally.ok,
        "mismatches": len(tally.mismatches),
        "mismatches_at_float_near_ties": sum(1 for m in tally.mismatches if m["near_tie"]),
        "adapter_scale": scale,
        "status_counts": {str(k): v for k, v in sorted(tally.status.items())},
        "http_5xx": n5xx,
        "retries_429": tally.retries_429,
        "retry_after_s_max": max(tally.retry_after_s, default=0),
        "streamed": tally.streamed,
        "predicted": tally.predicted,
        "prediction_tokens_kept": tally.prediction_kept,
        "faults_injected": {"client_disconnects": tally.disconnects, "bad_uploads": n_bad_uploads},
        "bad_uploads_refused_by_code": tally.bad_uploads_refused,
        "bad_uploads_accepted": len(tally.bad_uploads_accepted),
        "client_errors": len(tally.errors),
        "wall_s": round(wall, 2),
        "throughput_req_s": round(n_requests / wall, 2),
        "throughput_tok_s": round(tally.tokens / wall, 1),
        "latency_p50_s": round(pct(tally.latencies, 0.5), 3),
        "latency_p99_s": round(pct(tally.latencies, 0.99), 3),
        "max_waiting_seen": tally.max_waiting_seen,
        "max_active_seen": tally.max_active_seen,
        "engine_after": {k: engine.get(k) for k in ("requests", "finished", "cache_evictions", "adapter_loads",
                                                     "rejected_queue_full", "timed_out", "active", "waiting",
                                                     "prefix_cache_hits", "prefix_cached_tokens", "host_cache_hits",
                                                     "prefill_chunks", "spec_steps", "spec_draft_tokens",
                                                     "spec_accepted_tokens")},
        "host_cache_mb": host_cache_mb,
        "server_rss_mib": {"start": rss_start and round(rss_start, 1), "end": rss_end and round(rss_end, 1)},
        "references": {"count": len(refs), "seconds": round(ref_s, 1), "distinct_answers_per_prompt": distinct,
                       "adapter_answers_differing_from_base": f"{differs_from_base}/{with_base}",
                       "adapter_answers_unique_among_adapters": f"{unique_answers}/{len(refs) - len(used.get(None, ()))}"},
        "setup_s": round(setup_s, 1),
        "checks": checks,
        "passed": all(checks.values()),
        "examples": {"mismatches": tally.mismatches[:3], "errors": tally.errors[:5]},
    }
    return result


def print_table(r: dict) -> None:
    print(f"\nLoad with correctness: {r['base']} ({r['server']} server), {r['requests']} requests over {r['adapters']} adapters "
          f"{r['methods']} from {r['clients']} clients, greedy, max_tokens {r['max_tokens']}, max_batch {r['max_batch']}, "
          f"max_waiting {r['max_waiting']}, slots {r['core_slots']} core / {r['lr_slots']} low-rank\n")
    rows = [
        ("answers identical to the solo merged-weights reference", f"{r['answered_ok']} / {r['requests']}"),
        ("mismatches (cross-tenant leakage would show here)", r["mismatches"]),
        (f"… of which at a float near-tie (reference top-2 gap < {NEAR_TIE})", r["mismatches_at_float_near_ties"]),
        ("HTTP 5xx", r["http_5xx"]),
        ("429 queue_full answers (retried after Retry-After)", f"{r['retries_429']} (Retry-After ≤ {r['retry_after_s_max']} s)"),
        ("most requests waiting at once (max_waiting)", f"{r['max_waiting_seen']} ({r['max_waiting']})"),
        ("most rows running at once (max_batch)", f"{r['max_active_seen']} ({r['max_batch']})"),
        ("streamed requests among them", r["streamed"]),
        ("requests with a predicted output (their reference, or it with a third replaced) / its tokens kept",
         f"{r['predicted']} / {r['prediction_tokens_kept']}"),
        ("requests for request-time merges (merges: strategies)",
         f"{r['merged_requests']} ({len(r['merges'])}: {', '.join(sorted(set(r['merges'].values()))) or '—'})"),
        ("faults: clients hanging up mid-stream", r["faults_injected"]["client_disconnects"]),
        ("bad uploads tried / accepted", f"{r['faults_injected']['bad_uploads']} / {r['bad_uploads_accepted']}"),
        ("adapter loads from the store / evictions", f"{r['engine_after']['adapter_loads']} / {r['engine_after']['cache_evictions']}"),
        ("evicted adapters placed again from host memory"
         + (f" (--host-cache-mb {r['host_cache_mb']})" if r["host_cache_mb"] is not None else ""),
         r["engine_after"]["host_cache_hits"]),
        ("prompts continuing a cached prefix (tokens reused)",
         f"{r['engine_after']['prefix_cache_hits']} ({r['engine_after']['prefix_cached_tokens']})"),
        ("prompt chunks prefilled between decode steps (chunked prefill)", r["engine_after"]["prefill_chunks"]),
        ("speculative steps: drafted / kept tokens",
         f"{r['engine_after']['spec_steps']}: {r['engine_after']['spec_draft_tokens']} / "
         f"{r['engine_after']['spec_accepted_tokens']}"),
        ("throughput", f"{r['throughput_req_s']} req/s, {r['throughput_tok_s']} tok/s"),
        ("latency p50 / p99 (retries included)", f"{r['latency_p50_s']} s / {r['latency_p99_s']} s"),
        ("server RSS start → end", f"{r['server_rss_mib']['start']} → {r['server_rss_mib']['end']} MiB"),
        ("adapter answers that differ from the base's", r["references"]["adapter_answers_differing_from_base"]),
        ("adapter answers unique among all adapters (same prompt)", r["references"]["adapter_answers_unique_among_adapters"]),
    ]
    print("| measure | value |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    failed = [k for k, ok in r["checks"].items() if not ok]
    print(f"\nchecks: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    if r["examples"]["mismatches"] or r["examples"]["errors"]:
        print("examples:", json.dumps(r["examples"], ensure_ascii=False)[:2000])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="tiny", help="tiny (default) | default | an HF model directory")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-waiting", type=int, default=16, help="small on purpose: some requests get 429 and retry")
    ap.add_argument("--core-slots", type=int, default=32)
    ap.add_argument("--lr-slots", type=int, default=8)
    ap.add_argument("--host-cache-mb", type=int, default=None, help="the server's host-memory adapter tier (default: its own)")
    ap.add_argument("--prefill-chunk-tokens", type=int, default=None,
                    help="the server's chunked prefill (default: its own, 512; small values chunk these short prompts)")
    ap.add_argument("--merges", type=int, default=8, help="request-time merges of two adapters each mixed into the load")
    ap.add_argument("--merge-share", type=float, default=0.1, help="the share of requests asking for one of them")
    ap.add_argument("--speculative-tokens", type=int, default=0,
                    help="the server's speculative decoding (drafted tokens a step; default 0 = off)")
    ap.add_argument("--speculative-max-batch", type=int, default=4, help="rows up to which it speculates")
    ap.add_argument("--prediction-share", type=float, default=0.2,
                    help="the share of requests carrying a predicted output (their reference answer, or it edited)")
    ap.add_argument("--disconnects", type=int, default=50)
    ap.add_argument("--bad-uploads", type=int, default=100)
    ap.add_argument("--server", choices=("process", "thread"), default="process")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the references (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=None, help="adapter perturbation multiplier (default 10 on tiny, else 1)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    r = run(base_spec=a.base, n_requests=a.requests, n_adapters=a.adapters, clients=a.clients, max_tokens=a.max_tokens,
            max_batch=a.max_batch, max_waiting=a.max_waiting, core_slots=a.core_slots, lr_slots=a.lr_slots,
            disconnects=a.disconnects, n_bad_uploads=a.bad_uploads, server=a.server, seed=a.seed, scale=a.scale,
            host_cache_mb=a.host_cache_mb, prefill_chunk_tokens=a.prefill_chunk_tokens, merges=a.merges,
            merge_share=a.merge_share, speculative_tokens=a.speculative_tokens,
            speculative_max_batch=a.speculative_max_batch, prediction_share=a.prediction_share,
            log=lambda m: print(m, file=sys.stderr, flush=True))
    r["total_s"] = round(time.perf_counter() - t0, 1)
    r["client_max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print_table(r)
    print(json.dumps(r, ensure_ascii=False))
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
