"""Decode steps replayed from captured graphs: padding to buckets and static buffers give the eager logits.

CUDA graphs need a GPU (tests/test_cuda.py runs them there); here the same `DecodeGraphs` runs with a
"capture" that re-runs the step on replay, which exercises everything but the CUDA graph itself: the row
and context padding, the static inputs copied in before each replay, and adapters rewritten in place.
"""
from __future__ import annotations

import torch

from svd_adapters.decode_graphs import DecodeGraphs, context_bucket, row_bucket
from svd_adapters.runner import BatchedRunner, pack_terms
from test_engine import adapters  # noqa: F401  (the shared fixture)


def eager_capture(fn):
    out = fn()
    return (lambda: out.copy_(fn())), out


def test_buckets():
    assert [row_bucket(n, 32) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 31, 32)] == [1, 2, 4, 4, 8, 8, 16, 16, 24, 32, 32]
    assert row_bucket(7, 6) == 6  # never past the runner's rows
    assert [context_bucket(n, 1024) for n in (1, 64, 65, 200, 1000)] == [64, 64, 128, 256, 1024]
    assert context_bucket(300, 160) == 160


def test_replayed_decode_steps_equal_eager_ones(tiny_base, tiny_factors, adapters):
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=16, max_seq_len=96, core_slots=8, lr_slots=8)
    cs, ls = runner.place(list(adapters.values()), tiny_factors)
    cs, ls = cs + [0, 0], ls + [0, 0]  # 8 adapters of every method and two base rows: 10 rows, padded to 16
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 200, (int(n),), generator=gen).tolist() for n in torch.randint(3, 60, (10,), generator=gen)]
    prompts[0] = prompts[0] + [7] * (63 - len(prompts[0]))  # its steps attend 64, then 65 and 66 keys
    runner.prefill(prompts, list(range(10)), cs, ls)
    graphs = DecodeGraphs(runner._decode_step, 16, 96, runner.device, capture_fn=eager_capture)
    lengths = [len(p) for p in prompts]
    for step in range(3):
        tokens = torch.randint(3, 200, (10,), generator=gen)
        positions = torch.tensor(lengths)
        mixes = [(cs, ls), ([c for c in cs[:6]], [l for l in ls[:6]])]  # 10 rows, then 6 (another bucket)
        for c, l in mixes:
            T = len(c)
            mp = runner.mapping(c, l)
            runner.graphs = None
            eager = runner.decode(tokens[:T], positions[:T], mp)
            runner.graphs = graphs
            replayed = runner.decode(tokens[:T], positions[:T], mp)
            assert replayed.shape == eager.shape
            torch.testing.assert_close(replayed, eager, rtol=0, atol=1e-5)
        lengths = [n + 1 for n in lengths]
    # one graph per bucket (rows padded to 16 or 8; 64 keys, then 128 capped at max_seq_len 96), reused
    assert sorted((k[0], k[1]) for k in graphs.graphs) == [(8, 64), (8, 96), (16, 64), (16, 96)]
    # an adapter rewritten in place (same slot) is what the next replay computes with
    other = next(a for a in adapters.values() if a.method == "loraxs")
    runner.write_core_slot(cs[0], other.terms(tiny_factors))
    mp = runner.mapping(cs, ls)
    positions = torch.tensor(lengths)
    replayed = runner.decode(tokens, positions, mp)
    runner.graphs = None
    torch.testing.assert_close(replayed, runner.decode(tokens, positions, mp), rtol=0, atol=1e-5)


def test_packed_adapter_terms_write_the_same_slots(tiny_base, tiny_factors, adapters):
    """`pack_terms` (how a GPU runner moves an adapter's terms: one transfer, then views of it) loses nothing:
    writing its views into a slot gives the same pools as writing the terms themselves."""
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=4, max_seq_len=16, core_slots=3, lr_slots=3)
    for method in ("osora", "loraxs", "sorsa", "lora"):
        a = next(x for x in adapters.values() if x.method == method)
        terms = a.terms(tiny_factors)
        packed = pack_terms(terms, torch.float32, torch.device("cpu"))
        assert all(getattr(lt.terms, f) is None or getattr(lt.terms, f)._base is not None
                   for lt in packed.values() for f in ("C", "o", "d", "A", "B"))  # views of one buffer
        write = runner.write_core_slot if a.method in ("osora", "loraxs") else runner.write_lr_slot
        write(1, terms)
        want = {g: [t.clone() for t in (p.C, p.o, p.d, p.A, *p.Bt)] for g, p in runner.pools.items()}
        write(1, packed)
        for g, p in runner.pools.items():
            for x, y in zip([p.C, p.o, p.d, p.A, *p.Bt], want[g]):
                assert torch.equal(x, y)
        assert any(bool((t[:, 1] != 0).any()) for ts in want.values() for t in (ts[0], ts[3]))  # something was written


def test_low_rank_row_counts_share_bucketed_graphs(tiny_base, tiny_factors, adapters, monkeypatch):
    """Steps with 1, 2, 3, then 5 low-rank (SORSA / LoRA) rows among 8 replay graphs keyed by the bucketed count
    (1, 2, 4, 8), padded with entries that read the zero adapter, and give the eager logits. Through the PyTorch
    path, the one a GPU takes (the CPU kernel reads every row's slot and has no row list to pad)."""
    from svd_adapters import cpu_kernels

    monkeypatch.setitem(cpu_kernels._state, "force", False)
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=8, max_seq_len=64, core_slots=8, lr_slots=8)
    lr_adapters = [a for a in adapters.values() if a.method in ("sorsa", "lora")]
    core_adapters = [a for a in adapters.values() if a.method in ("osora", "loraxs")]
    cs_lr, ls_lr = runner.place(lr_adapters, tiny_factors)
    cs_core, _ = runner.place(core_adapters, tiny_factors)
    lr_slots = [s for s in ls_lr if s] * 3
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 200, (int(n),), generator=gen).tolist() for n in torch.randint(3, 20, (8,), generator=gen)]
    graphs = DecodeGraphs(runner._decode_step, 8, 64, runner.device, capture_fn=eager_capture)
    for n_lr in (1, 2, 3, 5):
        # rows 0..n_lr-1 low-rank, the rest core adapters or base rows (row n_lr: a base row)
        ls = lr_slots[:n_lr] + [0] * (8 - n_lr)
        cs = [0] * n_lr + [0] + [cs_core[i % len(cs_core)] for i in range(7 - n_lr)]
        runner.prefill(prompts, list(range(8)), cs, ls)
        tokens = torch.randint(3, 200, (8,), generator=gen)
        positions = torch.tensor([len(p) for p in prompts])
        mp = runner.mapping(cs, ls)
        runner.graphs = None
        eager = runner.decode(tokens, positions, mp)
        runner.graphs = graphs
        replayed = runner.decode(tokens, positions, mp)
        torch.testing.assert_close(replayed, eager, rtol=0, atol=1e-5)
    assert sorted(k[4] for k in graphs.graphs) == [1, 2, 4, 8]  # 3 → 4 and 5 → 8 padded, one graph each
