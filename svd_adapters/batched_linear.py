"""Mixed-adapter batched linear layers: one base GEMM per step, each token adds its own adapter's delta.

A `LinearGroup` is a set of linears that read the same input (q/k/v, gate/up, or a single o/down). Its base
weights and the frozen V_rᵀ of every member are stacked into one matrix, so a single GEMM gives both the base
outputs and the shared projections h = V_rᵀx.

Adapter tensors live in fixed device slot pools, one `GroupPools` per group kind holding every layer:

- core pool (OSoRA, LoRA-XS):  Cᵀ (layers, slots, k, R, R) (stored transposed: h·Cᵀ needs no copy), o (layers, slots, M), d (layers, slots, k·R)
- low-rank pool (SORSA, LoRA): A (layers, slots, k·K, n), B_iᵀ (layers, slots, K, m_i), K = 2R (a LoRA may have
  up to twice the core rank), each slot's rank (how many of its K rows are filled: the kernel reads only those),
  and d (layers, slots, k·R) for a low-rank adapter with a frozen subtraction along U_r (SORSA's −σ_r), applied
  through the group's shared projection h like a core's d

Layer-major, so what one layer reads in a step (its rows' cores, scales) lies in one contiguous block of the
layer's slots: at decode it comes from memory, and that streams faster than pieces spread over all layers
(measured ~10 % less core-delta time per decode step than slot-major).

Slot 0 of each pool is the zero adapter (base rows). A `SlotMapping`, built once per step and shared by all
layers, says which slots each row (request) reads. The CPU kernel reads each row's core tensors from its slot
(`GroupPools.by_slot`); elsewhere they are gathered once per step (`GroupPools.gather`; at decode, kept in
per-row buffers), the low-rank ones per layer for the rows that have one. Decode and prefill go
through the same two delta functions; on the CPU the core delta, a decode step's low-rank delta (read straight
from the slots, no gather) and its GEMMs run in svdserve's own kernels where they are faster (`cpu_kernels.py`),
on a GPU the core delta and a decode step's low-rank delta are one Triton kernel each per group (`gpu_kernels.py`).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from svd_adapters import cpu_kernels, gpu_kernels
from svd_adapters.factors import ModuleFactors
from svd_adapters.terms import DeltaTerms


@dataclass
class SlotMapping:
    """Per-step adapter routing, built once and read by every layer.

    The step's tokens are `rows` requests × `tokens_per_row` tokens (decode: 1; prefill: the padded prompt
    length), row-major. Row p reads core slot core_idx[p] and low-rank slot lr_idx[p] (0 = none).
    """

    core_idx: torch.Tensor  # (P,) long
    lr_idx: torch.Tensor  # (P,) long
    tokens_per_row: int
    has_core: bool
    has_sub: bool  # some row's core adapter scales outputs and subtracts U_r σ_r V_rᵀ (OSoRA)
    lr_rows: torch.Tensor | None  # rows that carry a low-rank adapter; only those pay for its GEMMs
    core_slots: tuple[int, ...] | None = None  # core_idx on the host, when known (saves a device → host copy)
    # The low-rank slot of each entry of lr_rows (set whenever lr_rows is). Its own tensor, so that decode graphs
    # can pad lr_rows to a bucket with (row 0, slot 0) entries: slot 0 is the zero adapter, so a padded entry adds
    # exactly nothing.
    lr_row_slots: torch.Tensor | None = None
    lr_sub: bool = False  # some low-rank row's adapter has a d-term (SORSA): the step needs h for it
    # With has_sub, on the host: which rows' core slots scale outputs (OSoRA's); the CPU decode kernel gives the
    # others (LoRA-XS rows) the unscaled arithmetic
    core_scaled: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.core_idx.shape[0]

    @property
    def has_lr(self) -> bool:
        return self.lr_rows is not None

    @staticmethod
    def build(core_slots: list[int], lr_slots: list[int], sub_slots: set[int], tokens_per_row: int = 1,
              device: torch.device | str = "cpu", lr_sub_slots: set[int] = frozenset()) -> "SlotMapping":
        lr_rows = [i for i, s in enumerate(lr_slots) if s != 0]
        scaled = [s in sub_slots for s in core_slots]

        def index(values: list[int]) -> torch.Tensor:
            # non_blocking: a blocking host → GPU copy would wait for every queued kernel (a stall per step)
            return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

        return SlotMapping(
            core_idx=index(core_slots),
            lr_idx=index(lr_slots),
            tokens_per_row=tokens_per_row,
            has_core=any(s != 0 for s in core_slots),
            has_sub=any(scaled),
            lr_rows=index(lr_rows) if lr_rows else None,
            core_slots=tuple(core_slots),
            lr_row_slots=index([lr_slots[i] for i in lr_rows]) if lr_rows else None,
            lr_sub=any(s in lr_sub_slots for s in lr_slots if s),
            core_scaled=torch.tensor(scaled) if any(scaled) else None,
        )


def row_cores(h: torch.Tensor, Ct: torch.Tensor) -> torch.Tensor:
    """g = C h per token for one token per row: h (P, k, R), Ct (P, k, R, R) → (P, k·R).

    On the CPU a broadcast multiply and sum (in float32: ~3× faster than P·k batched 1×R×R matmuls, ~1.5× for
    bfloat16 inputs, whose batched matmul is slow there). On a GPU, one batched matmul kernel."""
    P, k, R = h.shape
    if h.device.type != "cpu":
        return torch.matmul(h.unsqueeze(-2), Ct).view(P, k * R)
    wide = h.to(torch.promote_types(h.dtype, torch.float32))  # bf16 products summed in float32
    return (wide.unsqueeze(-1) * Ct).sum(-2).view(P, k * R).to(h.dtype)


def core_delta_(y: torch.Tensor, h: torch.Tensor, Ct: torch.Tensor, o: torch.Tensor | None, d: torch.Tensor | None,
                Ut_members: list[torch.Tensor], offsets: list[int], scratch: torch.Tensor | None = None,
                Ut_blockdiag: torch.Tensor | None = None) -> None:
    """Add the per-row core delta o ⊙ (Ut-projection of C h) + Ut-projection of (d ⊙ h) into y in place.

    y (P·L, M); h (P, L, k, R); Ct (P, k, R, R) the cores transposed; o (P, M) or None; d (P, k·R) or None;
    Ut_members the members' U_rᵀ (R, m_i), written at column `offsets[i]` of y.
    Decode (L = 1) is bound by memory and op count: apply C token by token, then project with skinny GEMMs
    accumulated straight into y: one per member in float32 on the CPU (a single block-diagonal GEMM reads k×
    the U bytes, zeros included, and measured slower there), one per group with `Ut_blockdiag` in bf16 and on
    GPUs (per-call cost wins there: ~2× faster in bf16 on the CPU). OSoRA's scaled part goes through `scratch`
    (a preallocated flat buffer, so no per-call allocation) and its subtraction is a second in-place GEMM.
    Prefill (long L) is bound by FLOPs: without output scales, one GEMM per member over all tokens; with
    OSoRA's per-row scale o, fold each row's core and scale into an effective (R, m_i) projection per member
    first (no T×m elementwise passes).
    """
    P, L, k, R = h.shape
    if L == 1:
        h = h.view(P, k, R)
        g = row_cores(h, Ct)
        hd = h.reshape(P, k * R) * d if d is not None else None
        if Ut_blockdiag is not None and not (y.dtype == torch.float32 and y.device.type == "cpu"):
            projections = [(Ut_blockdiag, 0, slice(0, k * R))]
        else:
            projections = [(Ui, off, slice(i * R, (i + 1) * R)) for i, (Ui, off) in enumerate(zip(Ut_members, offsets))]
        for Ui, off, cols in projections:
            m = Ui.shape[1]
            yi = y[:, off : off + m]
            if hd is None:
                yi.addmm_(g[:, cols], Ui)
                continue
            t = scratch[: P * m].view(P, m) if scratch is not None else None
            t = torch.mm(g[:, cols], Ui, out=t) if t is not None else g[:, cols] @ Ui
            yi.addcmul_(t, o[:, off : off + m]).addmm_(hd[:, cols], Ui)
        return
    if d is None:
        # No output scale (LoRA-XS and base rows): apply each row's core to its tokens (tiny), then every member
        # is one plain GEMM over all P·L tokens — large, multi-threaded, no per-row loop.
        g = torch.matmul(h.permute(2, 0, 1, 3), Ct.transpose(0, 1))  # (k, P, L, R)
        for i, (Ui, off) in enumerate(zip(Ut_members, offsets)):
            y[:, off : off + Ui.shape[1]].addmm_(g[i].view(P * L, R), Ui)
        return
    yv = y.view(P, L, -1)
    for i, (Ui, off) in enumerate(zip(Ut_members, offsets)):
        m = Ui.shape[1]
        U_eff = torch.matmul(Ct[:, i], Ui)  # (P, R, m_i): row p's h_i ↦ Δy_i
        if d is not None:  # in place: no (P, R, m_i) temporaries (this pass is a few % of an OSoRA prefill)
            U_eff.mul_(o[:, None, off : off + m]).addcmul_(d[:, i * R : (i + 1) * R, None], Ui)
        yv[:, :, off : off + m].baddbmm_(h[:, :, i], U_eff)


def lowrank_delta(x: torch.Tensor, A: torch.Tensor, Bts: list[torch.Tensor], K: int,
                  hd: torch.Tensor | None = None, Ut_members: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Concatenated B_i (A_i x) (+ U_r,i (d ⊙ h)_i with `hd`) over members, per row: x (P, L, n), A (P, k·K, n),
    B_iᵀ (P, K, m_i); hd (P, L, k·R) the rows' d ⊙ h, Ut_members the members' U_rᵀ (R, m_i)."""
    t = torch.bmm(x, A.transpose(1, 2))  # (P, L, k·K)
    parts = [torch.bmm(t[..., i * K : (i + 1) * K], Bt) for i, Bt in enumerate(Bts)]
    if hd is not None:
        R = Ut_members[0].shape[0]
        parts = [part + torch.matmul(hd[..., i * R : (i + 1) * R], Ui) for i, (part, Ui) in enumerate(zip(parts, Ut_members))]
    return torch.cat(parts, dim=-1)


