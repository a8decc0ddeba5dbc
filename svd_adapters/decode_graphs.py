"""Decode steps replayed from CUDA graphs: one captured graph per (rows, context, adapter mix) bucket.

A decode step of a small model on a GPU is a few thousand tiny kernels, and launching them from Python costs
more than running them; per-row adapters add kernels of their own, so launch overhead would also be most of
what adapters cost. A captured graph launches the whole step at once.

Shapes are made static by padding: the rows to a bucket (1, 2, 4, 8, then multiples of 8, as vLLM does) and
the attended context to a power of two (the mask hides the padding). Which adapter kinds the step runs (core,
scaled core, low-rank rows, low-rank d-terms) is part of the bucket, so a base-only step stays the plain base
graph; the number of low-rank rows is bucketed like the rows (padded with entries that read slot 0, the zero
adapter), so a server whose LoRA / SORSA traffic varies step to step captures a handful of graphs, not one per
count.

A step writes each row's new key/value at the row's position before it attends, so a padded row, and the
warm-up runs before a capture (which execute with placeholder inputs), must write where nothing is read: they
decode at the last cache position. No row reads a position before its own step has written it, and a row at
the last position writes it again in the replay that follows.

Graphs are captured lazily, the first time a bucket is needed, into one shared memory pool (they never run
concurrently). Every graph reads its inputs from static buffers; per-row adapter tensors are the runner's
persistent row buffers and slot pools, updated in place, so replays always see the current adapters.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from svd_adapters.batched_linear import SlotMapping

MIN_CONTEXT = 64


def row_bucket(rows: int, max_rows: int) -> int:
    """The padded row count for `rows` active rows: 1, 2, 4, 8, then the next multiple of 8 (≤ max_rows)."""
    for b in (1, 2, 4):
        if rows <= b:
            return min(b, max_rows)
    return min(-(-rows // 8) * 8, max_rows)


def context_bucket(length: int, max_len: int) -> int:
    """The padded attended length: the next power of two from MIN_CONTEXT (≤ max_len)."""
    b = MIN_CONTEXT
    while b < length:
        b *= 2
    return min(b, max_len)


@dataclass
class _Captured:
    replay: Callable[[], None]
    tokens: torch.Tensor
    positions: torch.Tensor
    lr_idx: torch.Tensor
    lr_rows: torch.Tensor | None
    lr_row_slots: torch.Tensor | None
    out: torch.Tensor


class DecodeGraphs:
    """Captures and replays the runner's decode step (`step(tokens, positions, mp, context)` → logits).

    `capture_fn(fn)` returns a replay callable; by default a CUDA graph. Tests on the CPU pass one that simply
    calls fn again, which exercises the same padding and static buffers."""

    def __init__(self, step: Callable, max_rows: int, max_len: int, device: torch.device,
                 capture_fn: Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]] | None = None):
        self.step, self.max_rows, self.max_len, self.device = step, max_rows, max_len, device
        self.capture_fn = capture_fn or self._cuda_capture
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = None

    def _cuda_capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        # Warm up on a side stream first (lazy inits, allocator state), as torch.cuda.graph's docs ask.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph.replay, out

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, mp: SlotMapping, context: int) -> torch.Tensor:
        """Logits (T, V) of one decode step for T = len(tokens) active rows, from the bucket's graph."""
        T = tokens.shape[0]
        P, L = row_bucket(T, self.max_rows), context_bucket(context, self.max_len)
        n_lr = 0 if mp.lr_rows is None else mp.lr_rows.shape[0]
        n_lr_padded = row_bucket(n_lr, P) if n_lr else 0
        key = (P, L, mp.has_core, mp.has_sub, n_lr_padded, mp.lr_sub)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(P, L, mp, n_lr_padded)
        g.tokens[:T].copy_(tokens)
        g.tokens[T:].zero_()
        g.positions[:T].copy_(positions)
        g.positions[T:].fill_(self.max_len - 1)
        if n_lr:
            g.lr_idx[:T].copy_(mp.lr_idx)
            g.lr_idx[T:].zero_()
            g.lr_rows[:n_lr].copy_(mp.lr_rows)
            g.lr_rows[n_lr:].zero_()  # padded entries: row 0 plus slot 0's zero delta
            g.lr_row_slots[:n_lr].copy_(mp.lr_row_slots)
            g.lr_row_slots[n_lr:].zero_()
        g.replay()
        return g.out[:T].clone()  # the next replay overwrites the static output

    def _capture(self, P: int, L: int, mp: SlotMapping, n_lr: int) -> _Captured:
        kw = {"dtype": torch.long, "device": self.device}
        tokens, positions = torch.zeros(P, **kw), torch.full((P,), self.max_len - 1, **kw)
        lr_idx = torch.zeros(P, **kw)
        lr_rows = torch.arange(n_lr, **kw) if n_lr else None
        lr_row_slots = torch.zeros(n_lr, **kw) if n_lr else None
        # A decode step reads core tensors from the runner's row buffers (refreshed before the replay), so the
        # padded mapping's core slots are never read: only its flags shape the graph.
        static = SlotMapping(core_idx=torch.zeros(P, **kw), lr_idx=lr_idx, tokens_per_row=1, has_core=mp.has_core,
                             has_sub=mp.has_sub, lr_rows=lr_rows, lr_row_slots=lr_row_slots, lr_sub=mp.lr_sub)
        replay, out = self.capture_fn(lambda: self.step(tokens, positions, static, L))
        return _Captured(replay, tokens, positions, lr_idx, lr_rows, lr_row_slots, out)
