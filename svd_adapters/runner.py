"""A flat, batched forward for Llama-family models with per-row adapters and a per-row KV cache.

Rows of the KV cache are batch slots; the engine keeps the active rows compacted in [0, n_active), so a
decode step reads plain views of the cache. Prefill runs several new requests (right-padded) at once and
writes their rows; decode advances every active row by one token. The HF model supplies the weights,
norms, rotary embedding and lm_head; its linears are replaced by fused `LinearGroup`s.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from svd_adapters import cpu_kernels
from svd_adapters.base_model import BaseModel
from svd_adapters.batched_linear import GroupPools, LinearGroup, SlotMapping
from svd_adapters.decode_graphs import DecodeGraphs
from svd_adapters.factors import BaseFactors
from svd_adapters.adapter import Adapter, LayerTerms
from svd_adapters.methods import pool_of

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_TERM_FIELDS = ("C", "o", "d", "A", "B")
# Members of each fused group, by the HF linear's short name; one GEMM serves a whole group.
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def pack_terms(terms: dict[str, LayerTerms], dtype: torch.dtype, device: torch.device) -> dict[str, LayerTerms]:
    """Every term tensor in `dtype` on `device`, moved in one transfer and returned as views of it: copied one
    by one, each of an adapter's ~20 tensors would be a blocking host → GPU copy waiting for queued decode work."""
    parts = [(kind, f, t) for kind, lt in terms.items() for f in _TERM_FIELDS if (t := getattr(lt.terms, f)) is not None]
    if not parts:
        return terms
    flat = torch.cat([t.reshape(-1).to(dtype) for _, _, t in parts]).to(device, non_blocking=True)
    moved: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in terms}
    at = 0
    for kind, f, t in parts:
        moved[kind][f] = flat[at : at + t.numel()].view(t.shape)
        at += t.numel()
    return {kind: LayerTerms(lt.layers, dataclasses.replace(lt.terms, **moved[kind])) for kind, lt in terms.items()}


