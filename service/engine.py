"""The serving engine: continuous batching over one resident base with per-row adapters.

One engine thread owns the `BatchedRunner` and loops: place adapters that finished loading into device
slots → admit waiting requests whose adapter is resident (prefill them together) → one decode step for
every running row → retire finished rows. A request joins the running batch at the next step and leaves
as soon as it is done. Cold adapters are fetched from the store and validated on a loader thread pool,
so the running batch never waits for them; a request waits only for its own adapter.

The asyncio side talks to the engine through `generate` / `stream`; events come back through
`loop.call_soon_threadsafe`, so the event loop never blocks on the model.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from adapters_store.base import AdapterStore, StoreUnavailable, VersionChanged
from adapters_store.validate import AdapterValidationError, load_adapter
from service import prefill_groups
from service.adapter_cache import AdapterCache
from service.host_tier import HostTier
from service.merges import MergeSpec, key_id, key_sources
from service.prefix_cache import PrefixCache
from service.detokenize import Detokenizer
from service.speculative import SpeculativeConfig, propose, propose_predicted
from service.structured import GrammarError, Grammars, Matcher
from service.sampling import (MAX_LOGPROBS, RowSampling, SamplingParams, TokenHistory, TokenLogprob, logprobs_of,
                              prompt_logprobs_of, sample_batch)
from svd_adapters import merge as merging
from svd_adapters.adapter import Adapter, slot_pool
from svd_adapters.base_model import BaseModel
from svd_adapters.factors import BaseFactors
from svd_adapters.log import get_logger
from svd_adapters.runner import BatchedRunner
from svd_adapters.threads import compute_threads, single_core

log = get_logger(__name__)

__all__ = [
    "Engine", "EngineConfig", "SamplingParams", "GenerationResult", "TextDelta", "TokenLogprob", "EngineError",
    "AdapterNotFound",
    "AdapterUnavailable", "QueueFull", "EngineShuttingDown", "InvalidRequest", "RequestTimeout", "PinLimit",
]


class EngineError(Exception):
    status = 500


class AdapterNotFound(EngineError):
    status = 404


class AdapterUnavailable(EngineError):
    status = 503


class QueueFull(EngineError):
    status = 429

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds; the API answers it as Retry-After


class EngineShuttingDown(EngineError):
    status = 503


class InvalidRequest(EngineError):
    status = 400


class PinLimit(EngineError):
    status = 409


class RequestTimeout(EngineError):
    """The request ran past EngineConfig.request_timeout (waiting or generating); its batch row is freed."""

    status = 504


SERVING_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: str, device: str) -> None:
    """A clear error for a dtype this device cannot serve in."""
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SERVING_DTYPES)}, got {dtype!r}")
    if dtype == "float16" and not str(device).startswith("cuda"):
        raise ValueError("float16 needs a GPU (--device cuda); on the CPU use --dtype bfloat16 or float32")


@dataclass
class EngineConfig:
    max_batch: int = 32
    max_rank: int = 16
    max_seq_len: int = 1024
    core_slots: int = 64
    lr_slots: int = 8
    max_waiting: int = 256
    # prompt tokens a prefill step computes, padding included (as split into calls by length), so one step stays short
    max_prefill_tokens: int = 4096
    # a prefill call's fixed cost in prompt tokens, weighed against padding when a step's prompts are split into
    # calls by length (service/prefill_groups.py); None: the device's default
    prefill_call_tokens: int | None = None
    loader_threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"  # weights, activations and adapter slots; bfloat16 halves the bytes a decode step reads
    request_timeout: float = 0.0  # seconds from arrival until a request is failed with RequestTimeout; 0 = none
    cuda_graphs: bool = True  # on a GPU, replay decode steps from captured graphs (svd_adapters/decode_graphs.py)
    # prompt tokens whose keys and values the prefix cache keeps for later prompts that start alike, in blocks of
    # prefix_block_tokens (service/prefix_cache.py); 0 turns it off
    prefix_cache_tokens: int = 8192
    prefix_block_tokens: int = 16
    # bytes of validated adapters kept in host memory after their device slot is reused, so they come back without
    # the store and the validation (service/host_tier.py); 0 turns it off
    host_cache_bytes: int = 1 << 30
    # a prompt computing more tokens than this while other rows decode is prefilled this many tokens per step,
    # between their decode steps, so they are not stalled for its whole prefill (chunked prefill); 0 turns it off
    prefill_chunk_tokens: int = 512
    # admission takes waiting requests from the tenant holding the fewest batch rows first (FIFO within a tenant),
    # so one tenant's backlog does not hold back every other tenant's requests; False: FIFO across all
    fair_share: bool = True
    # decode steps that feed each row a drafted continuation found in its own context and keep what the model
    # agrees with (service/speculative.py); off by default, like vLLM's
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    adapter_id: str | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when the request asked for them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None first), when asked
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    accepted_prediction_tokens: int = 0  # drafted from its prediction and kept (OpenAI's usage field)
    rejected_prediction_tokens: int = 0  # drafted from its prediction and not kept


@dataclass
class TextDelta:
    """Streamed text, with the log-probabilities of the tokens generated since the previous delta (if asked)."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class _Request:
    id: int
    prompt: list[int]
    adapter_id: str | None
    cache_key: str | None  # adapter_id@sha256 when the caller knows the version: re-uploads never serve stale weights
    params: SamplingParams
    detok: Detokenizer
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    generator: torch.Generator | None
    history: TokenHistory | None = None  # token counts, for requests with penalties (made at admission)
    matcher: Matcher | None = None  # its place in its structured-output grammar (made at admission)
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    out: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    logprobs_sent: int = 0  # entries of logprobs already streamed
    prompt_logprobs: list[TokenLogprob | None] | None = None
    core_slot: int = 0
    lr_slot: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    done: int = 0  # prompt tokens in its row already while it is prefilled in chunks (Engine._partial)
    looked_up: bool = False  # a chunked prompt's cached prefix was looked for
    cancelled: bool = False
    spec_misses: int = 0  # its last drafts rejected outright, in a row (speculative decoding's back-off)
    spec_rest: int = 0  # decode steps it goes on without drafting
    predicted_at: int = 0  # where in its prediction its last draft from it began
    prediction_inflight: list[int] | None = None  # this step's draft, when it came from its prediction
    prediction_from: int = 0  # len(out) when that draft was fed
    prediction_kept: int = 0  # prediction tokens drafted and kept, for its usage
    prediction_drafted: int = 0  # … and drafted

    def prediction_usage(self) -> tuple[int, int]:
        """(kept, drafted and not kept) of its prediction's tokens — also when it finishes in the middle of a
        step verifying a draft from it: that draft's tokens kept so far are those its output matches."""
        kept = self.prediction_kept
        for got, want in zip(self.out[self.prediction_from:], self.prediction_inflight or []):
            if got != want:
                break
            kept += 1
        return kept, self.prediction_drafted - kept
    finish_reason: str | None = None
    method: str = "base"  # its adapter's method once admitted (a metrics label; never the adapter id)
    merge: MergeSpec | None = None  # the adapters its adapter is merged from (cache_key is the merge's)

    @property
    def context(self) -> list[int]:
        """The tokens whose keys and values its row holds before its next step: its prompt, and once it has
        generated (a preempted request resuming) every generated token but the last, which that step feeds."""
        return self.prompt + self.out[:-1] if self.out else self.prompt

    def sampling(self, ending: set[int], vocab: int) -> RowSampling:
        """This step's sampling; `ending`: the engine's EOS ids, banned with stop_token_ids before min_tokens."""
        banned, allowed = (), None
        if self.matcher is not None:  # the grammar alone decides what may come next, its end included
            allowed = self.matcher.allowed(vocab)
        elif len(self.out) < self.params.min_tokens:
            banned = tuple(sorted(ending | set(self.params.stop_token_ids)))
        return RowSampling(self.params, self.generator, self.history, banned, allowed)

    def emit_text(self, text: str) -> None:
        """A delta with the text and every log-probability not yet sent (held back while there is no text)."""
        if text or (self.logprobs_sent < len(self.logprobs) and self.finish_reason is not None):
            self.emit("delta", TextDelta(text, self.logprobs[self.logprobs_sent :]))
            self.logprobs_sent = len(self.logprobs)

    def emit(self, kind: str, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            pass


class Engine:
    def __init__(self, base: BaseModel, factors: BaseFactors, store: AdapterStore, config: EngineConfig | None = None):
        self.base, self.factors, self.store = base, factors, store
        self.config = cfg = config or EngineConfig()
        check_dtype(cfg.dtype, cfg.device)
        cfg.speculative.check()
        self.tokenizer = base.tokenizer
        # The factors were computed (and fingerprinted) from the float32 weights before this cast.
        base.model.to(cfg.device, SERVING_DTYPES[cfg.dtype])
        self.runner = BatchedRunner(base, factors, max_rank=cfg.max_rank, max_batch=cfg.max_batch,
                                    max_seq_len=cfg.max_seq_len, core_slots=cfg.core_slots, lr_slots=cfg.lr_slots,
                                    cuda_graphs=cfg.cuda_graphs)
        self.cache = AdapterCache(cfg.core_slots, cfg.lr_slots)
        self.host_tier = HostTier(cfg.host_cache_bytes)
        self.prefix = (PrefixCache(self.runner, cfg.prefix_cache_tokens, cfg.prefix_block_tokens)
                       if cfg.prefix_cache_tokens > 0 else None)
        if self.prefix is not None:
            log.info("prefix cache: %d blocks of %d tokens (%.0f MB)", self.prefix.blocks, self.prefix.block,
                     self.prefix.nbytes / 2**20)
        if cfg.speculative.tokens:
            spec = cfg.speculative
            log.info("speculative decoding: prompt lookup, %d drafted tokens a step from %d–%d-token n-grams, while at "
                     "most %d rows decode", spec.tokens, spec.ngram_min, spec.ngram_max, spec.max_batch)
        self.prefill_call_tokens = (cfg.prefill_call_tokens if cfg.prefill_call_tokens is not None
                                    else prefill_groups.call_tokens(cfg.device))
        self.eos_ids = self._eos_ids()
        self.grammars = Grammars(self.tokenizer, base.model.config.vocab_size)  # structured output's constraints
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._commands: deque[tuple[str, str]] = deque()  # (verb, adapter_id) from other threads
        self._active: list[_Request] = []  # row i of the KV cache belongs to _active[i]
        # a long prompt being prefilled in chunks between decode steps, in the last KV row (_advance_partial)
        self._partial: _Request | None = None
        self._loading: dict[str, Future] = {}
        self._ready: dict[str, tuple[str, dict]] = {}  # loaded but not yet placed: id → (method, terms)
        self._pins: dict[str, tuple[str, str]] = {}  # adapter id → (its pinned cache key, its pool); under _cond
        # Loaders run torch on one core, and the engine thread on the cores this one has (svd_adapters/threads.py:
        # a second thread computing on several cores would slow every decode step's parallel regions).
        self._loader = ThreadPoolExecutor(max_workers=cfg.loader_threads, thread_name_prefix="adapter-loader",
                                          initializer=single_core)
        self._compute_threads = torch.get_num_threads()
        self._thread: threading.Thread | None = None
        self._running = False
        self.accepting = False
        self.counters = {"requests": 0, "finished": 0, "prompt_tokens": 0, "completion_tokens": 0, "steps": 0,
                         "adapter_loads": 0, "adapter_load_errors": 0, "rejected_queue_full": 0, "timed_out": 0,
                         "failed_at_shutdown": 0, "prefills_shared": 0, "prefill_chunks": 0, "preempted": 0,
                         "resumed": 0, "spec_steps": 0, "spec_draft_tokens": 0, "spec_accepted_tokens": 0,
                         "spec_prediction_draft_tokens": 0, "spec_prediction_accepted_tokens": 0}
        self._finished_at: deque[float] = deque(maxlen=256)  # monotonic finish times, for Retry-After estimates
        self.load_latencies: deque[float] = deque(maxlen=1000)
        self.step_latencies: deque[float] = deque(maxlen=1000)
        self.observers: list = []  # objects with on_* hooks (metrics); called on the engine thread

    # ---------- public API (any thread / event loop) ----------
    def start(self) -> None:
        self._running = True
        self.accepting = True
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def begin_shutdown(self) -> None:
        """Stop accepting: new requests get EngineShuttingDown; admitted and waiting ones go on."""
        with self._cond:  # under the lock: no request can slip into the queue after this returns
            self.accepting = False

    def idle(self) -> bool:
        """Nothing waiting and nothing running."""
        return not self._waiting and not self._active and self._partial is None

    def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting; with drain, let admitted and waiting requests finish (up to timeout).

        Whatever is still waiting or running when the engine stops (no drain, or the drain timed out) is
        failed with EngineShuttingDown, so no caller is left waiting forever.
        """
        self.begin_shutdown()
        deadline = time.monotonic() + timeout
        while drain and not self.idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._fail_all(EngineShuttingDown(
            "the server shut down before this request finished"
            + (f" (it did not finish within the {timeout:g} s drain timeout)" if drain else "")
            + "; retry on another replica"
        ))
        self._loader.shutdown(wait=False, cancel_futures=True)

    def _fail_all(self, err: EngineError) -> None:
        with self._cond:
            left = [r for r in list(self._waiting) + self._in_rows() if r.finish_reason is None]
            self._waiting.clear()
            if self._thread is None or not self._thread.is_alive():
                self._active.clear()  # rows of a stopped engine; never touched while a step might still run
                self._partial = None
        for r in left:
            r.finish_reason = "error"
            r.emit("error", err)
        if left:
            self.counters["failed_at_shutdown"] += len(left)
            log.warning("shutdown: failed %d unfinished request(s)", len(left))

    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None, raw: bool = False) -> list[int]:
        """Token ids for a chat (template applied) or a plain prompt (as one user turn unless raw)."""
        if messages is None and prompt is None:
            raise InvalidRequest("give either 'prompt' or 'messages'")
        if messages is None and raw:
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        msgs = messages if messages is not None else [{"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None) is None:
            return self.tokenizer.encode("\n".join(m["content"] for m in msgs), add_special_tokens=False)
        return list(self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))

    async def encode_prediction(self, text: str | None) -> list[int] | None:
        """A predicted output's token ids (off the event loop), None without one."""
        if not text:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.tokenizer.encode(text, add_special_tokens=False))

    def check_servable(self, adapter: Adapter) -> None:
        """Raise ValueError if this engine's slot pools cannot hold the adapter."""
        R = self.config.max_rank
        limit = 2 * R if adapter.method == "lora" else R
        if adapter.rank > limit:
            raise ValueError(
                f"{adapter.method} rank {adapter.rank} exceeds this server's limit of {limit} "
                f"(max_rank {R}); retrain with --rank {limit} or lower, or start the server with --max-rank {adapter.rank}"
            )

    async def generate(self, prompt_ids: list[int], adapter_id: str | MergeSpec | None, params: SamplingParams,
                       version: str | None = None) -> GenerationResult:
        result = None
        async for item in self.stream(prompt_ids, adapter_id, params, version):
            if isinstance(item, GenerationResult):
                result = item
        assert result is not None
        return result

    async def stream(self, prompt_ids: list[int], adapter_id: str | MergeSpec | None, params: SamplingParams,
                     version: str | None = None) -> AsyncIterator[TextDelta | GenerationResult]:
        """Text deltas as they are generated, then the final GenerationResult. `adapter_id`: an adapter (of known
        `version`, its sha256, when the caller looked it up), a merge of adapters, or None for the base model."""
        req = self._submit(prompt_ids, adapter_id, params, version)
        try:
            while True:
                kind, payload = await req.queue.get()
                if kind == "delta":
                    yield payload
                elif kind == "done":
                    yield payload
                    return
                else:
                    raise payload
        finally:
            if req.finish_reason is None:  # consumer went away (client disconnect): free the batch row
                req.cancelled = True
                self._notify()

    def evict(self, adapter_id: str) -> None:
        """Drop an adapter from the device cache (after a delete), and its pin; running requests finish first."""
        with self._cond:
            self._pins.pop(adapter_id, None)
            self._commands.append(("evict", adapter_id))
            self._cond.notify()

    def pin(self, adapter_id: str, version: str, pool: str, pinned: bool = True) -> None:
        """Keep the adapter of this version in a device slot — loaded now if it is not resident — and out of LRU
        eviction, or (pinned False) let it go again. At most half of a pool's slots are pinned, so pins never starve
        the LRU: PinLimit beyond. `pool`: the adapter's ("core" or "lr", from its method)."""
        with self._cond:
            if pinned and adapter_id not in self._pins:
                held = sum(1 for _, p in self._pins.values() if p == pool)
                limit = self.cache.capacity[pool] // 2
                if held >= limit:
                    raise PinLimit(
                        f"{held} adapters already hold pinned {pool} slots on this replica, its limit ({limit}: half of "
                        f"its {self.cache.capacity[pool]} {pool} slots); unpin one (DELETE /adapters/{{id}}/pin) first")
            if pinned:
                self._pins[adapter_id] = (f"{adapter_id}@{version}", pool)
            else:
                self._pins.pop(adapter_id, None)
            self._commands.append(("pin" if pinned else "unpin", adapter_id))
            self._cond.notify()

    def stats(self) -> dict:
        return {
            "active": len(self._active),
            "prefilling_in_chunks": int(self._partial is not None),
            "waiting": len(self._waiting),
            "loading": len(self._loading),
            "adapters_cached": len(self.cache.resident),
            "adapters_pinned": len(self._pins),
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
            "cache_evictions": self.cache.evictions,
            **{f"host_cache_{k}": v for k, v in self.host_tier.stats().items()},
            **(self.prefix.stats() if self.prefix is not None else {}),
            **self.counters,
        }

    def retry_after(self) -> float:
        """Seconds until the waiting queue has likely drained, from the recent finish rate (1 s when unknown)."""
        now = time.monotonic()
        recent = [t for t in self._finished_at if now - t < 30.0]
        if len(recent) < 2 or now <= recent[0]:
            return 1.0
        rate = len(recent) / (now - recent[0])
        return min(30.0, max(1.0, len(self._waiting) / rate))

    # ---------- submission ----------
    def _submit(self, prompt_ids: list[int], adapter_id: str | MergeSpec | None, params: SamplingParams,
                version: str | None = None) -> _Request:
        if not self.accepting:
            raise EngineShuttingDown("the server is shutting down and takes no new requests; retry on another replica")
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        self.check_token_ids("the prompt", prompt_ids)  # token prompts come from clients (/v1/completions)
        if len(prompt_ids) >= self.config.max_seq_len:
            raise InvalidRequest(
                f"the prompt is {len(prompt_ids)} tokens, over this server's context limit of {self.config.max_seq_len} "
                f"tokens (at most {self.config.max_seq_len - 1} prompt tokens, leaving room to generate); shorten the prompt"
            )
        if params.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1")
        if len(prompt_ids) + params.max_tokens > self.config.max_seq_len:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context limit "
                f"of {self.config.max_seq_len} tokens; shorten the prompt or lower max_tokens"
            )
        self._check_sampling(params)
        gen = None
        if params.temperature > 0:
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        merge = adapter_id if isinstance(adapter_id, MergeSpec) else None
        if merge is not None:
            adapter_id, key = merge.label, merge.cache_key
        else:
            key = None if adapter_id is None else (adapter_id if version is None else f"{adapter_id}@{version}")
        req = _Request(
            id=next(self._ids), prompt=list(prompt_ids), adapter_id=adapter_id, params=params, cache_key=key,
            detok=Detokenizer(self.tokenizer, params.stop), loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(), generator=gen, merge=merge,
        )
        with self._cond:
            if not self.accepting:  # checked again under the lock: shutdown() may have begun meanwhile
                raise EngineShuttingDown("the server is shutting down and takes no new requests; retry on another replica")
            if len(self._waiting) >= self.config.max_waiting and not self._make_room_for(params):
                self.counters["rejected_queue_full"] += 1
                wait = self.retry_after()
                raise QueueFull(
                    f"{len(self._waiting)} requests are already waiting (this server's max_waiting); retry in {wait:.0f} s",
                    retry_after=wait,
                )
            self._waiting.append(req)
            self.counters["requests"] += 1
            self._cond.notify()
        return req

    def _make_room_for(self, params: SamplingParams) -> bool:
        """A full queue takes a request by refusing a waiting one instead (429 queue_full, as it would have been had
        it come later): the newest of the lowest priority (highest value) when that is lower than the new one's;
        else, with fair_share, when another tenant waits with more requests of the new one's priority for its
        weight (by two or more, at equal weights), that tenant's newest: one tenant's backlog cannot fill the queue
        against all the others. Called under the lock; True when a place was freed."""
        worst = max((r.params.priority for r in self._waiting), default=params.priority)
        if worst > params.priority:
            victim = next(r for r in reversed(self._waiting) if r.params.priority == worst)
            why = (f"the queue is full ({self.config.max_waiting} waiting) and this request, the newest of the lowest "
                   f"priority ({worst}), made room for one of priority {params.priority}")
        elif self.config.fair_share:
            counts: dict[str | None, int] = {}
            weight = {params.tenant: params.tenant_weight}
            for r in self._waiting:
                if r.params.priority == params.priority:
                    counts[r.params.tenant] = counts.get(r.params.tenant, 0) + 1
                    weight.setdefault(r.params.tenant, r.params.tenant_weight)
            heaviest = max(counts, key=lambda t: counts[t] / weight[t], default=None)
            # only while the heaviest, one request lighter, still holds as large a share for its weight as the
            # newcomer's tenant one request heavier (equal weights: two or more requests more)
            if (heaviest is None or heaviest == params.tenant or (counts[heaviest] - 1) / weight[heaviest]
                    < (counts.get(params.tenant, 0) + 1) / weight[params.tenant]):
                return False
            victim = next(r for r in reversed(self._waiting)
                          if r.params.tenant == heaviest and r.params.priority == params.priority)
            why = (f"the queue is full and this tenant's requests hold the largest share of it ({counts[heaviest]} of "
                   f"{self.config.max_waiting}); this one, its newest, made room for another tenant's")
        else:
            return False
        self._waiting.remove(victim)
        self.counters["rejected_queue_full"] += 1
        wait = self.retry_after()
        victim.finish_reason = "error"
        victim.emit("error", QueueFull(f"{why}. Retry in {wait:.0f} s", retry_after=wait))
        return True

    def check_token_ids(self, name: str, ids) -> None:
        """InvalidRequest naming the lowest of `ids` outside the model's vocabulary, if any."""
        vocab = self.base.model.config.vocab_size
        bad = sorted(t for t in ids if not 0 <= t < vocab)
        if bad:
            raise InvalidRequest(
                f"{name} names token id {bad[0]}, outside this model's vocabulary of {vocab} tokens (ids 0..{vocab - 1})"
            )

    def _check_sampling(self, params: SamplingParams) -> None:
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            self.check_token_ids(name, ids)
        if not 0 <= params.min_tokens <= params.max_tokens:
            raise InvalidRequest(f"min_tokens must be between 0 and max_tokens ({params.max_tokens}), got {params.min_tokens}")
        if params.top_k < 0 or not 0.0 < params.top_p <= 1.0 or not 0.0 <= params.min_p <= 1.0 or params.repetition_penalty <= 0:
            raise InvalidRequest("top_k must be ≥ 0, top_p in (0, 1], min_p in [0, 1] and repetition_penalty > 0")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise InvalidRequest(f"{name} asks for 0 to {MAX_LOGPROBS} alternatives per token, got {k}")

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---------- engine thread ----------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        compute_threads(self._compute_threads)
        while self._running:
            try:
                self._run_commands()
                if self._expire():
                    self._retire()
                self._place_loaded()
                self._preempt()
                admitted = self._admit()
                # a chunked prompt's next chunk; its last one joins this step's other new prompts
                admitted += self._advance_partial(len(self._active) + len(admitted))
                resumed = [r for r in admitted if r.out]  # preempted ones: first, in their rows' order
                if resumed:
                    self._resume(resumed)
                    admitted = [r for r in admitted if not r.out]
                if admitted:
                    self._prefill(admitted)
                    self._retire()  # a request can end at its first token (EOS, stop string, max_tokens 1)
                if self._active:
                    self._decode()
                self._retire()
            except Exception as exc:  # a bug must fail the requests in flight, not kill the engine silently
                log.exception("engine step failed")
                for req in self._in_rows():
                    self._finish(req, error=EngineError(f"internal error: {exc}"))
                self._drop_partial()
                self._retire()
            with self._cond:
                if self._running and not self._active and self._partial is None and not self._has_admissible():
                    self._cond.wait(timeout=0.05)

    def _has_admissible(self) -> bool:
        return bool(self._commands) or any(
            r.cancelled or r.cache_key is None or r.cache_key in self.cache.resident
            or (r.cache_key not in self._loading and r.cache_key not in self._ready)
            for r in self._waiting
        ) or any(f.done() for f in self._loading.values()) or bool(self._ready)

    def _expire(self) -> bool:
        """Fail requests older than request_timeout with RequestTimeout; True if a running row was among them."""
        limit = self.config.request_timeout
        if not limit or limit <= 0:
            return False
        now = time.monotonic()
        with self._cond:
            late = [r for r in self._waiting if not r.cancelled and now - r.arrived > limit]
            for r in late:
                self._waiting.remove(r)
        for r in late:
            r.finish_reason = "error"
            r.emit("error", RequestTimeout(
                f"the request waited {now - r.arrived:.1f} s without being scheduled (a batch row or its adapter), past "
                f"this server's request timeout of {limit:g} s; the server is overloaded or the adapter store is slow. "
                "Retry later"
            ))
        running = [r for r in self._in_rows() if r.finish_reason is None and not r.cancelled and now - r.arrived > limit]
        for r in running:
            self._finish(r, error=RequestTimeout(
                f"the request ran past this server's request timeout of {limit:g} s after {len(r.out)} generated tokens "
                f"(of max_tokens {r.params.max_tokens}); lower max_tokens, or retry when the server is less busy"
            ))
        if late or running:
            self.counters["timed_out"] += len(late) + len(running)
        return bool(running)

    def _run_commands(self) -> None:
        while self._commands:
            with self._cond:
                verb, adapter_id = self._commands.popleft()
            if verb == "evict":  # every cached version of the adapter, in both tiers
                self.host_tier.drop(adapter_id)
                for key in [k for k in list(self.cache.resident) + list(self._ready) if adapter_id in key_sources(k)]:
                    self._ready.pop(key, None)
                    res = self.cache.get(key)
                    if res is not None and not self.cache.remove(key):  # still in use: retry after running requests release it
                        with self._cond:
                            self._commands.append((verb, adapter_id))
                        return
            elif verb in ("pin", "unpin"):
                with self._cond:
                    wanted = self._pins.get(adapter_id, (None, None))[0]
                for key in [k for k in self.cache.resident if key_id(k) == adapter_id]:
                    self.cache.pin(key, key == wanted)
                if wanted is not None and wanted not in self.cache.resident:
                    self._start_load(wanted)  # pinned once placed (_place_ready)

    def _load(self, key: str, merge: MergeSpec | None = None) -> tuple[str, dict, float]:
        """Loader thread: fetch, validate, and turn into slot terms (all CPU work off the engine thread); a merge's
        sources merged."""
        t0 = time.perf_counter()
        if merge is not None:
            method, terms = self._merged(merge)
            return method, terms, time.perf_counter() - t0
        adapter_id, _, version = key.partition("@")
        adapter = self._fetch(adapter_id, version)
        return adapter.method, adapter.terms(self.factors), time.perf_counter() - t0

    def _fetch(self, adapter_id: str, version: str | None) -> Adapter:
        """Loader thread: an adapter from the store, checked against its version, validated, servable here."""
        try:
            # the store checks the blob against its record's sha256, and the record's against the version wanted
            blob = self.store.get_blob(adapter_id, expect_sha256=version or None)
        except StoreUnavailable as exc:
            raise AdapterUnavailable(
                f"adapter {adapter_id!r} is not cached on this replica and the adapter store is unreachable ({exc}); retry shortly"
            ) from exc
        except VersionChanged as exc:
            raise AdapterUnavailable(f"adapter {adapter_id!r} was replaced while it was loading; retry") from exc
        if blob is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} not found; upload it with POST /adapters or list them with GET /adapters")
        try:
            adapter = load_adapter(blob, self.factors)
            self.check_servable(adapter)
        except (AdapterValidationError, ValueError) as exc:
            raise AdapterUnavailable(f"stored adapter {adapter_id!r} cannot be served: {exc}") from exc
        return adapter

    def _merged(self, spec: MergeSpec) -> tuple[str, dict]:
        """Loader thread: a merge's (method, slot terms). A linear merge works on its sources' slot terms, so
        sources the host tier holds need no store round trip (and fetched ones are kept there); ties / dare work on
        their parameters, fetched from the store."""
        try:
            if spec.options.strategy == "linear":
                merged = merging.linear([self._source_terms(*source) for source in spec.sources], spec.weights,
                                        self.factors)
                merging.check_rows(merged.lowrank_rows, self.config.max_rank)
            else:
                merged = merging.merge([self._fetch(*source) for source in spec.sources], spec.weights, spec.options,
                                       self.factors, self.config.max_rank, seed=spec.seed)
        except ValueError as exc:
            raise AdapterUnavailable(f"the merge {spec.label} cannot be served: {exc}") from exc
        return merged.method, merged.terms

    def _source_terms(self, adapter_id: str, version: str) -> tuple[str, dict]:
        key = f"{adapter_id}@{version}"
        entry = self.host_tier.get(key)
        if entry is not None:
            return entry.method, entry.terms
        adapter = self._fetch(adapter_id, version)
        terms = adapter.terms(self.factors)
        self.host_tier.put(key, adapter.method, terms)
        return adapter.method, terms

    def _place_loaded(self) -> None:
        for key, fut in list(self._loading.items()):
            if not fut.done():
                continue
            del self._loading[key]
            try:
                method, terms, seconds = fut.result()
            except Exception as exc:
                self.counters["adapter_load_errors"] += 1
                for obs in self.observers:
                    obs.on_adapter_load_error(exc)
                err = exc if isinstance(exc, EngineError) else EngineError(f"loading adapter {key_id(key)!r} failed: {exc}")
                self._fail_waiting(key, err)
                continue
            self.counters["adapter_loads"] += 1
            self.load_latencies.append(seconds)
            for obs in self.observers:
                obs.on_adapter_load(method, seconds)
            self.host_tier.put(key, method, terms)
            self._ready[key] = (method, terms)
        for key in list(self._ready):
            self._place_ready(key)

    def _place_ready(self, key: str) -> bool:
        """Write a loaded adapter into a slot of its pool (a free one, else the least recently used idle one);
        False while every slot of that pool is in use by running requests (it waits in _ready)."""
        method, terms = self._ready[key]
        pool = slot_pool(terms)
        if not self.cache.can_place(pool):
            return False
        res, evicted = self.cache.place(key, method, pool)
        with self._cond:
            if self._pins.get(key_id(key), (None,))[0] == key:
                self.cache.pin(key)
        if evicted is not None:
            for obs in self.observers:
                obs.on_eviction(res.pool)
        if res.pool == "core":
            self.runner.write_core_slot(res.slot, terms)
        else:
            self.runner.write_lr_slot(res.slot, terms)
        del self._ready[key]
        return True

    def _fail_waiting(self, key: str, err: Exception) -> None:
        with self._cond:
            failed = [r for r in self._waiting if r.cache_key == key]
            for r in failed:
                self._waiting.remove(r)
        for r in failed:
            r.finish_reason = "error"
            r.emit("error", err)

    def _admit(self) -> list[_Request]:
        """Waiting requests whose adapter is resident, in `_admission_order` (fair share across tenants, FIFO within
        one), up to the free rows and the prefill budget. A prompt
        that would compute more than prefill_chunk_tokens while rows decode becomes the chunked one (`_partial`,
        one at a time) instead: it takes the last row and is prefilled by `_advance_partial`."""
        admitted: list[_Request] = []
        free_rows = self.config.max_batch - len(self._active) - (self._partial is not None)
        lengths: list[int] = []  # what the admitted prompts compute: past their cached prefixes
        with self._cond:
            for req in self._admission_order() if free_rows > 0 else list(self._waiting):
                if req.cancelled:
                    self._waiting.remove(req)
                    req.finish_reason = "cancelled"
                    continue
                if len(admitted) >= free_rows:
                    break
                key = req.cache_key
                if key is not None and "@" not in key and key not in self.cache.resident:
                    # version unknown (store unreachable at the API): any resident copy of this id serves, else the
                    # host tier's newest
                    key = req.cache_key = next((k for k in reversed(self.cache.resident) if key_id(k) == key),
                                               None) or self.host_tier.newest(key) or key
                computes = len(req.context) - self._cached_prefix(req)
                chunked = self._chunked(req, computes)
                if chunked and self._partial is not None:
                    continue  # one chunked prompt at a time; shorter ones behind it go on being admitted
                if not chunked and admitted and not prefill_groups.fits(lengths + [computes], self.prefill_call_tokens,
                                                                        self.config.max_prefill_tokens):
                    break
                if key is not None:
                    if not self._adapter_ready(req):
                        continue
                    res = self.cache.acquire(key)
                    req.method = res.method
                    for obs in self.observers:
                        obs.on_cache_hit(res.method)
                    if res.pool == "core":
                        req.core_slot = res.slot
                    else:
                        req.lr_slot = res.slot
                self._waiting.remove(req)
                if chunked:
                    self._partial = req
                    free_rows -= 1
                else:
                    admitted.append(req)
                    lengths.append(computes)
        return admitted

    def _chunked(self, req: _Request, computes: int) -> bool:
        """Whether admission makes `req`, computing this many prompt tokens, the chunked prompt (`_partial`)."""
        chunk = self.config.prefill_chunk_tokens
        return 0 < chunk < computes and bool(self._active) and req.params.prompt_logprobs is None and not req.out

    def _adapter_ready(self, req: _Request) -> bool:
        """Whether the waiting request's adapter is in a slot, starting its load if it is nowhere yet: from host
        memory it is placed now, in this step (requests admitted before hold their slots, so the eviction cannot
        take theirs); from the store it waits for its own adapter only."""
        key = req.cache_key
        if key in self.cache.resident:
            return True
        self._start_load(key, req.merge)
        return key in self._ready and self._place_ready(key)

    def _start_load(self, key: str, merge: MergeSpec | None = None) -> None:
        """An adapter that is nowhere yet (not loading, not loaded): from host memory into _ready now, else a
        loader thread fetches it from the store."""
        if key in self._loading or key in self._ready:
            return
        self.cache.misses += 1
        for obs in self.observers:
            obs.on_cache_miss()
        if not self._from_host_tier(key):
            fut = self._loader.submit(self._load, key, merge)
            fut.add_done_callback(lambda _: self._notify())  # wake the engine: it is ready
            self._loading[key] = fut

    def _preempt(self) -> None:
        """A waiting request of a lower priority value than a running one takes that one's place (vLLM's
        preemption by recomputation) when it has none: with every row taken, the running request of the highest
        value (its newest) goes back to the queue keeping what it generated, its keys and values into the prefix
        cache where one is on, and is resumed when a row is free for it (`_resume`), its stream paused meanwhile;
        and when the waiting request's adapter is loaded but every slot of its pool is held by running requests,
        the worst of those holding a slot alone is preempted so that slot can take it. A cold adapter's load is
        started first (it preempts once loaded). Equal priorities never preempt."""
        if not self._waiting or not self._active:
            return
        running = max(r.params.priority for r in self._active)
        with self._cond:
            urgent = sorted((r for r in self._waiting if r.params.priority < running and not r.cancelled),
                            key=lambda r: (r.params.priority, r.id))
        free = self.config.max_batch - len(self._active) - (self._partial is not None)
        for want in urgent:
            if self._partial is not None and self._chunked(want, len(want.context) - self._cached_prefix(want)):
                continue  # admission would leave it waiting for the chunked prompt: a preemption would be wasted
            victims = sorted((r for r in self._active if r.finish_reason is None and not r.cancelled
                              and r.params.priority > want.params.priority), key=lambda r: (-r.params.priority, -r.id))
            with self._cond:
                ready = want.cache_key is None or self._adapter_ready(want)
            if not ready:
                holder = self._slot_holder(want, victims)
                if holder is None:
                    continue  # still loading, or no slot a preemption could free: it waits
                self._preempt_row(holder)
                free += 1
                with self._cond:
                    if not self._adapter_ready(want):
                        continue
            if free > 0:
                free -= 1  # a row is free for it
            elif victims:
                self._preempt_row(victims[0])  # its row goes to `want` at this step's admission
            else:
                break

    def _slot_holder(self, want: _Request, victims: list[_Request]) -> _Request | None:
        """The first of `victims` (worst first) whose preemption frees a slot of the pool `want`'s loaded adapter
        needs: it holds one that no other running request reads (nor is pinned)."""
        loaded = self._ready.get(want.cache_key)
        if loaded is None:
            return None
        pool = slot_pool(loaded[1])
        for v in victims:
            res = self.cache.resident.get(v.cache_key) if v.cache_key is not None else None
            if res is not None and res.pool == pool and res.refcount == 1 and not res.pinned:
                return v
        return None

    def _preempt_row(self, req: _Request) -> None:
        row = self._active.index(req)
        if self.prefix is not None and len(req.context) >= self.prefix.block:
            self.prefix.store(self._prefix_key(req, req.core_slot, req.lr_slot), req.context, row)
        self._drop_row(row)
        req.core_slot = req.lr_slot = 0
        with self._cond:
            self._waiting.appendleft(req)
        self.counters["preempted"] += 1

    def _resume(self, reqs: list[_Request]) -> None:
        """Preempted requests back into rows: their context (prompt and generated tokens but the last) recomputed
        into the row, past what the prefix cache holds of it; nothing is sampled — their next decode step feeds
        their last token, as it would have without the pause."""
        start = len(self._active)
        self._active.extend(reqs)  # first: if this fails, the step's error handler fails them and frees their slots
        rows = list(range(start, start + len(reqs)))
        work = [(self._prefix_key(r, r.core_slot, r.lr_slot), r.context, row) for r, row in zip(reqs, rows)]
        starts = self.prefix.load_many(work) if self.prefix is not None else [0] * len(reqs)
        todo = [i for i, (_, ctx, _) in enumerate(work) if starts[i] < len(ctx)]
        if todo:
            self.runner.prefill([work[i][1][starts[i]:] for i in todo], [rows[i] for i in todo],
                                [reqs[i].core_slot for i in todo], [reqs[i].lr_slot for i in todo],
                                starts=[starts[i] for i in todo])
        self.counters["resumed"] += len(reqs)

    def _admission_order(self) -> list[_Request]:
        """The waiting requests in the order admission tries them: lower priority values first; within one
        priority FIFO, or with fair_share the tenant holding the fewest rows (running, chunked, and taken earlier
        in this order) first, ties to the earliest arrival: a tenant that queued a hundred requests gets one row in
        turn with a tenant that queued one."""
        levels: dict[int, list[_Request]] = {}
        for req in self._waiting:
            levels.setdefault(req.params.priority, []).append(req)
        if not self.config.fair_share:
            return [r for p in sorted(levels) for r in levels[p]]
        held: dict[str | None, int] = {}
        for req in self._in_rows():
            held[req.params.tenant] = held.get(req.params.tenant, 0) + 1
        return [r for p in sorted(levels) for r in self._fair_order(levels[p], held)]

    @staticmethod
    def _fair_order(reqs: list[_Request], held: dict[str | None, int]) -> list[_Request]:
        """`reqs` (in arrival order) with the tenant holding the fewest rows for its weight (rows / tenant_weight)
        first, one at a time; `held` counts each tenant's rows and is updated as if every request were taken."""
        queues: dict[str | None, deque[_Request]] = {}
        for req in reqs:
            queues.setdefault(req.params.tenant, deque()).append(req)
        weight = {t: q[0].params.tenant_weight for t, q in queues.items()}
        heap = [(held.get(t, 0) / weight[t], q[0].id, t) for t, q in queues.items()]  # ids grow with arrival
        heapq.heapify(heap)
        order: list[_Request] = []
        while heap:
            _, _, t = heapq.heappop(heap)
            q = queues[t]
            order.append(q.popleft())
            held[t] = held.get(t, 0) + 1
            if q:
                heapq.heappush(heap, (held[t] / weight[t], q[0].id, t))
        return order

    def _advance_partial(self, first_free_row: int) -> list[_Request]:
        """Prefill the chunked prompt's next chunk into the last row; its last chunk is left to this step's
        prefill of new prompts (returned, its row moved to `first_free_row`), which samples its first token and
        makes it a decoding row. With no row decoding there is nothing to interleave with: the rest goes at once."""
        req = self._partial
        if req is None:
            return []
        if req.cancelled or req.finish_reason is not None:  # cancelled, timed out or failed while prefilling
            req.finish_reason = req.finish_reason or "cancelled"
            self._drop_partial()
            return []
        row = self.config.max_batch - 1
        if not req.looked_up:
            req.looked_up = True
            if self.prefix is not None:
                state = self._prefix_key(req, req.core_slot, req.lr_slot)
                req.done = req.cached_tokens = self.prefix.load_many([(state, req.prompt, row)])[0]
        chunk = self.config.prefill_chunk_tokens
        if self._active and len(req.prompt) - req.done > chunk:
            t0 = time.perf_counter()
            self.runner.prefill([req.prompt[req.done : req.done + chunk]], [row], [req.core_slot], [req.lr_slot],
                                starts=[req.done])
            req.done += chunk
            self.counters["prefill_chunks"] += 1
            for obs in self.observers:
                obs.on_step("prefill_chunk", time.perf_counter() - t0, 1)
            return []
        if req.done and first_free_row != row:
            self.runner.move_row(row, first_free_row, req.done)
        self._partial = None
        return [req]

    def _in_rows(self) -> list[_Request]:
        """Every request holding a KV row: the decoding ones and the one being prefilled in chunks."""
        return self._active + ([self._partial] if self._partial is not None else [])

    def _drop_partial(self) -> None:
        """Forget the chunked prompt (it ended before its last chunk); its adapter slot is free again."""
        req, self._partial = self._partial, None
        if req is not None and req.adapter_id is not None:
            self.cache.release(req.cache_key)

    def _from_host_tier(self, key: str) -> bool:
        """Queue an adapter the host tier holds for placing (_ready), as if a loader had just loaded it."""
        if "@" not in key:
            return False
        entry = self.host_tier.get(key)
        if entry is None:
            return False
        self._ready[key] = (entry.method, entry.terms)
        return True

    def _cached_prefix(self, req: _Request) -> int:
        """Prompt tokens of `req` the prefix cache holds now (0 for a prompt that is scored whole): what admission
        leaves out of the step's prefill budget."""
        if self.prefix is None or req.params.prompt_logprobs is not None:
            return 0
        core = lr = 0
        key = req.cache_key
        if key is not None and "@" not in key:  # keyed by its slot (below): only a resident copy has cached blocks
            res = self.cache.resident.get(key)
            if res is None:
                return 0
            core, lr = (res.slot, 0) if res.pool == "core" else (0, res.slot)
        return self.prefix.cached(self._prefix_key(req, core, lr), req.context)

    def _prefix_key(self, req: _Request, core_slot: int, lr_slot: int) -> tuple:
        """What the prefix cache keys a request's blocks by besides their tokens: what its row computes with, and
        its scope (tenant and cache_salt: who may reuse them). An adapter of known version (id@sha256) is its
        content, the same in any slot, so its cached prefixes outlive its eviction and reload; one whose version
        is unknown (the store was unreachable at the API) is its slot as written (`BatchedRunner.adapter_state`)."""
        key = req.cache_key
        if key is None:
            what: tuple = ("base",)
        elif "@" in key:
            what = ("adapter", key)
        else:
            what = self.runner.adapter_state(core_slot, lr_slot)
        return (*what, req.params.prefix_scope)

    def _prefill(self, reqs: list[_Request]) -> None:
        t0 = time.perf_counter()
        start = len(self._active)
        self._active.extend(reqs)  # first: if the prefill fails, the step's error handler fails them and frees their slots
        logits = self._run_prompts(reqs, list(range(start, start + len(reqs))))
        for req in reqs:
            if req.params.penalized:
                req.history = TokenHistory(req.prompt, logits.shape[-1])
            if req.params.grammar is not None:
                try:
                    req.matcher = self.grammars.matcher(req.params.grammar)
                except Exception as exc:  # this request's alone (its grammar was checked at the API already)
                    self._finish(req, error=InvalidRequest(f"the output constraint could not be set up: {exc}"))
        sampling = [r.sampling(self.eos_ids, logits.shape[-1]) for r in reqs]
        tokens = sample_batch(logits, sampling)
        now = time.monotonic()
        for req, tok, lp in zip(reqs, tokens, logprobs_of(logits, sampling, tokens)):
            req.first_token_at = now
            self.counters["prompt_tokens"] += len(req.prompt)
            for obs in self.observers:
                obs.on_first_token(now - req.arrived, req.method, len(req.prompt))
            if req.finish_reason is None:
                self._accept_token(req, tok, lp)
        for obs in self.observers:
            obs.on_step("prefill", time.perf_counter() - t0, len(reqs))

    def _run_prompts(self, reqs: list[_Request], rows: list[int]) -> torch.Tensor:
        """The requests' prompts into KV rows `rows`: each one's last-token logits (and its prompt logprobs where
        asked). Identical prompts on the same adapter and of the same prefix scope (an API request's n choices, a
        client's retries) run once; the others copy that row's cache and logits, which are the same numbers. (Not
        across scopes: a request would report, as its cached_tokens, a prefix that another tenant's cache held.)"""
        first: dict[tuple, int] = {}
        # (a chunked prompt's row holds its own progress: never shared)
        source = [first.setdefault((r.core_slot, r.lr_slot, r.params.prefix_scope, tuple(r.prompt), r.done and r.id),
                                   len(first)) for r in reqs]
        unique = [source.index(j) for j in range(len(first))]  # each distinct prompt's first request
        scored = {source[i] for i, r in enumerate(reqs) if r.params.prompt_logprobs is not None}
        states = [self._prefix_key(reqs[i], reqs[i].core_slot, reqs[i].lr_slot) for i in unique]
        # a cached prefix goes into the row first, and only the rest is computed (not for prompts scored whole)
        starts = [reqs[i].done for i in unique]  # a chunked prompt's last chunk continues its earlier ones
        if self.prefix is not None:
            looked = [j for j in range(len(unique)) if j not in scored and not starts[j]]
            found = self.prefix.load_many([(states[j], reqs[unique[j]].prompt, rows[unique[j]]) for j in looked])
            for j, n in zip(looked, found):
                starts[j] = n
        parts, position_logits = [], {}
        # prompts of similar length together, so a long one does not pad every short one (service/prefill_groups.py);
        # those continuing a cached prefix apart from those that start at 0 (which keep the faster attention)
        groups = []
        for cont in (False, True):
            part = [j for j in range(len(unique)) if bool(starts[j]) == cont]
            if part:
                lengths = [len(reqs[unique[j]].prompt) - starts[j] for j in part]
                groups += [[part[k] for k in g] for g in prefill_groups.plan(lengths, self.prefill_call_tokens)]
        for group in groups:
            picked = [unique[j] for j in group]
            parts.append(self.runner.prefill(
                [reqs[i].prompt[starts[j]:] for i, j in zip(picked, group)], [rows[i] for i in picked],
                [reqs[i].core_slot for i in picked], [reqs[i].lr_slot for i in picked],
                keep_hidden=any(j in scored for j in group), starts=[starts[j] for j in group],
            ))
            for g, j in enumerate(group):  # before the next call replaces the kept hidden states
                if j in scored:
                    position_logits[j] = self.runner.position_logits(g, len(reqs[unique[j]].prompt))
        if self.prefix is not None:  # before anything else is written into these rows
            self.prefix.store_many([(st, reqs[i].prompt, rows[i]) for i, st in zip(unique, states)])
        for i, req in enumerate(reqs):
            if not req.done:  # (a chunked prompt's were counted at its first chunk)
                req.cached_tokens = starts[source[i]]
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        order = [j for group in groups for j in group]  # logits' rows: the distinct prompts in group order
        if order != sorted(order):
            logits = logits[torch.tensor(sorted(range(len(order)), key=order.__getitem__), device=logits.device)]
        for i, req in enumerate(reqs):
            j = source[i]
            if unique[j] != i:
                self.runner.move_row(rows[unique[j]], rows[i], len(req.prompt))
                self.counters["prefills_shared"] += 1
            if req.params.prompt_logprobs is not None:  # every position's logits only for the prompts scored
                req.prompt_logprobs = prompt_logprobs_of(position_logits[j], req.prompt, req.params.prompt_logprobs)
        if len(unique) < len(reqs):
            logits = logits.index_select(0, torch.tensor(source, device=logits.device))
        return logits

    def _decode(self) -> None:
        t0 = time.perf_counter()
        live = [r for r in self._active]
        drafts = self._drafts(live)
        if drafts is not None:
            self._verify(live, drafts)
            self._record_step(t0, len(live))
            return
        device = self.runner.device
        tokens = torch.tensor([r.out[-1] for r in live], device=device)
        pos = [len(r.prompt) + len(r.out) - 1 for r in live]
        positions = torch.tensor(pos, device=device)
        mp = self.runner.mapping([r.core_slot for r in live], [r.lr_slot for r in live])
        logits = self.runner.decode(tokens, positions, mp, context=max(pos) + 1)
        self._choose(live, logits)
        self._record_step(t0, len(live))

    def _choose(self, reqs: list[_Request], logits: torch.Tensor) -> list[int]:
        """Each request's next token from its row of `logits` (rows × vocab), chosen by its own sampling (penalties,
        grammar, bans, its generator) for every row at once, and accepted into the request unless it has finished
        already; returns the tokens."""
        sampling = [r.sampling(self.eos_ids, logits.shape[-1]) for r in reqs]
        tokens = sample_batch(logits, sampling)  # every row at once, one transfer
        for req, tok, lp in zip(reqs, tokens, logprobs_of(logits, sampling, tokens)):
            if req.finish_reason is None:
                self._accept_token(req, tok, lp)
        return tokens

    def _record_step(self, t0: float, rows: int) -> None:
        """A decode step done (plain or speculative): its count, latency and observers."""
        self.counters["steps"] += 1
        dt = time.perf_counter() - t0
        self.step_latencies.append(dt)
        for obs in self.observers:
            obs.on_step("decode", dt, rows)

    def _drafts(self, live: list[_Request]) -> list[list[int]] | None:
        """Each row's draft for a speculative step, or None for a plain decode step: speculation off (and no
        request predicted its answer), too many rows, or no draft. A request's prediction drafts first, prompt
        lookup where it has none (or none fits). A draft stops where the request must (max_tokens counts the
        token the step chooses after it; max_seq_len the positions it is fed at)."""
        spec = self.config.speculative
        predicting = spec.prediction_tokens and any(r.params.prediction for r in live)
        if not (spec.tokens or predicting) or len(live) > spec.max_batch:
            return None
        drafts = []
        for req in live:
            req.prediction_inflight = None
            if req.spec_rest > 0:  # resting after drafts that were rejected outright
                req.spec_rest -= 1
                drafts.append([])
                continue
            fed = len(req.prompt) + len(req.out)  # positions the row holds after this step's first token
            room = min(req.params.max_tokens - len(req.out) - 1, self.config.max_seq_len - fed)
            draft: list[int] = []
            if room > 0 and req.finish_reason is None:
                if req.params.prediction and spec.prediction_tokens:
                    draft, req.predicted_at = propose_predicted(req.params.prediction, req.out, req.prompt + req.out,
                                                                req.predicted_at, min(room, spec.prediction_tokens),
                                                                spec.ngram_max, spec.ngram_min)
                    req.prediction_inflight, req.prediction_from = (draft or None), len(req.out)
                if not draft and spec.tokens:
                    draft = propose(req.prompt + req.out, min(room, spec.tokens), spec.ngram_max, spec.ngram_min)
            drafts.append(draft)
        return drafts if any(drafts) else None

    def _verify(self, live: list[_Request], drafts: list[list[int]]) -> None:
        """One speculative step: every row fed its last token and its draft at once, then each position's token
        chosen as a decode step would choose it, the request's state (penalties' history, grammar, min_tokens)
        advanced token by token; a row keeps its draft up to the first token not chosen, then that choice."""
        feeds = [[r.out[-1]] + d for r, d in zip(live, drafts)]
        logits = self.runner.verify(feeds, [len(r.prompt) + len(r.out) - 1 for r in live],
                                    [r.core_slot for r in live], [r.lr_slot for r in live])
        for req in live:
            if req.prediction_inflight:  # counted before choosing: a request may finish (and report) mid-draft
                req.prediction_drafted += len(req.prediction_inflight)
                self.counters["spec_prediction_draft_tokens"] += len(req.prediction_inflight)
        going = list(range(len(live)))
        kept = [0] * len(live)
        for j in range(logits.shape[1]):
            rows = [i for i in going if j < len(feeds[i])]
            if not rows:
                break
            tokens = self._choose([live[i] for i in rows], logits[torch.tensor(rows, device=logits.device), j])
            going = [i for i, tok in zip(rows, tokens)
                     if live[i].finish_reason is None and j < len(drafts[i]) and tok == drafts[i][j]]
            for i in going:
                kept[i] += 1
        self.counters["spec_steps"] += 1
        self.counters["spec_draft_tokens"] += sum(map(len, drafts))
        self.counters["spec_accepted_tokens"] += sum(kept)
        for req, draft, k in zip(live, drafts, kept):
            if draft:  # a draft rejected outright makes its row rest from drafting, longer each time in a row
                req.spec_misses = 0 if k else req.spec_misses + 1
                req.spec_rest = self.config.speculative.rest_after(req.spec_misses)
            if req.prediction_inflight:
                req.prediction_kept += k
                req.prediction_inflight = None
                self.counters["spec_prediction_accepted_tokens"] += k

    def _accept_token(self, req: _Request, tok: int, logprob: TokenLogprob | None = None) -> None:
        if req.cancelled:
            req.finish_reason = "cancelled"
            return
        if (tok in self.eos_ids and (not req.params.ignore_eos or req.matcher is not None)) or tok in req.params.stop_token_ids:
            self._finish(req, "stop")
            return
        if req.matcher is not None:
            try:
                req.matcher.advance(tok)
            except GrammarError as exc:  # this request's alone: the rest of the batch goes on
                self._finish(req, error=EngineError(f"structured output failed: {exc}"))
                return
        req.out.append(tok)
        if req.history is not None:
            req.history.add(tok)
        if logprob is not None:
            req.logprobs.append(logprob)
        self.counters["completion_tokens"] += 1
        delta, hit_stop = req.detok.add(tok)
        req.emit_text(delta)
        if hit_stop or (req.matcher is not None and req.matcher.done):
            self._finish(req, "stop")
        elif len(req.out) >= req.params.max_tokens or len(req.prompt) + len(req.out) >= self.config.max_seq_len:
            self._finish(req, "length")

    def _finish(self, req: _Request, reason: str | None = None, error: Exception | None = None) -> None:
        if req.finish_reason is not None:
            return
        if error is not None:
            req.finish_reason = "error"
            req.emit("error", error)
            return
        req.finish_reason = reason
        self._finished_at.append(time.monotonic())
        req.emit_text(req.detok.finish())
        self.counters["finished"] += 1
        req.emit("done", GenerationResult(req.detok.text, reason, len(req.prompt), len(req.out), req.adapter_id, list(req.out),
                                          req.logprobs if req.params.logprobs is not None else None,
                                          req.prompt_logprobs, req.cached_tokens, *req.prediction_usage()))
        for obs in self.observers:
            obs.on_finish(reason, len(req.out), req.method)

    def _retire(self) -> None:
        """Drop finished/cancelled rows, keeping the active rows compacted in [0, n)."""
        for req in self._active:
            if req.cancelled and req.finish_reason is None:
                req.finish_reason = "cancelled"
        if self.prefix is not None:  # a chat's next turn starts with this one's prompt and answer
            self._keep_answers()
        i = 0
        while i < len(self._active):
            if self._active[i].finish_reason is None:
                i += 1
            else:
                self._drop_row(i)

    def _drop_row(self, i: int) -> None:
        """Take the request in row i out of the batch (its adapter slot released), the last row moved into its place."""
        req = self._active[i]
        if req.adapter_id is not None:
            self.cache.release(req.cache_key)
        last = len(self._active) - 1
        if i != last:
            mover = self._active[last]
            self.runner.move_row(last, i, len(mover.prompt) + len(mover.out))
            self._active[i] = mover
        self._active.pop()

    def _keep_answers(self) -> None:
        """Into the prefix cache, the generated tokens of rows about to leave, after their prompts: their keys and
        values are in the row for every generated token but the last (never fed back), and a chat's next turn
        repeats them. Not for rows that failed (an error may leave a row half-written)."""
        done = [(i, r) for i, r in enumerate(self._active)
                if r.finish_reason in ("stop", "length", "cancelled") and len(r.out) > 1]
        if done:
            self.prefix.store_many([(self._prefix_key(r, r.core_slot, r.lr_slot), r.prompt + r.out[:-1], i)
                                    for i, r in done])

    def _eos_ids(self) -> set[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        gc = getattr(self.base.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
        return ids
