"""Mixed-adapter batched linear layers: one base GEMM per step, each token adds its own adapter's delta.

A `LinearGroup` is a set of linears that read the same input (q/k/v, gate/up, or a single o/down). Its base
weights and the frozen V_rᵀ of every member are stacked into one matrix, so a single GEMM gives both the base
outputs and the shared projections h = V_rᵀx. Adapter tensors live in fixed device slot pools:

- core pool (OSoRA, LoRA-XS):  C (slots, k, R, R), o (slots, M), d (slots, k·R)
- low-rank pool (SORSA, LoRA): A (slots, k·K, n), B_i (slots, m_i, K) per member, K = 2R

Slot 0 of each pool is the zero adapter (base rows). A `SlotMapping`, built once per step and shared by all
layers, says which slots each token reads: decode steps gather per token (BGMV), prefill steps broadcast one
slot over each request's contiguous segment (SGMV). Both go through the same two delta functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from svd_adapters.factors import ModuleFactors
from svd_adapters.terms import DeltaTerms


@dataclass
class SlotMapping:
    """Per-step adapter routing: token t reads core slot core_idx[t] and low-rank slot lr_idx[t]."""

    core_idx: torch.Tensor  # (T,) long
    lr_idx: torch.Tensor  # (T,) long
    has_core: bool
    has_sub: bool  # some token's core adapter subtracts U_r σ_r V_rᵀ (OSoRA): needs the second U GEMM
    has_lr: bool
    # Prefill: contiguous (start, end, core_slot, lr_slot, core_subtracts) runs, one per request;
    # None means gather per token.
    segments: list[tuple[int, int, int, int, bool]] | None = None

    @staticmethod
    def build(
        core_slots: list[int],
        lr_slots: list[int],
        sub_slots: set[int],
        tokens_per_row: list[int] | None,
        device: torch.device | str = "cpu",
    ) -> "SlotMapping":
        """From per-request slots; `tokens_per_row` (prefill) gives each request's token count, None = 1 each."""
        if tokens_per_row is None:
            counts = [1] * len(core_slots)
        else:
            counts = tokens_per_row
        core = torch.tensor(core_slots, dtype=torch.long).repeat_interleave(torch.tensor(counts))
        lr = torch.tensor(lr_slots, dtype=torch.long).repeat_interleave(torch.tensor(counts))
        segments = None
        if tokens_per_row is not None:
            segments, start = [], 0
            for c, cs, ls in zip(counts, core_slots, lr_slots):
                segments.append((start, start + c, cs, ls, cs in sub_slots))
                start += c
        return SlotMapping(
            core_idx=core.to(device),
            lr_idx=lr.to(device),
            has_core=any(s != 0 for s in core_slots),
            has_sub=any(s in sub_slots for s in core_slots),
            has_lr=any(s != 0 for s in lr_slots),
            segments=segments,
        )


def core_delta(h: torch.Tensor, C: torch.Tensor, o: torch.Tensor | None, d: torch.Tensor | None, Ut: torch.Tensor) -> torch.Tensor:
    """o ⊙ (Ut-projection of C h) + Ut-projection of (d ⊙ h), for h (T, k, R).

    C is (T, k, R, R) gathered per token or (k, R, R) shared by all T tokens; o (T|1, M), d (T|1, k·R).
    Ut is the block-diagonal (k·R, M) stack of the members' U_rᵀ, so one GEMM projects every member.
    """
    T, k, R = h.shape
    g = torch.matmul(h.unsqueeze(-2), C.transpose(-1, -2)).reshape(T, k * R)
    if d is None:
        out = g @ Ut
        return out * o if o is not None else out
    both = torch.cat([g, h.reshape(T, k * R) * d], dim=0) @ Ut  # one GEMM for the scaled and subtracted parts
    return both[:T] * o + both[T:]


def lowrank_delta(x: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor], K: int) -> list[torch.Tensor]:
    """Per member i: B_i (A_i x). A is (T, k·K, n) gathered or (k·K, n) shared; B_i (T|-, m_i, K)."""
    if A.dim() == 3:
        t = torch.bmm(A, x.unsqueeze(-1)).squeeze(-1)  # (T, k·K)
        return [torch.bmm(B, t[:, i * K : (i + 1) * K].unsqueeze(-1)).squeeze(-1) for i, B in enumerate(Bs)]
    t = x @ A.T
    return [t[:, i * K : (i + 1) * K] @ B.T for i, B in enumerate(Bs)]