class BatchedRunner(nn.Module):
    def __init__(
        self,
        base: BaseModel,
        factors: BaseFactors,
        max_rank: int = 16,
        max_batch: int = 32,
        max_seq_len: int = 1024,
        core_slots: int = 64,
        lr_slots: int = 8,
        cuda_graphs: bool = True,
    ):
        super().__init__()
        model, cfg = base.model, base.model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model type {cfg.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        if max_rank > factors.r_max:
            raise ValueError(f"max_rank {max_rank} exceeds the base factors' r_max {factors.r_max}")
        self.cfg, self.factors = cfg, factors
        self.max_rank, self.max_batch, self.max_seq_len = max_rank, max_batch, max_seq_len
        self.core_slots, self.lr_slots = core_slots, lr_slots
        self.embed = model.model.embed_tokens
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.rotary = model.model.rotary_emb
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        ref = self.embed.weight
        layers = model.model.layers
        # One pool set per group kind, spanning all layers (gathered once per decode step).
        self.pools: dict[str, GroupPools] = {}
        for gname, members in GROUPS.items():
            parent = layers[0].self_attn if gname in ("qkv", "o") else layers[0].mlp
            lins = [getattr(parent, m) for m in members]
            self.pools[gname] = GroupPools([l.out_features for l in lins], lins[0].in_features, len(layers),
                                           max_rank, core_slots, lr_slots, like=ref)
        self.member_of = {m: (gname, i) for gname, members in GROUPS.items() for i, m in enumerate(members)}
        # Llama, Mistral and Qwen2 share one RMSNorm formula (weight · x / rms(x)); the kernel computes exactly that.
        self.rms_norms = all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon")
                             for l in layers for n in (l.input_layernorm, l.post_attention_layernorm, model.model.norm))
        self.layers = nn.ModuleList()
        self.group_of: dict[str, LinearGroup] = {}  # qualified module name → its group
        for li, layer in enumerate(layers):
            groups = nn.ModuleDict()
            for gname, members in GROUPS.items():
                attn = gname in ("qkv", "o")
                parent = layer.self_attn if attn else layer.mlp
                names = [f"model.layers.{li}.{'self_attn' if attn else 'mlp'}.{m}" for m in members]
                grp = LinearGroup(names, [getattr(parent, m) for m in members], [factors.modules[n] for n in names],
                                  self.pools[gname], li)
                groups[gname] = grp
                self.group_of.update({n: grp for n in names})
            block = nn.Module()
            block.groups = groups
            block.ln1, block.ln2, block.act = layer.input_layernorm, layer.post_attention_layernorm, layer.mlp.act_fn
            block.silu = getattr(cfg, "hidden_act", None) in ("silu", "swish")  # the kernels can fuse this activation
            self.layers.append(block)
        self._slot_version = [0] * core_slots
        self._lr_slot_version = [0] * lr_slots
        # Core slots whose adapter scales outputs and subtracts U_r σ_r V_rᵀ (OSoRA), read off the terms written
        # there, so no caller has to keep (and can get wrong) a list of its own.
        self.scaled_slots: set[int] = set()
        self.lr_sub_slots: set[int] = set()  # low-rank slots whose adapter has a d-term (SORSA): steps need h
        # (slot, its version) per row buffer; the buffers are made on first use (`_refresh_rows`): the CPU kernel
        # reads the slot pools and never needs them.
        self._row_keys: list[tuple[int, int] | None] | None = None
        if self.device.type == "cpu":
            # Build (the first time) and load the CPU kernels now, not in a request, and time the decode GEMMs'
            # kernel against torch's matmul for this model's weight shapes.
            grp = self.layers[0].groups
            cpu_kernels.calibrate([w for g in grp.values() for w in (g.W_aug, g.W_aug[: g.M])] + [self.lm_head.weight],
                                  rows=max_batch)
            # and each group's ways to a prefill's projections
            cpu_kernels.calibrate_prefill([g.prefill_calibration() for g in grp.values()])
            cpu_kernels.keep_large_blocks()
        shape = (max_batch, self.n_kv, max_seq_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in self.layers]
        self.last_hidden: torch.Tensor | None = None  # see prefill(keep_hidden=True)
        # On a GPU, decode steps replay captured graphs (launching a step's kernels one by one from Python
        # costs more than running them); `cuda_graphs=False` runs them eagerly.
        self.graphs = (DecodeGraphs(self._decode_step, max_batch, max_seq_len, self.device)
                       if cuda_graphs and self.device.type == "cuda" else None)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    # ---- adapter slots ----
    @torch.no_grad()
    def write_core_slot(self, slot: int, terms: dict[str, LayerTerms]) -> None:
        """Put an OSoRA / LoRA-XS adapter (`Adapter.terms`: per module kind, stacked over layers) in a slot."""
        self._slot_version[slot] += 1  # row buffers holding this slot's old contents are now stale
        terms = self._on_device(terms)
        for pools in self.pools.values():
            pools.clear_core(slot)
        for kind, lt in terms.items():
            gname, i = self.member_of[kind]
            self.pools[gname].write_core(slot, lt.layers, i, lt.terms)
        if any(lt.terms.o is not None or lt.terms.d is not None for lt in terms.values()):
            self.scaled_slots.add(slot)
        else:
            self.scaled_slots.discard(slot)

    @torch.no_grad()
    def write_lr_slot(self, slot: int, terms: dict[str, LayerTerms]) -> None:
        """Put a SORSA / LoRA adapter in a low-rank slot."""
        self._lr_slot_version[slot] += 1
        terms = self._on_device(terms)
        for pools in self.pools.values():
            pools.clear_lr(slot)
        for kind, lt in terms.items():
            gname, i = self.member_of[kind]
            self.pools[gname].write_lr(slot, lt.layers, i, lt.terms)
        if any(lt.terms.d is not None for lt in terms.values()):
            self.lr_sub_slots.add(slot)
        else:
            self.lr_sub_slots.discard(slot)

    def _on_device(self, terms: dict[str, LayerTerms]) -> dict[str, LayerTerms]:
        """On a GPU, the adapter's terms moved in one transfer (`pack_terms`); on the CPU as they are (the pools
        convert; packing first measured 2× slower slot writes there)."""
        ref = self.pools["qkv"].C
        return terms if ref.device.type == "cpu" else pack_terms(terms, ref.dtype, ref.device)

    def place(self, adapters: list[Adapter], factors: BaseFactors, first_core_slot: int = 1,
              first_lr_slot: int = 1) -> tuple[list[int], list[int]]:
        """Each adapter in its own slot of its pool, consecutively from the given first slots; returns every
        adapter's core slot and low-rank slot (0 for the pool it is not in). For benchmarks and tests: the
        engine places adapters through its LRU device cache instead."""
        nxt = {"core": first_core_slot, "lr": first_lr_slot}
        core, lr = [], []
        for a in adapters:
            pool = pool_of(a.method)
            slot, nxt[pool] = nxt[pool], nxt[pool] + 1
            (self.write_core_slot if pool == "core" else self.write_lr_slot)(slot, a.terms(factors))
            core.append(slot if pool == "core" else 0), lr.append(slot if pool == "lr" else 0)
        return core, lr

    def mapping(self, core_slots: list[int], lr_slots: list[int], tokens_per_row: int = 1) -> SlotMapping:
        """The step's slot mapping for rows reading these slots (0 = none)."""
        return SlotMapping.build(core_slots, lr_slots, self.scaled_slots, tokens_per_row, device=self.device,
                                 lr_sub_slots=self.lr_sub_slots)

    def adapter_state(self, core_slot: int, lr_slot: int) -> tuple[int, int, int, int]:
        """What a row reading these slots computes with: the slots and how many times each was written. Equal states
        give the same keys and values for the same tokens (what a prefix cache may key on); rewriting a slot changes
        its state, so nothing computed with its old adapter is taken for the new one."""
        return core_slot, self._slot_version[core_slot], lr_slot, self._lr_slot_version[lr_slot]

    # ---- KV rows ----
    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row src's cache into row dst (compaction after a request leaves)."""
        for kc, vc in zip(self.k_cache, self.v_cache):
            kc[dst, :, :length] = kc[src, :, :length]
            vc[dst, :, :length] = vc[src, :, :length]

    # ---- forward ----
    def _layers(self, x: torch.Tensor, mp: SlotMapping, attend, rows: dict[str, dict[str, tuple[torch.Tensor, ...]]]
                ) -> torch.Tensor:
        """The decoder layers; attend(li, q, k, v) gets each layer's queries, keys and values before the rotary
        embedding (T, heads, D): it rotates them (the CPU decode kernel does so as it reads them)."""
        T = x.shape[0]
        for li, blk in enumerate(self.layers):
            g = blk.groups
            q, k, v = g["qkv"].split(g["qkv"](self._norm(blk.ln1, x), mp, rows["qkv"]))
            attn = attend(li, q.view(T, self.n_heads, self.head_dim), k.view(T, self.n_kv, self.head_dim),
                          v.view(T, self.n_kv, self.head_dim)).reshape(T, self.n_heads * self.head_dim)
            x = x + g["o"](attn, mp, rows["o"])
            x = x + g["down"](g["gate_up"].gated(self._norm(blk.ln2, x), mp, rows["gate_up"], blk.act, blk.silu), mp,
                              rows["down"])
        return self._norm(self.norm, x)

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's RMSNorm module applied to x (T, H): by the CPU kernel where it takes x (one call, not ~7 ops)."""
        if self.rms_norms and norm.weight.dtype == x.dtype and cpu_kernels.normalizes(x):
            return cpu_kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
        return norm(x)

    def _gathered(self, mp: SlotMapping, decode: bool) -> dict[str, dict[str, tuple[torch.Tensor, ...]]]:
        """Every layer's core tensors for the step's rows. The CPU kernel reads them from the slot pools by each
        row's slot. Otherwise prefill gathers them once for the step, and decode keeps them in per-row buffers
        and copies only rows whose adapter changed since the last step (a request joined, left, or its slot was
        rewritten), so a steady decode step just reads them (CUDA graphs read those buffers too)."""
        if cpu_kernels.serves(self.pools["qkv"].C):  # the CPU kernel reads the slot pools: nothing to copy
            return {g: pools.by_slot(mp) for g, pools in self.pools.items()}
        if not decode or not mp.has_core:
            return {g: pools.gather(mp) for g, pools in self.pools.items()}
        self._refresh_rows(mp)
        return {g: pools.cached_rows(mp) for g, pools in self.pools.items()}

    def _refresh_rows(self, mp: SlotMapping) -> None:
        """Copy into the row buffers the core tensors of rows whose adapter changed (see `_gathered`)."""
        if not mp.has_core:
            return
        if self._row_keys is None:
            for pools in self.pools.values():
                pools.enable_row_cache(self.max_batch)
            self._row_keys = [None] * self.max_batch
        slots = mp.core_slots if mp.core_slots is not None else mp.core_idx.tolist()
        keys = [(s, self._slot_version[s]) for s in slots]
        changed = [i for i, k in enumerate(keys) if self._row_keys[i] != k]
        if changed:
            rows = torch.tensor(changed, device=self.device)
            slots = torch.tensor([keys[i][0] for i in changed], device=self.device)
            for pools in self.pools.values():
                pools.refresh_rows(rows, slots)
            for i in changed:
                self._row_keys[i] = keys[i]

    def _cos_sin(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(x, positions.view(1, -1))
        return cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (T, 1, D): broadcast over heads

    @torch.inference_mode()
    def prefill(
        self, prompts: list[list[int]], rows: list[int], core_slots: list[int], lr_slots: list[int],
        all_logits: bool = False, keep_hidden: bool = False, starts: list[int] | None = None,
        decode_like: bool = False,
    ) -> torch.Tensor:
        """Run new requests' prompts into KV rows `rows`; returns last-token logits (P, V) or all (P, L, V).

        With `starts`, prompt i is the rest of a longer one whose first starts[i] tokens' keys and values are in
        row rows[i] already (a cached prefix, `service/prefix_cache.py`): its tokens take positions from there.

        With `keep_hidden`, the final hidden states (P, L, H) stay in `last_hidden` until the next prefill, so
        the logits of chosen prompts' every position (`position_logits`) cost nothing for the others.

        `decode_like` (a speculative step, `verify`: rows 0..P-1 continued by a few tokens): the new tokens' keys are
        rotated and attended to by the decode step's kernel on the CPU, the rotary arithmetic a decode step uses (a
        prompt's continuation after a cached prefix keeps torch's, the bits of a whole prompt's prefill)."""
        P, L = len(prompts), max(len(p) for p in prompts)
        offset = starts is not None and any(starts)
        if offset and keep_hidden:
            raise ValueError("keep_hidden needs whole prompts (no starts)")
        if max(len(p) + (starts[i] if offset else 0) for i, p in enumerate(prompts)) > self.max_seq_len:
            raise ValueError(f"a prompt reaches past max_seq_len {self.max_seq_len}")
        ids = torch.full((P, L), self.cfg.pad_token_id or 0, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        ids = ids.to(self.device)
        x = self.embed(ids.view(-1))
        if offset:
            at = torch.tensor(starts, device=self.device)
            positions = (at[:, None] + torch.arange(L, device=self.device)).view(-1)
        else:  # from position 0: no host-to-device copy of the starts
            positions = torch.arange(L, device=self.device).repeat(P)
        cos, sin = self._cos_sin(x, positions)
        mp = self.mapping(core_slots, lr_slots, L)
        row_idx = torch.tensor(rows, device=self.device)
        rows_host = torch.tensor(rows, dtype=torch.long)
        if offset:
            lengths = torch.tensor([len(p) for p in prompts], device=self.device)
            attend = self._attend_after_prefix(row_idx, at, lengths, positions.view(P, L), cos, sin,
                                               rows_from_0=rows == list(range(P)), decode_like=decode_like)
        else:
            attend = self._attend_from_start(row_idx, rows_host, P, L, cos, sin)
        h = self._layers(x, mp, attend, self._gathered(mp, decode=False)).view(P, L, -1)
        self.last_hidden = h if keep_hidden else None
        if all_logits:
            return self.logits(h.reshape(P * L, -1)).view(P, L, -1)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return self.logits(h[torch.arange(P, device=self.device), last])

    def _attend_from_start(self, row_idx: torch.Tensor, rows_host: torch.Tensor, P: int, L: int, cos: torch.Tensor,
                           sin: torch.Tensor):
        """A prefill's attention for prompts from position 0: each row's keys are its own tokens."""
        def attend(li, q, k, v):
            # (P·L, heads, D) → (P, heads, L, D); right padding means causal masking alone keeps pads unseen.
            if cpu_kernels.rotates(q, k, v, self.k_cache[li]):  # q, k rotated in place; the cache written in the same pass
                cpu_kernels.prefill_rotary(q, k, v, cos, sin, self.k_cache[li], self.v_cache[li], rows_host, L)
            else:
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
                self.k_cache[li][row_idx, :, :L] = k.view(P, L, self.n_kv, self.head_dim).transpose(1, 2)
                self.v_cache[li][row_idx, :, :L] = v.view(P, L, self.n_kv, self.head_dim).transpose(1, 2)
            q = q.view(P, L, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(P, L, self.n_kv, self.head_dim).transpose(1, 2)
            v = v.view(P, L, self.n_kv, self.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
            return o.transpose(1, 2).reshape(P * L, self.n_heads, self.head_dim)
        return attend

    def _attend_after_prefix(self, row_idx: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                             positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows_from_0: bool = False,
                             decode_like: bool = False):
        """A prefill's attention for prompts whose first `starts[i]` tokens are in row i's cache already (a cached
        prefix): the new tokens' keys and values go into the cache at their positions (pads write nothing: their
        positions may lie past the cache), then each query attends to its row's keys up to its own position.
        `rows_from_0`: the rows are 0..P-1 (a speculative step's, `verify`), read as a view of the cache, not
        gathered (a copy of every row's keys per layer); with `decode_like` too, through the decode step's kernel
        on the CPU (`cpu_kernels.verify_attention`)."""
        P, L = positions.shape
        if rows_from_0 and decode_like and cpu_kernels.attends(self.n_heads, self.k_cache[0]):
            # one kernel a layer: rotary, the cache writes, each token's keys up to its own position
            def attend_fused(li, q, k, v):
                return cpu_kernels.verify_attention(q, k, v, self.k_cache[li], self.v_cache[li], starts, lengths, cos,
                                                    sin, self.head_dim ** -0.5)
            return attend_fused
        S = min(int(starts.max()) + L, self.max_seq_len)
        heads = torch.arange(self.n_kv, device=self.device)
        real = (torch.arange(L, device=self.device)[None, :] < lengths[:, None])[:, None, :].expand(P, self.n_kv, L)
        flat = ((row_idx[:, None, None] * self.n_kv + heads[None, :, None]) * self.max_seq_len
                + positions[:, None, :])[real]
        mask = (torch.arange(S, device=self.device)[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # (P, 1, L, S)

        def attend(li, q, k, v):
            kc, vc = self.k_cache[li], self.v_cache[li]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            for cache, new in ((kc, k), (vc, v)):  # (P·L, kv, D) → (P, kv, L, D), the order of `flat`
                cache.view(-1, self.head_dim).index_copy_(0, flat, new.view(P, L, self.n_kv, self.head_dim)
                                                          .transpose(1, 2)[real])
            q = q.view(P, L, self.n_heads, self.head_dim).transpose(1, 2)
            keys, values = (kc[:P, :, :S], vc[:P, :, :S]) if rows_from_0 else (kc[row_idx, :, :S], vc[row_idx, :, :S])
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
            return o.transpose(1, 2).reshape(P * L, self.n_heads, self.head_dim)
        return attend

    @torch.inference_mode()
    def verify(self, feeds: list[list[int]], starts: list[int], core_slots: list[int], lr_slots: list[int]) -> torch.Tensor:
        """A speculative step (`service/speculative.py`): active row i (rows 0..P-1) is fed feeds[i] — its next
        token and a draft of the tokens after it — at positions from starts[i]; returns the logits (P, L, V) at
        every fed position (rows with shorter feeds: their positions past it are padding). The keys and values of
        every fed token go into the row; those of drafts that turn out wrong lie past the row's length and are
        overwritten by the next step (attention reads each row up to its own position only)."""
        P = len(feeds)
        if min(starts) < 1:
            raise ValueError("verify continues rows that hold their context (starts ≥ 1)")
        return self.prefill(feeds, list(range(P)), core_slots, lr_slots, all_logits=True, starts=starts,
                            decode_like=True)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, mp: SlotMapping, context: int | None = None) -> torch.Tensor:
        """One token for each active row 0..T-1 at its position; returns logits (T, V).

        `context`: max(positions) + 1 where the caller knows it (spares reading it back from the device)."""
        if context is None:
            context = int(positions.max()) + 1
        if self.graphs is not None:
            self._refresh_rows(mp)  # the graph reads the row buffers
            return self.graphs.run(tokens, positions, mp, context)
        return self._decode_step(tokens, positions, mp, context, self._gathered(mp, decode=True))

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, mp: SlotMapping, L: int,
                     rows: dict[str, dict[str, tuple[torch.Tensor, ...]]] | None = None) -> torch.Tensor:
        """The decode step over keys [0, L); `rows` defaults to the row buffers' current contents (graphs)."""
        T = tokens.shape[0]
        if rows is None:
            rows = {g: pools.cached_rows(mp) for g, pools in self.pools.items()}
        x = self.embed(tokens)
        cos, sin = self._cos_sin(x, positions)
        fused_attention = cpu_kernels.attends(self.n_heads, self.k_cache[0])
        if not fused_attention:
            mask = (torch.arange(L, device=self.device)[None, :] <= positions[:, None]).view(T, 1, 1, L)
            # Flat (row, kv-head, position) offsets into the cache viewed as (rows·heads·seq, D): index_copy_ is
            # one cheap scatter, unlike advanced-index assignment.
            heads = torch.arange(self.n_kv, device=self.device)
            flat = ((torch.arange(T, device=self.device)[:, None] * self.n_kv + heads) * self.max_seq_len
                    + positions[:, None]).view(-1)
        group = self.n_heads // self.n_kv

        def attend(li, q, k, v):
            kc, vc = self.k_cache[li], self.v_cache[li]
            if fused_attention:  # one kernel: rotary, the cache write, each row's keys up to its own position
                return cpu_kernels.decode_attention(q, k, v, kc, vc, positions, cos, sin, self.head_dim ** -0.5)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            kc.view(-1, self.head_dim).index_copy_(0, flat, k.reshape(-1, self.head_dim))
            vc.view(-1, self.head_dim).index_copy_(0, flat, v.reshape(-1, self.head_dim))
            # One query per row: the query heads sharing a KV head become that head's queries (same mask),
            # so no GQA expansion of the cache is needed (several times faster on CPU, bf16 most of all).
            o = F.scaled_dot_product_attention(q.view(T, self.n_kv, group, self.head_dim), kc[:T, :, :L], vc[:T, :, :L],
                                               attn_mask=mask)
            return o.reshape(T, self.n_heads, self.head_dim)

        return self.logits(self._layers(x, mp, attend, rows))

    def position_logits(self, i: int, n: int) -> torch.Tensor:
        """Logits (n, V) at the first n positions of prompt i of the last prefill run with `keep_hidden`."""
        if self.last_hidden is None:
            raise RuntimeError("position_logits needs the last prefill to have run with keep_hidden=True")
        return self.lm_head(self.last_hidden[i, :n])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head for one hidden state per row (through the skinny-GEMM kernel where it is faster)."""
        y = cpu_kernels.matmul_t(h, self.lm_head.weight)
        return y + self.lm_head.bias if self.lm_head.bias is not None else y
