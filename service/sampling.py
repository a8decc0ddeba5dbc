"""Token choice for a whole batch at once: penalties and logit bias, then greedy or sampled rows.

Every step hands the (rows, vocab) logits of all live rows to `sample_batch`, which does the work as a few
batched tensor ops instead of a sort and a multinomial per row: a per-row sort of a 49k vocabulary cost more
than the model's decode step (32 rows, top_p 0.9: 194 ms on one 2-core host against a 50 ms step).

Truncation (top_k, top_p, min_p) runs on each row's top `CANDIDATES` tokens: every rule keeps a prefix of the
tokens sorted by probability, so when a row's last candidate is dropped the kept set is exactly what a full
sort would keep; the rare row whose kept set reaches past the candidates is redone with a full sort. A token
is then drawn by inverting the kept tokens' cumulative distribution at one uniform number from the request's
own generator, so a seeded request gives the same tokens whatever else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

CANDIDATES = 64  # tokens per row that truncation looks at before falling back to a full sort
BLOCK = 256  # inverse-CDF blocks (see _invert)


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # keep tokens at least min_p × the top token's probability; 0 = off
    presence_penalty: float = 0.0  # subtracted once from every token already generated (OpenAI's)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens (OpenAI's)
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt and generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id → added to its logit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives; None = off
    stop_token_ids: list[int] = field(default_factory=list)  # tokens that end the generation like EOS (not in the text)
    ignore_eos: bool = False  # go on past EOS (up to max_tokens), as vLLM's benchmarks do
    min_tokens: int = 0  # EOS and stop_token_ids cannot be chosen before this many tokens
    grammar: str | None = None  # a compiled structured-output constraint (service/structured.py); None = free text
    prompt_logprobs: int | None = None  # also each prompt token's log-probability given the tokens before it
    prefix_scope: str | None = None  # only requests of the same scope share cached prompt prefixes (tenant, salt)
    tenant: str | None = None  # who asked: admission shares the batch's rows fairly between tenants
    priority: int = 0  # admission order: lower first (vLLM's convention); fair share within one priority
    tenant_weight: float = 1.0  # the tenant's share of rows under fair share, relative to other tenants'
    prediction: list[int] | None = None  # the answer's expected tokens (OpenAI's Predicted Outputs): speculative drafts

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def truncated(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


class TokenHistory:
    """The distinct tokens of a request's prompt and output, with how often each was generated (penalties).

    Kept sparse: a step penalizes only these tokens (a gather and a scatter over all rows' entries at once); dense
    per-row vocabulary counts made the penalized step 16 ms for 32 rows, most of it stacking and masking zeros.
    """

    def __init__(self, prompt: list[int], vocab: int):
        self.ids: list[int] = list(dict.fromkeys(t for t in prompt if 0 <= t < vocab))
        self.counts: list[float] = [0.0] * len(self.ids)  # generated occurrences; 0 for prompt-only tokens
        self._pos = {t: i for i, t in enumerate(self.ids)}

    def add(self, token: int) -> None:
        pos = self._pos.get(token)
        if pos is None:
            self._pos[token] = len(self.ids)
            self.ids.append(token)
            self.counts.append(1.0)
        else:
            self.counts[pos] += 1.0


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature, truncation and penalties, as
    vLLM reports them) and the most likely alternatives at that position, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RowSampling:
    """What `sample_batch` needs of one row: its parameters, generator (sampled rows) and history (penalties)."""

    params: SamplingParams
    generator: torch.Generator | None = None
    history: TokenHistory | None = None
    banned: tuple[int, ...] = ()  # tokens this step may not choose (ending tokens before min_tokens)
    allowed: torch.Tensor | None = None  # the only tokens this step may choose (a grammar's), packed: see structured.py


def sample_batch(logits: torch.Tensor, rows: list[RowSampling]) -> list[int]:
    """One token per row of `logits` (rows × vocab), each by its own row's parameters."""
    adjusted = any(r.params.penalized or r.params.logit_bias or r.banned or r.allowed is not None for r in rows)
    if not adjusted and all(r.params.greedy for r in rows):
        return torch.argmax(logits, dim=-1).tolist()  # the common case: one op, one transfer
    if adjusted:  # on a float32 copy: the caller's logits are never written
        x = _apply_bias(_apply_penalties(logits.to(torch.float32, copy=True), rows), rows)
    else:
        x = logits.float()
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    tokens = torch.empty(len(rows), dtype=torch.long, device=x.device)
    if greedy:
        tokens[_at(greedy, x.device)] = torch.argmax(_rows(x, greedy), dim=-1)
    if sampled:
        temps = torch.tensor([rows[i].params.temperature for i in sampled], device=x.device)
        probs = torch.softmax(_rows(x, sampled) / temps[:, None], dim=-1)
        u = torch.cat([_uniform(rows[i].generator) for i in sampled]).to(x.device)
        tokens[_at(sampled, x.device)] = _draw(probs, [rows[i].params for i in sampled], u)
    return tokens.tolist()


def logprobs_of(logits: torch.Tensor, rows: list[RowSampling], tokens: list[int]) -> list[TokenLogprob | None]:
    """The chosen tokens' log-probabilities (and top alternatives) for the rows that ask for them, in one
    batched log-softmax and one transfer; None for the others."""
    asking = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(rows)
    if not asking:
        return out
    k = max(rows[i].params.logprobs for i in asking)
    for i, e in zip(asking, _score(_rows(logits, asking), [tokens[i] for i in asking], k)):
        e.top = e.top[: rows[i].params.logprobs]
        out[i] = e
    return out


def prompt_logprobs_of(logits: torch.Tensor, prompt: list[int], k: int) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it, with k top alternatives, from the logits
    (len(prompt), V) of every prompt position; None for the first token, which nothing predicts."""
    return [None] + _score(logits[:-1], prompt[1:], k)


def _score(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Row i's log-softmax at tokens[i] and its k most likely tokens (one log-softmax, one transfer)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
    top_vals, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    return [TokenLogprob(t, c, list(zip(i, v))) for t, c, i, v in zip(tokens, chosen, top_ids.tolist(), top_vals.tolist())]


def _at(indices: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(indices, device=device)


def _rows(x: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """x's rows at indices, without a copy when that is all of them (the usual batch: one kind of request)."""
    return x if len(indices) == x.shape[0] else x.index_select(0, _at(indices, x.device))


def _apply_penalties(x: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    pen = [i for i, r in enumerate(rows) if r.params.penalized]
    if not pen:
        return x
    missing = [i for i in pen if rows[i].history is None]
    if missing:
        raise ValueError(f"rows {missing} ask for penalties but carry no TokenHistory")
    row_of, ids, counts = [], [], []
    for i in pen:
        h = rows[i].history
        row_of.extend([i] * len(h.ids))
        ids.extend(h.ids)
        counts.extend(h.counts)
    if not ids:
        return x
    dev = x.device
    r = torch.tensor(row_of, device=dev)
    t = torch.tensor(ids, device=dev)
    c = torch.tensor(counts, device=dev)

    def per_row(name: str) -> torch.Tensor:
        return torch.tensor([getattr(p.params, name) for p in rows], device=dev)[r]

    vals = x[r, t]
    # HF / vLLM's repetition penalty (every entry is in the prompt or the output), then OpenAI's presence and
    # frequency penalties (generated tokens only)
    rep = per_row("repetition_penalty")
    vals = torch.where(vals > 0, vals / rep, vals * rep)
    vals = vals - per_row("presence_penalty") * (c > 0) - per_row("frequency_penalty") * c
    x[r, t] = vals
    return x


def _apply_bias(x: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    for i, r in enumerate(rows):
        if r.params.logit_bias:
            ids = torch.tensor(list(r.params.logit_bias), device=x.device)
            x[i, ids] += torch.tensor(list(r.params.logit_bias.values()), device=x.device)
        if r.banned:
            x[i, torch.tensor(r.banned, device=x.device)] = float("-inf")
    bound = [i for i, r in enumerate(rows) if r.allowed is not None]
    if bound:  # every constrained row's grammar mask unpacked at once
        words = torch.stack([rows[i].allowed for i in bound]).to(x.device)
        idx = _at(bound, x.device)
        x[idx] = x.index_select(0, idx).masked_fill_(~unpack_bitmask(words, x.shape[1]), float("-inf"))
    return x


def unpack_bitmask(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed int32 words (rows, words) — bit j of word w: token 32·w + j — as a (rows, vocab) bool mask."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return ((bits[..., None] >> shifts) & 1).bool().flatten(-2)[..., :vocab_size]


def _uniform(generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(1, generator=generator, dtype=torch.float64)


def _draw(probs: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Token ids from rows of temperature-scaled probabilities: truncated rows through their candidates, the
    rest by inverting the whole vocabulary's distribution."""
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    trunc = [i for i, p in enumerate(params) if p.truncated]
    full = [i for i, p in enumerate(params) if not p.truncated]
    if full:
        out[_at(full, probs.device)] = _invert(_rows(probs, full), u[_at(full, u.device)])
    if trunc:
        at = _at(trunc, probs.device)
        out[at] = _draw_truncated(_rows(probs, trunc), [params[i] for i in trunc], u[at])
    return out


def _draw_truncated(probs: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    vocab = probs.shape[1]
    dev = probs.device
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float64)[:, None]
    min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=torch.float64)[:, None]

    def kept(k: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sel = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
        sub = sel(probs)
        vals, ids = torch.topk(sub, k, dim=-1) if k < vocab else torch.sort(sub, dim=-1, descending=True)
        p = vals.double()  # probabilities under the whole vocabulary, in sorted order
        rank = torch.arange(k, device=dev)[None, :]
        keep = (rank < sel(top_k)) & ((torch.cumsum(p, dim=-1) - p) < sel(top_p)) & (p >= sel(min_p) * p[:, :1])
        keep[:, 0] = True  # the most likely token always stays
        return keep, p, ids

    k = min(vocab, max([CANDIDATES] + [p.top_k for p in params]))
    keep, p, ids = kept(k)
    out = _pick(p * keep, ids, u)
    if k < vocab:
        spill = keep[:, -1].nonzero()[:, 0]  # rows whose kept prefix may go on past the candidates
        if spill.numel():
            keep2, p2, ids2 = kept(vocab, spill)
            out[spill] = _pick(p2 * keep2, ids2, u[spill])
    return out


def _pick(weights: torch.Tensor, ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return ids.gather(1, _invert(weights, u)[:, None])[:, 0]


def _invert(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the index where the cumulative weight first exceeds u × the row's total (zero weights never win).

    In two levels over blocks of `BLOCK`: a sequential cumulative sum over a whole 49k vocabulary (in float64, for
    small probabilities' sake) cost ~9 ms for 32 rows; block sums are vectorized and the cumulative sums left
    (over the blocks, then within one block per row) are short.
    """
    rows, width = weights.shape
    if width <= BLOCK:
        return _search(weights.double(), u.double())
    pad = -width % BLOCK
    w = torch.nn.functional.pad(weights, (0, pad)) if pad else weights
    blocks = w.view(rows, -1, BLOCK)
    sums = blocks.sum(dim=-1, dtype=torch.float64)
    cum = torch.cumsum(sums, dim=-1)
    target = u.double() * cum[:, -1]
    b = _find(cum, target)  # the block holding the target (a zero-weight block never does)
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0], torch.zeros_like(target))
    inner = blocks.gather(1, b[:, None, None].expand(rows, 1, BLOCK))[:, 0].double()
    inner_total = inner.sum(dim=-1)
    frac = ((target - before) / inner_total).clamp(0.0, 1.0 - 1e-12)  # rounding never steps out of the block
    return b * BLOCK + _search(inner, frac)


def _search(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One-level inverse CDF (float64 weights, u in [0, 1))."""
    cdf = torch.cumsum(weights, dim=-1)
    return _find(cdf, u * cdf[:, -1])


def _find(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative weight exceeds the row's target."""
    return torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)