class LinearGroup(nn.Module):
    """Linears sharing one input, served with per-token adapters from slot pools."""

    def __init__(
        self,
        names: list[str],
        linears: list[nn.Linear],
        factors: list[ModuleFactors],
        max_rank: int,
        core_slots: int,
        lr_slots: int,
    ):
        super().__init__()
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.out_sizes = [lin.out_features for lin in linears]
        self.offsets = [sum(self.out_sizes[:i]) for i in range(len(linears))]
        self.M, self.k, self.R, self.K = sum(self.out_sizes), len(linears), max_rank, 2 * max_rank
        n = linears[0].in_features
        ref = linears[0].weight
        R = self.R
        vt = [f.Vh[:R].to(ref) for f in factors]
        # Base weights first (rows [0, M)), then the shared projections: x @ W_aug.T gives [y_base | h].
        self.register_buffer("W_aug", torch.cat([lin.weight.detach() for lin in linears] + vt, dim=0).contiguous())
        biases = [lin.bias for lin in linears]
        self.register_buffer(
            "bias",
            torch.cat([b.detach() if b is not None else torch.zeros(lin.out_features, dtype=ref.dtype, device=ref.device) for b, lin in zip(biases, linears)])
            if any(b is not None for b in biases)
            else None,
        )
        Ut = torch.zeros(self.k * R, self.M, dtype=ref.dtype, device=ref.device)
        for i, f in enumerate(factors):
            Ut[i * R : (i + 1) * R, self.offsets[i] : self.offsets[i] + self.out_sizes[i]] = f.U[:, :R].T.to(ref)
        self.register_buffer("Ut", Ut)
        self.sigma = [f.S[:R].to(ref) for f in factors]
        # Slot pools (slot 0 = no adapter: C = 0, o = 1, d = 0, A = B = 0).
        self.register_buffer("pool_C", torch.zeros(core_slots, self.k, R, R, dtype=ref.dtype, device=ref.device))
        self.register_buffer("pool_o", torch.ones(core_slots, self.M, dtype=ref.dtype, device=ref.device))
        self.register_buffer("pool_d", torch.zeros(core_slots, self.k * R, dtype=ref.dtype, device=ref.device))
        self.register_buffer("pool_A", torch.zeros(lr_slots, self.k * self.K, n, dtype=ref.dtype, device=ref.device))
        self.pool_B = [torch.zeros(lr_slots, m, self.K, dtype=ref.dtype, device=ref.device) for m in self.out_sizes]

    # ---- slot writes (engine thread, between steps) ----
    @torch.no_grad()
    def clear_core(self, slot: int) -> None:
        self.pool_C[slot].zero_()
        self.pool_o[slot].fill_(1.0)
        self.pool_d[slot].zero_()

    @torch.no_grad()
    def clear_lr(self, slot: int) -> None:
        self.pool_A[slot].zero_()
        for B in self.pool_B:
            B[slot].zero_()

    @torch.no_grad()
    def write_core(self, slot: int, name: str, t: DeltaTerms) -> None:
        i, r, R = self.index[name], t.rank, self.R
        if t.C is not None:
            self.pool_C[slot, i, :r, :r] = t.C.to(self.pool_C)
        if t.o is not None:
            self.pool_o[slot, self.offsets[i] : self.offsets[i] + self.out_sizes[i]] = t.o.to(self.pool_o)
        if t.d is not None:
            self.pool_d[slot, i * R : i * R + r] = t.d.to(self.pool_d)

    @torch.no_grad()
    def write_lr(self, slot: int, name: str, t: DeltaTerms) -> None:
        i, kr = self.index[name], t.A.shape[0]
        self.pool_A[slot, i * self.K : i * self.K + kr] = t.A.to(self.pool_A)
        self.pool_B[i][slot, :, :kr] = t.B.to(self.pool_A)

    # ---- forward ----
    def forward(self, x: torch.Tensor, mp: SlotMapping) -> torch.Tensor:
        """x (T, n) → (T, M): base outputs of all members plus each token's adapter delta."""
        if not (mp.has_core or mp.has_lr):
            y = x @ self.W_aug[: self.M].T  # base-only batch: skip the shared projections entirely
            return y + self.bias if self.bias is not None else y
        z = x @ self.W_aug.T
        y = z[:, : self.M]
        if self.bias is not None:
            y = y + self.bias
        T = x.shape[0]
        if mp.has_core:
            h = z[:, self.M :].reshape(T, self.k, self.R)
            if mp.segments is None:
                ci = mp.core_idx
                # Without OSoRA rows every o is 1 and every d is 0: skip the scale and the second GEMM.
                o, d = (self.pool_o[ci], self.pool_d[ci]) if mp.has_sub else (None, None)
                y = y + core_delta(h, self.pool_C[ci], o, d, self.Ut)
            else:
                parts = [
                    core_delta(h[s:e], self.pool_C[c], *((self.pool_o[c : c + 1], self.pool_d[c : c + 1]) if sub else (None, None)), self.Ut)
                    if c != 0 else torch.zeros(e - s, self.M, dtype=y.dtype, device=y.device)
                    for s, e, c, _, sub in mp.segments
                ]
                y = y + torch.cat(parts, dim=0)
        if mp.has_lr:
            if mp.segments is None:
                li = mp.lr_idx
                deltas = lowrank_delta(x, self.pool_A[li], [B[li] for B in self.pool_B], self.K)
                y = y + torch.cat(deltas, dim=-1)
            else:
                y = y.clone()
                for s, e, _, l, _ in mp.segments:
                    if l != 0:
                        deltas = lowrank_delta(x[s:e], self.pool_A[l], [B[l] for B in self.pool_B], self.K)
                        y[s:e] += torch.cat(deltas, dim=-1)
        return y

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(y, self.out_sizes, dim=-1))