def _layer_index(layers: list[int]) -> slice | list[int]:
    """A slice when the layers are a contiguous run (plain strided writes), else the list."""
    if layers == list(range(layers[0], layers[0] + len(layers))):
        return slice(layers[0], layers[0] + len(layers))
    return layers


class GroupPools:
    """Slot pools of one group kind (e.g. every layer's q/k/v) with a layer dimension, so the per-token
    core tensors of all layers are gathered in one indexing op per step."""

    def __init__(self, out_sizes: list[int], n_in: int, n_layers: int, R: int, core_slots: int, lr_slots: int, like: torch.Tensor):
        kw = {"dtype": like.dtype, "device": like.device}
        self.out_sizes, self.k, self.R, self.K, self.M = out_sizes, len(out_sizes), R, 2 * R, sum(out_sizes)
        self.offsets = [sum(out_sizes[:i]) for i in range(self.k)]
        self.C = torch.zeros(n_layers, core_slots, self.k, R, R, **kw)
        self.o = torch.ones(n_layers, core_slots, self.M, **kw)
        self.d = torch.zeros(n_layers, core_slots, self.k * R, **kw)
        # The diagonals of the cores, side by side, and per slot whether every core in it is diagonal (OSoRA's
        # diag S; an empty slot's zeros): the CPU decode kernel then reads R numbers per member, not R². Kept for
        # pools on the CPU only, its one reader.
        self.s = torch.zeros(n_layers, core_slots, self.k * R, **kw)
        self.diagonal = torch.ones(core_slots, dtype=torch.bool)  # on the host, like the kernel's slot ids
        self.A = torch.zeros(n_layers, lr_slots, self.k * self.K, n_in, **kw)
        self.Bt = [torch.zeros(n_layers, lr_slots, self.K, m, **kw) for m in out_sizes]
        # Filled rows of each slot's K (the kernels read only those): on the host for the CPU kernel, like its slot
        # ids; a copy on the device for the GPU kernel (updated in place: decode graphs read it).
        self.lr_rank = torch.zeros(lr_slots, dtype=torch.long)
        self.lr_rank_device = self.lr_rank if like.device.type == "cpu" else self.lr_rank.to(like.device)
        self.lr_d = torch.zeros(n_layers, lr_slots, self.k * R, **kw)
        self.scratch: torch.Tensor | None = None  # decode's temporary for OSoRA's scaled part (enable_row_cache)
        # Per-layer views of the pools, made once: they stay valid (slots are written in place), and making them
        # per step is ~360 tensor objects (`by_slot`, `lr_layer`).
        self.layer_views = per_layer({"C": self.C, "o": self.o, "d": self.d, "s": self.s, "A": self.A,
                                      "lr_d": self.lr_d, **{f"Bt{i}": Bt for i, Bt in enumerate(self.Bt)}})

    def clear_core(self, slot: int) -> None:
        self.C[:, slot].zero_(), self.o[:, slot].fill_(1.0), self.d[:, slot].zero_(), self.s[:, slot].zero_()
        self.diagonal[slot] = True

    def clear_lr(self, slot: int) -> None:
        self.A[:, slot].zero_()
        for Bt in self.Bt:
            Bt[:, slot].zero_()
        self.lr_d[:, slot].zero_()
        self._set_rank(slot, 0)

    def write_core(self, slot: int, layers: list[int], i: int, t: DeltaTerms) -> None:
        """Member i's terms for `layers` (tensors stacked over those layers) into a slot."""
        r, R, L = t.rank, self.R, _layer_index(layers)
        if t.C is not None:
            self.C[L, slot, i, :r, :r] = t.C.transpose(-1, -2).to(self.C)
            if self.C.device.type == "cpu":  # only the CPU kernels read the diagonals
                diag = torch.diagonal(t.C, dim1=-2, dim2=-1)
                self.s[L, slot, i * R : i * R + r] = diag.to(self.s)
                if not t.diagonal:  # a dense core (LoRA-XS's; one that happens to be diagonal is read densely)
                    self.diagonal[slot] = False
        if t.o is not None:
            self.o[L, slot, self.offsets[i] : self.offsets[i] + self.out_sizes[i]] = t.o.to(self.o)
        if t.d is not None:
            self.d[L, slot, i * R : i * R + r] = t.d.to(self.d)

    def write_lr(self, slot: int, layers: list[int], i: int, t: DeltaTerms) -> None:
        kr, L = t.A.shape[-2], _layer_index(layers)
        self.A[L, slot, i * self.K : i * self.K + kr] = t.A.to(self.A)
        self.Bt[i][L, slot, :kr] = t.B.transpose(-1, -2).to(self.A)
        self._set_rank(slot, max(int(self.lr_rank[slot]), kr))
        if t.d is not None:
            self.lr_d[L, slot, i * self.R : i * self.R + t.rank] = t.d.to(self.lr_d)

    def _set_rank(self, slot: int, rank: int) -> None:
        self.lr_rank[slot] = rank
        if self.lr_rank_device is not self.lr_rank:
            self.lr_rank_device[slot] = rank

    def lr_layer(self, layer: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """One layer's low-rank pools, views made once: A (slots, k·K, n), the members' B_iᵀ (slots, K, m_i) and
        d (slots, k·R)."""
        v = self.layer_views
        return v["A"][layer], [v[f"Bt{i}"][layer] for i in range(self.k)], v["lr_d"][layer]

    def gather(self, mp: SlotMapping) -> dict[str, tuple[torch.Tensor, ...]]:
        """Per-row core tensors for every layer, in one indexing op per step; see `per_layer`."""
        if not mp.has_core:
            return {}
        ci = mp.core_idx
        out = {"C": self.C[:, ci]}
        if mp.has_sub:
            out["o"], out["d"] = self.o[:, ci], self.d[:, ci]
        return per_layer(out)

    def by_slot(self, mp: SlotMapping) -> dict[str, tuple[torch.Tensor, ...]]:
        """The pools themselves, per layer, and the rows' slots: for the CPU kernels, which read each row's core
        tensors from its slot (`cpu_kernels.core_delta(slots=)`, `core_linear`: diagonal cores from `s` where
        `diagonal` flags the slot), so nothing is gathered or copied per step."""
        if not mp.has_core:
            return {}
        views = {"C": self.layer_views["C"], "s": self.layer_views["s"], "diagonal": self.diagonal,
                 "slots": mp.core_idx}
        if mp.has_sub:
            views["o"], views["d"], views["scaled"] = self.layer_views["o"], self.layer_views["d"], mp.core_scaled
        return views

    def enable_row_cache(self, max_rows: int) -> None:
        """Persistent per-row copies of the core tensors, for decode steps: see `refresh_rows`."""
        def rows_like(t: torch.Tensor) -> tuple[int, ...]:
            return (t.shape[0], max_rows) + t.shape[2:]  # (layers, rows, ...)

        self.row_C = torch.zeros(rows_like(self.C), dtype=self.C.dtype, device=self.C.device)
        self.row_o = torch.ones(rows_like(self.o), dtype=self.o.dtype, device=self.o.device)
        self.row_d = torch.zeros(rows_like(self.d), dtype=self.d.dtype, device=self.d.device)
        self.scratch = torch.empty(max_rows * self.M, dtype=self.C.dtype, device=self.C.device)

    def refresh_rows(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Copy the given slots into the given row buffers (only rows whose adapter changed)."""
        self.row_C.index_copy_(1, rows, self.C[:, slots])
        self.row_o.index_copy_(1, rows, self.o[:, slots])
        self.row_d.index_copy_(1, rows, self.d[:, slots])

    def scratch_for(self, rows: int) -> torch.Tensor | None:
        ok = self.scratch is not None and rows * self.M <= self.scratch.numel()
        return self.scratch if ok else None

    def cached_rows(self, mp: SlotMapping) -> dict[str, tuple[torch.Tensor, ...]]:
        if not mp.has_core:
            return {}
        P = mp.rows
        out = {"C": self.row_C[:, :P]}
        if mp.has_sub:
            out["o"], out["d"] = self.row_o[:, :P], self.row_d[:, :P]
        return per_layer(out)


def per_layer(rows: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
    """(layers, P, ...) tensors as one (P, ...) view per layer, made in one op each per step: a layer then takes
    its own by a tuple lookup, not a tensor indexing op per group call (a decode step has 120 of them)."""
    return {name: t.unbind(0) for name, t in rows.items()}


class LinearGroup(nn.Module):
    """One layer's linears that share an input, served with per-token adapters from `GroupPools`."""

    def __init__(self, names: list[str], linears: list[nn.Linear], factors: list[ModuleFactors], pools: GroupPools, layer: int):
        super().__init__()
        self.names, self.pools, self.layer = names, pools, layer
        self.index = {n: i for i, n in enumerate(names)}
        self.out_sizes, self.M, self.k, self.R = pools.out_sizes, pools.M, pools.k, pools.R
        ref = linears[0].weight
        vt = [f.Vh[: self.R].to(ref) for f in factors]
        # Base weights first (rows [0, M)), then the shared projections: x @ W_aug.T gives [y_base | h].
        self.register_buffer("W_aug", torch.cat([lin.weight.detach() for lin in linears] + vt, dim=0).contiguous())
        if any(lin.bias is not None for lin in linears):
            self.register_buffer("bias", torch.cat([
                lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features).to(ref) for lin in linears
            ]))
        else:
            self.bias = None
        self.Ut_members = [f.U[:, : self.R].T.contiguous().to(ref) for f in factors]  # U_rᵀ (R, m_i) per member
        self.Ut_blockdiag = torch.block_diag(*self.Ut_members).contiguous() if self.k > 1 else None  # (k·R, M)
        # The CPU kernel's copy: the members' U_rᵀ side by side, (R, M), in its accumulation dtype.
        acc = torch.promote_types(ref.dtype, torch.float32)
        self.Ut_cat = torch.cat([f.U[:, : self.R].T for f in factors], dim=1).to(ref.device, acc).contiguous()
        self.bounds = pools.offsets + [self.M]
        # At prefill, members narrower than their input (k and v, down) can take their shared projection from their
        # own base output: U_rᵀ W = σ_r V_rᵀ, so h = (U_rᵀ y) / σ_r, R·m multiply-adds a token instead of R·n (a third
        # of SmolLM2's projection work; within 1e-6 relative of V_rᵀ x on its weights). Only a trailing run of such
        # members (their V_rᵀ rows are then the last of W_aug, which such a prefill leaves out), and not in bf16,
        # where y is rounded to 8 bits before the product. Whether it pays is the CPU's call (`prefill_plans`).
        narrow = [f.U.shape[0] < f.Vh.shape[1] and ref.dtype in (torch.float32, torch.float64) for f in factors]
        self.v_members = self.k
        while self.v_members > 0 and narrow[self.v_members - 1]:
            self.v_members -= 1
        self.U_over_s = [(f.U[:, : self.R] / f.S[: self.R]).to(ref).contiguous() for f in factors[self.v_members :]]
        # Each prefill plan's (h of the narrow members from their outputs?, W and the V_rᵀ rows kept in one GEMM?),
        # by name; see `prefill_plans`
        self._plans: dict[str, tuple[bool, bool]] = {}
        for from_outputs in ([True, False] if self.v_members < self.k else [False]):
            with_v = (self.v_members if from_outputs else self.k) > 0
            for one in ([True, False] if with_v else [False]):
                name = ("one GEMM" if one else "two GEMMs") if with_v else "GEMM over W"
                self._plans[name + (", narrow h from outputs" if from_outputs else "")] = (from_outputs, one)
        # Uncalibrated (e.g. a GPU's runner moved to the CPU): narrow h from outputs where there are narrow
        # members, and two GEMMs.
        self._default_plan = next(p for p in self._plans.values() if p[0] == (self.v_members < self.k) and not p[1])
        self.plan_key = (tuple(self.W_aug.shape), tuple(self.out_sizes), self.v_members, self.W_aug.dtype)

    def forward(self, x: torch.Tensor, mp: SlotMapping, rows: dict[str, tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """x (T, n) → (T, M): base outputs of all members plus each token's adapter delta.

        `rows` is this group kind's `GroupPools.gather` result for the step."""
        h = None
        if mp.has_core:
            y, h = self._with_core_delta(x, mp, rows)
        elif mp.lr_sub:  # low-rank rows with a d-term read the shared projections
            y, h = self.project(x)
        else:  # no adapter in the batch reads them: skip the shared projections entirely
            y = cpu_kernels.matmul_t(x, self.W_aug[: self.M])
        if self.bias is not None:
            y.add_(self.bias)
        if mp.has_lr:
            self._add_lowrank(y, x, h if mp.lr_sub else None, mp)
        return y

    def _add_lowrank(self, y: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None, mp: SlotMapping) -> None:
        """y += each low-rank row's B (A x), plus U_r (d ⊙ h) where its slot has a d-term (with `h`: the step's
        shared projections). On the CPU one kernel call reads every row's terms from its slot
        (`cpu_kernels.lowrank_delta`), on a GPU at decode one Triton launch (`gpu_kernels.lowrank_delta`);
        elsewhere the rows that have one gather theirs for batched products."""
        P, L, p = mp.rows, mp.tokens_per_row, self.pools
        A, Bts, d = p.lr_layer(self.layer)
        sub = (h, d, self.Ut_cat) if h is not None else (None, None, None)
        if cpu_kernels.serves(y):
            cpu_kernels.lowrank_delta(y, x, A, Bts, self.bounds, mp.lr_idx, p.lr_rank, L, *sub)
            return
        sel, slots = mp.lr_rows, mp.lr_row_slots
        if L == 1 and gpu_kernels.serves(y):
            gpu_kernels.lowrank_delta(y, x, A, Bts, self.bounds, sel, slots, p.lr_rank_device, *sub)
            return
        hd = h.reshape(P, L, -1)[sel] * d[slots, None] if h is not None else None
        delta = lowrank_delta(x.view(P, L, -1)[sel], A[slots], [Bt[slots] for Bt in Bts], p.K, hd, self.Ut_members)
        y.view(P, L, self.M).index_add_(0, sel, delta)

    def _with_core_delta(self, x: torch.Tensor, mp: SlotMapping, rows: dict[str, tuple[torch.Tensor, ...]],
                         out: torch.Tensor | None = None, lowrank_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Base outputs plus every row's core delta (`out`: see `gated`), and the shared projections h; with
        `lowrank_first`, the low-rank rows' delta goes in before the core delta (so `out` sees both)."""
        P, L, li = mp.rows, mp.tokens_per_row, self.layer
        # Without OSoRA rows every o is 1 and every d is 0: skip the scale and the subtraction.
        o, d = (rows["o"][li], rows["d"][li]) if mp.has_sub else (None, None)
        # A decode step's group with nothing between its GEMM and its core delta: both in one kernel call, on the CPU
        # (the GEMM the kernel's own where calibration picked it for this shape, else torch's inside the same call),
        # on a GPU where the fused kernel is turned on.
        fusable = L == 1 and out is None and not lowrank_first
        if fusable and "slots" in rows:  # the slot pools themselves: the CPU kernels serve this step
            return cpu_kernels.core_linear(x, self.W_aug, rows["C"][li], o, d, self.Ut_cat, self.bounds, rows["slots"],
                                           rows["s"][li], rows["diagonal"], blas=not cpu_kernels.uses_kernel(x, self.W_aug),
                                           scaled=rows.get("scaled"))
        if fusable and x.shape[0] <= gpu_kernels.LINEAR_MAX_ROWS and gpu_kernels.serves(x) \
                and gpu_kernels.fused_decode():
            return gpu_kernels.linear_core(x, self.W_aug, rows["C"][li], o, d, self.Ut_cat, self.bounds)
        y, h = self.project(x)
        if lowrank_first:
            self._add_lowrank(y, x, h if mp.lr_sub else None, mp)
        if "slots" in rows:  # the slot pools themselves (`GroupPools.by_slot`): the CPU kernel reads by slot
            cpu_kernels.core_delta(y, h, rows["C"][li], o, d, self.Ut_cat, self.bounds, L, out=out, slots=rows["slots"])
        elif cpu_kernels.serves(y):
            cpu_kernels.core_delta(y, h, rows["C"][li], o, d, self.Ut_cat, self.bounds, L, out=out)
        elif gpu_kernels.serves(y):
            gpu_kernels.core_delta(y, h, rows["C"][li], o, d, self.Ut_cat, self.bounds, L)
        else:
            core_delta_(y, h.reshape(P, L, self.k, self.R), rows["C"][li], o, d, self.Ut_members, self.pools.offsets,
                        self.pools.scratch_for(P) if L == 1 else None, self.Ut_blockdiag)
        return y, h

    def gated(self, x: torch.Tensor, mp: SlotMapping, rows: dict[str, tuple[torch.Tensor, ...]], act: nn.Module,
              act_is_silu: bool = False) -> torch.Tensor:
        """act(gate) · up of a gate/up group, with every row's delta: x (T, n) → (T, m).

        At prefill on the CPU with SiLU (`act_is_silu`, from the model's config) the kernels apply it in one pass
        (torch's silu and product take two and a temporary: ~7× slower in isolation): with core rows inside the
        core delta's sweep, which adds each token's delta to its gate and up outputs in registers and writes only
        the activation (y is never written back; low-rank rows' delta goes into y before that sweep); without core
        rows after the deltas, as a pass of its own; base-only batches take the same one-pass activation, so the
        baseline is not handicapped. A CPU decode step: `forward`, then that one-pass activation. Elsewhere:
        `forward`, then the activation as PyTorch ops."""
        one_pass = (act_is_silu and self.k == 2 and self.out_sizes[0] == self.out_sizes[1] and self.bias is None
                    and cpu_kernels.serves(x))
        if not (one_pass and x.shape[0] > cpu_kernels.SKINNY_MAX_ROWS):
            y = self(x, mp, rows)
            if one_pass:  # a few rows (decode): the delta is in y already; the activation in one pass, not two ops
                return cpu_kernels.gated_silu(y)
            gate, up = self.split(y)
            return act(gate) * up
        if not mp.has_core:  # base and low-rank rows only: the activation as a pass of its own
            y = self(x, mp, rows) if mp.has_lr else cpu_kernels.matmul_t(x, self.W_aug[: self.M])
            return cpu_kernels.gated_silu(y)
        out = torch.empty(x.shape[0], self.M // 2, dtype=x.dtype, device=x.device)
        self._with_core_delta(x, mp, rows, out=out, lowrank_first=mp.has_lr)  # the core sweep writes the activation
        return out

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Base outputs y (T, M), fresh (the delta goes in in place), and the shared projections h (T, k·R).

        A decode step's few rows take one GEMM over W_aug: it reads the weights once, which is what a skinny
        product costs. So does a prefill on a GPU, where kernel launches, not FLOPs, set a small model's prefill
        time (it is not graphed: each kernel is a launch from Python). A prefill on the CPU takes the plan
        calibration found fastest for this group (`prefill_plans`)."""
        if x.shape[0] <= cpu_kernels.SKINNY_MAX_ROWS or x.device.type != "cpu":
            z = cpu_kernels.matmul_t(x, self.W_aug)
            return z[:, : self.M], z[:, self.M :]
        return self.project_prefill(x, *self._plans.get(cpu_kernels.prefill_plan(self.plan_key), self._default_plan))

    def prefill_plans(self) -> dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
        """A prefill's ways to its y and h on the CPU, by name: the same numbers to float rounding, at speeds that
        depend on the CPU and its BLAS, so the runner times them once a process (`cpu_kernels.calibrate_prefill`)
        and `project` takes the fastest.
        - One GEMM over [W; V_rᵀ] (then sliced) or two (W, then V_rᵀ): on one Xeon MKL ran e.g. 3104 = 3072 + 32
          rows up to 10 % slower than W alone, on a Zen 5 the one GEMM was faster.
        - For a group with narrow members (k and v, down): their h from their outputs (see `__init__`), or their
          V_rᵀ rows in the GEMM like the others': fewer FLOPs against more, smaller products (on an AMX Xeon the
          qkv group's h all from its GEMM took ~7 % less time, 16 ms of a 2048-token prefill)."""
        return {name: functools.partial(self.project_prefill, from_outputs=a, one_gemm=b)
                for name, (a, b) in self._plans.items()}

    def prefill_calibration(self) -> tuple[tuple, str, torch.Tensor, dict[str, Callable]]:
        """What `cpu_kernels.calibrate_prefill` takes for this group: its signature, a label, W_aug, its plans."""
        label = "+".join(map(str, self.out_sizes)) + f"x{self.W_aug.shape[1]}"
        return self.plan_key, label, self.W_aug, self.prefill_plans()

    def project_prefill(self, x: torch.Tensor, from_outputs: bool, one_gemm: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """y and h for a prefill's rows by one plan (see `prefill_plans`): the trailing narrow members' h from their
        outputs or not, the V_rᵀ rows the GEMM keeps in the same GEMM as W or in one of their own."""
        v = self.v_members if from_outputs else self.k
        W = self.W_aug[: self.M + v * self.R]
        if v == 0:  # no V_rᵀ rows left (down): the members' GEMM alone
            y, h_parts = cpu_kernels.matmul_t(x, W), []
        elif one_gemm:
            z = cpu_kernels.matmul_t(x, W)
            y, h_parts = z[:, : self.M], [z[:, self.M :]]
        else:
            y, h_parts = cpu_kernels.matmul_t(x, W[: self.M]), [cpu_kernels.matmul_t(x, W[self.M :])]
        if from_outputs:
            off = self.bounds[v:]
            h_parts += [y[:, a:b] @ Us for a, b, Us in zip(off[:-1], off[1:], self.U_over_s)]
        return y, h_parts[0] if len(h_parts) == 1 else torch.cat(h_parts, dim=1)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(y, self.out_sizes, dim=-1))
