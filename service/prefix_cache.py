"""Automatic prefix caching: the keys and values of prompt prefixes already computed, reused by later prompts.

Many requests start alike: a tenant's system prompt, few-shot examples, the earlier turns of a chat. Their
keys and values depend only on the tokens and on the adapter the row computes with, so a later prompt that
starts with the same tokens on the same adapter copies them into its KV row and prefills only the rest (on a
CPU, where a prompt token costs ~1 ms of a small model's prefill, the first token of a 300-token prompt whose
first 288 are cached comes several times sooner).

Prompts are cut into blocks of `block_tokens`; a block's entry is keyed by its parent block's entry, a state the
engine gives (what the row computes with — the adapter's stored version, or its slot as written when the version
is unknown, so a replaced adapter never reuses its old keys — and the request's scope, so one tenant never
reuses, and so learns of, another's prompts; `Engine._prefix_key`) and the block's tokens, compared exactly (no
hash collisions). The blocks' keys and values
live in a fixed pool per layer on the model's device, `capacity_tokens` in all; a full pool evicts the least
recently used block. A lookup refreshes a matched chain deepest block first, so a prefix outlives the blocks
that extend it. Used by the engine thread only (no locking).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from svd_adapters.runner import BatchedRunner

_Key = tuple[int, tuple, tuple[int, ...]]  # (parent entry, state: what the row computes with and who may reuse it, tokens)


class PrefixCache:
    def __init__(self, runner: BatchedRunner, capacity_tokens: int, block_tokens: int = 16):
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be at least 1, got {block_tokens}")
        self.runner, self.block = runner, block_tokens
        self.blocks = capacity_tokens // block_tokens
        if self.blocks < 1:
            raise ValueError(f"a prefix cache of {capacity_tokens} tokens holds no block of {block_tokens}; "
                             f"give at least {block_tokens} tokens (or 0 to turn it off)")
        kc = runner.k_cache[0]
        shape = (self.blocks, kc.shape[1], block_tokens, kc.shape[3])  # (blocks, kv heads, tokens, head dim)
        self.k = [torch.zeros(shape, dtype=kc.dtype, device=kc.device) for _ in runner.k_cache]
        self.v = [torch.zeros(shape, dtype=kc.dtype, device=kc.device) for _ in runner.k_cache]
        self.nbytes = 2 * sum(t.numel() * t.element_size() for t in self.k)
        self._entries: OrderedDict[_Key, tuple[int, int]] = OrderedDict()  # key → (entry id, pool block), LRU first
        self._free = list(range(self.blocks - 1, -1, -1))
        self._next_id = 1  # entry ids are never reused: a child of an evicted block can never match again
        self.hits = self.misses = self.reused_tokens = self.evictions = 0

    def _chain(self, state: tuple, tokens: list[int], limit: int) -> list[tuple[_Key, int, int]]:
        """The cached blocks that start `tokens` (at most `limit` tokens), as (key, entry id, pool block)."""
        found, parent, B = [], 0, self.block
        for b in range(limit // B):
            key = (parent, state, tuple(tokens[b * B : (b + 1) * B]))
            hit = self._entries.get(key)
            if hit is None:
                break
            found.append((key, *hit))
            parent = hit[0]
        return found

    def _touch(self, keys: list[_Key]) -> None:
        for key in reversed(keys):  # deepest first: the shorter prefixes end up most recently used
            self._entries.move_to_end(key)

    def cached(self, state: tuple, tokens: list[int]) -> int:
        """How many tokens `load` would copy now, without copying or refreshing anything (admission's estimate
        of what a prompt will compute)."""
        return len(self._chain(state, tokens, len(tokens) - 1)) * self.block

    def load(self, state: tuple, tokens: list[int], row: int) -> int:
        """Copy the longest cached prefix of `tokens` (leaving at least its last token to compute: the prefill
        needs it for the next token's logits) into KV row `row`; returns how many tokens that is."""
        return self.load_many([(state, tokens, row)])[0]

    def load_many(self, prompts: list[tuple[tuple, list[int], int]]) -> list[int]:
        """`load` for several (adapter state, tokens, row), in one copy per layer."""
        moves, found = [], []
        for state, tokens, row in prompts:
            chain = self._chain(state, tokens, len(tokens) - 1)
            self._touch([key for key, _, _ in chain])
            moves += [(row, b, blk) for b, (_, _, blk) in enumerate(chain)]
            found.append(len(chain) * self.block)
            self.hits += bool(chain)
            self.misses += not chain
        self.reused_tokens += sum(found)
        if moves:
            cache_at, pool_at = self._indices(moves)
            for pool, cache in self._pairs():
                cache.view(-1, cache.shape[-1]).index_copy_(0, cache_at, pool.view(-1, pool.shape[-1])[pool_at])
        return found

    def store(self, state: tuple, tokens: list[int], row: int) -> None:
        """Keep the full blocks of `tokens`, whose keys and values KV row `row` holds, that are not cached yet."""
        self.store_many([(state, tokens, row)])

    def store_many(self, prompts: list[tuple[tuple, list[int], int]]) -> None:
        """`store` for several (adapter state, tokens, row), in one copy per layer."""
        B, moves = self.block, []
        for state, tokens, row in prompts:
            chain = self._chain(state, tokens, len(tokens))
            keys = [key for key, _, _ in chain]
            self._touch(keys)  # most recent: the new blocks below evict other entries, never these
            parent = chain[-1][1] if chain else 0
            # at most as many as leave the chain and this prompt's blocks in the pool (an evicted one of them could
            # hand its pool block to a later one)
            for b in range(len(chain), min(len(tokens) // B, self.blocks)):
                blk = self._take()
                key = (parent, state, tuple(tokens[b * B : (b + 1) * B]))
                parent, self._next_id = self._next_id, self._next_id + 1
                self._entries[key] = (parent, blk)
                keys.append(key)
                moves = [m for m in moves if m[2] != blk]  # a block an earlier prompt of this call stored, now evicted
                moves.append((row, b, blk))
            self._touch(keys)
        if moves:
            cache_at, pool_at = self._indices(moves)
            for pool, cache in self._pairs():
                pool.view(-1, pool.shape[-1]).index_copy_(0, pool_at, cache.view(-1, cache.shape[-1])[cache_at])

    def _pairs(self):
        """(pool, KV cache) of every layer, keys and values."""
        for pk, pv, kc, vc in zip(self.k, self.v, self.runner.k_cache, self.runner.v_cache):
            yield pk, kc
            yield pv, vc

    def _indices(self, moves: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat row indices, into a layer's cache viewed as (rows·heads·positions, D) and its pool viewed as
        (blocks·heads·B, D), of (KV row, block of the prompt, pool block) moves: one gather and one scatter per
        layer, however many prompts and blocks."""
        kc, B = self.runner.k_cache[0], self.block
        heads, seq = kc.shape[1], kc.shape[2]
        m = torch.tensor(moves, dtype=torch.long)
        h = torch.arange(heads)[None, :, None]
        t = torch.arange(B)[None, None, :]
        cache_at = (m[:, 0, None, None] * heads + h) * seq + m[:, 1, None, None] * B + t
        pool_at = (m[:, 2, None, None] * heads + h) * B + t
        dev = kc.device
        return cache_at.view(-1).to(dev), pool_at.view(-1).to(dev)

    def _take(self) -> int:
        """A free pool block, evicting the least recently used entry when there is none."""
        if self._free:
            return self._free.pop()
        _, (_, blk) = self._entries.popitem(last=False)
        self.evictions += 1
        return blk

    def clear(self) -> None:
        self._free = list(range(self.blocks - 1, -1, -1))
        self._entries.clear()

    def stats(self) -> dict[str, int]:
        return {"prefix_cache_hits": self.hits, "prefix_cache_misses": self.misses,
                "prefix_cached_tokens": self.reused_tokens, "prefix_cache_evictions": self.evictions,
                "prefix_cache_blocks_used": len(self._entries)}
