"""A decode step's attention in the CPU kernel (`csrc/decode_attention.cpp`: rotary, cache write, attention)
against the runner's PyTorch path (rotate, index_copy_, SDPA with a mask), and the runner's decode steps with the
kernel against the same steps without it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from svd_adapters import cpu_kernels
from svd_adapters.runner import rotate


@pytest.fixture(autouse=True)
def kernels_built():
    # CI has a C++ compiler (tests/test_core_delta.py: test_kernels_build_here): a failed build fails these tests.
    assert cpu_kernels.available(), "the CPU kernels did not build (see the log for the compiler's error)"


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Row t's query heads against its cached keys [0, pos[t]], grouped-query heads sharing a KV head (in float64;
    the masked positions' NaNs zeroed, which the mask's zero weights would otherwise carry into the sums)."""
    T, Hq, D = q.shape
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    Hkv, L = k.shape[1], int(pos.max()) + 1
    mask = (torch.arange(L)[None, :] <= pos[:, None]).view(T, 1, 1, L)
    o = F.scaled_dot_product_attention(q.view(T, Hkv, Hq // Hkv, D).double(), k[:T, :, :L].double(),
                                       v[:T, :, :L].double(), attn_mask=mask)
    return o.reshape(T, Hq, D)


def case(T: int, Hq: int, Hkv: int, D: int, S: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """A step's inputs as the runner has them: q, k_new, v_new column slices of one (T, ·) GEMM output (strided
    rows), rotary terms at each row's position, and a cache with two rows more than T (rows the kernel must not
    read) where every position past a row's own is NaN (a kernel that read past it would show it); positions
    include 0 and S - 1."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=gen).to(dtype)
    q, k_new, v_new = torch.split(qkv, [Hq * D, Hkv * D, Hkv * D], dim=-1)
    k = torch.randn(T + 2, Hkv, S, D, generator=gen).to(dtype)
    v = torch.randn(T + 2, Hkv, S, D, generator=gen).to(dtype)
    pos = torch.randint(0, S, (T,), generator=gen)
    pos[0], pos[-1] = 0, S - 1
    for t in range(T):
        k[t, :, pos[t] + 1 :] = float("nan")
        v[t, :, pos[t] + 1 :] = float("nan")
    k[T:], v[T:] = float("nan"), float("nan")
    angles = pos[:, None].double() * 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.cat([angles, angles], dim=-1)  # HF's layout: each frequency for both halves
    return dict(q=q.view(T, Hq, D), k_new=k_new.view(T, Hkv, D), v_new=v_new.view(T, Hkv, D), k=k, v=v, pos=pos,
                cos=angles.cos().to(dtype), sin=angles.sin().to(dtype))


def run_kernel(c: dict) -> torch.Tensor:
    D = c["q"].shape[-1]
    return cpu_kernels.decode_attention(c["q"], c["k_new"], c["v_new"], c["k"], c["v"], c["pos"], c["cos"], c["sin"],
                                        D ** -0.5)


def reference(c: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The runner's PyTorch path in float64: rotate, write row t's key and value at its position, SDPA."""
    cos, sin = c["cos"].double().unsqueeze(1), c["sin"].double().unsqueeze(1)
    q, k_new = rotate(c["q"].double(), cos, sin), rotate(c["k_new"].double(), cos, sin)
    k, v = c["k"].double().clone(), c["v"].double().clone()
    for t, p in enumerate(c["pos"].tolist()):
        k[t, :, p], v[t, :, p] = k_new[t], c["v_new"][t].double()
    return sdpa(q, k, v, c["pos"]), k, v


SHAPES = [  # (T, query heads, KV heads, head size, cache length)
    (32, 9, 3, 64, 72),  # SmolLM2-135M: 3 query heads per KV head
    (5, 8, 8, 128, 300),  # no grouping, a longer cache
    (7, 32, 8, 128, 100),  # Llama-style grouping of 4
    (3, 4, 2, 16, 9),  # the tests' tiny model
    (2, 4, 1, 48, 40),  # a head size no vector width divides into a fixed count
]


@pytest.mark.parametrize("shape", SHAPES)
def test_decode_attention_matches_the_pytorch_path_and_reads_only_each_rows_own_positions(shape):
    c = case(*shape, torch.float32)
    want, k_want, v_want = reference(c)
    got = run_kernel(c)
    assert got.shape == c["q"].shape and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max() <= 1e-5
    T = shape[0]  # the cache now holds each row's rotated key and its value at its position, and nothing else changed
    written = torch.isfinite(k_want)
    assert torch.equal(torch.isfinite(c["k"]), written) and torch.equal(torch.isfinite(c["v"]), written)
    assert (c["k"][written].double() - k_want[written]).abs().max() <= 1e-6
    assert torch.equal(c["v"][written].double(), v_want[written])
    assert written[:T].any() and not written[T:].any()


def test_decode_attention_in_bfloat16_within_one_rounding():
    c = case(6, 12, 4, 64, 50, torch.bfloat16, seed=3)
    want = reference(c)[0]
    got = run_kernel(c)
    assert got.dtype == torch.bfloat16
    # inputs rotated in float32 and the key rounded once into the cache: within a few bf16 roundings
    assert ((got.double() - want).abs() <= 2 ** -6 * want.abs().clamp(min=0.1)).all()


def test_decode_attention_gives_the_same_bits_on_one_thread():
    outs = []
    threads = torch.get_num_threads()
    for n in (threads, 1):
        c = case(16, 9, 3, 64, 72, torch.float32, seed=5)
        torch.set_num_threads(n)
        try:
            outs.append((run_kernel(c), c["k"].nan_to_num(7.0)))
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_decode_attention_refuses_bad_inputs_with_a_message():
    c = case(4, 4, 2, 16, 8, torch.float32)
    with pytest.raises(RuntimeError, match="outside the cache"):
        run_kernel({**c, "pos": torch.tensor([0, 1, 2, 8])})
    with pytest.raises(RuntimeError, match="contiguous .* int64 vector"):  # a strided view would be misread
        run_kernel({**c, "pos": torch.tensor([0, 9, 1, 9, 2, 9, 3, 9])[::2]})
    with pytest.raises(RuntimeError, match="contiguous .* int64 vector"):
        run_kernel({**c, "pos": torch.tensor([0, 1, 2, 3], dtype=torch.int32)})
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        run_kernel({**c, "q": torch.randn(4, 3, 16)})
    with pytest.raises(RuntimeError, match="one dtype"):
        run_kernel({**c, "cos": c["cos"].double()})
    with pytest.raises(RuntimeError, match="heads contiguous"):
        run_kernel({**c, "q": torch.randn(4, 16, 4).transpose(1, 2)})
    with pytest.raises(RuntimeError, match="head sizes"):
        run_kernel({**c, "q": torch.randn(4, 4, 12), "k_new": torch.randn(4, 2, 12), "v_new": torch.randn(4, 2, 12),
                    "k": torch.randn(4, 2, 8, 12), "v": torch.randn(4, 2, 8, 12), "cos": torch.randn(4, 12),
                    "sin": torch.randn(4, 12)})


def test_the_runner_uses_the_kernel_only_where_it_takes_the_shapes():
    cache = torch.zeros(4, 2, 8, 64)
    assert cpu_kernels.attends(4, cache)
    assert not cpu_kernels.attends(4, torch.zeros(4, 2, 8, 24))  # head size not a multiple of 16: SDPA
    assert not cpu_kernels.attends(4, cache.double())
    assert not cpu_kernels.attends(4, cache.transpose(1, 2))  # not contiguous
    saved = cpu_kernels._state.get("force")
    try:
        cpu_kernels.force(False)  # "no kernels" means this one too
        assert not cpu_kernels.attends(4, cache)
    finally:
        cpu_kernels.force(saved)


PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]  # rows at different positions


def prefilled_with_and_without_kernels(tiny_base, tiny_factors, monkeypatch):
    """The tiny model's runner with PROMPTS prefilled into rows 0-2: yields (True, runner) with the attention
    kernels, then (False, runner) with them turned off (SDPA; everything else as calibrated)."""
    from svd_adapters.runner import BatchedRunner  # noqa: PLC0415

    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=4, max_batch=3, max_seq_len=32, core_slots=2, lr_slots=2)
    assert cpu_kernels.attends(runner.n_heads, runner.k_cache[0])
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(cpu_kernels, "attends", lambda *a: False)
        runner.prefill(PROMPTS, [0, 1, 2], [0, 0, 0], [0, 0, 0])
        yield fused, runner


def test_decode_steps_with_the_kernel_match_sdpa_through_the_runner(tiny_base, tiny_factors, monkeypatch):
    """Rows at different positions (a row of the batch started later), decoded a few steps with the kernel and
    with SDPA (everything else as calibrated, so only attention differs)."""
    outs = {}
    for fused, runner in prefilled_with_and_without_kernels(tiny_base, tiny_factors, monkeypatch):
        mp = runner.mapping([0, 0, 0], [0, 0, 0])
        pos = [len(p) for p in PROMPTS]
        tokens = torch.tensor([20, 21, 22])
        steps = []
        for _ in range(4):
            logits = runner.decode(tokens, torch.tensor(pos), mp)
            steps.append(logits)
            tokens = logits.argmax(-1)
            pos = [p + 1 for p in pos]
        outs[fused] = torch.stack(steps)
    assert (outs[True] - outs[False]).abs().max() <= 1e-5


# --- a speculative step's attention: a few tokens per row -------------------------------------------------------

def verify_case(R: int, L: int, Hq: int, Hkv: int, D: int, S: int, seed: int = 0) -> dict:
    """R rows of L new tokens (row r's first lengths[r] real, from positions starts[r]; one row full, one with a single
    token, one ending at the cache's last position), strided q / k_new / v_new as the runner has them, and a cache
    where everything a row does not hold or get written is NaN, rows past R included."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(R * L, (Hq + 2 * Hkv) * D, generator=gen)
    q, k_new, v_new = torch.split(qkv, [Hq * D, Hkv * D, Hkv * D], dim=-1)
    lengths = torch.randint(1, L + 1, (R,), generator=gen)
    lengths[0], lengths[-1] = L, 1
    starts = torch.stack([torch.randint(1, int(S - n) + 1, (1,), generator=gen)[0] for n in lengths])
    starts[min(1, R - 1)] = S - lengths[min(1, R - 1)]
    k = torch.randn(R + 2, Hkv, S, D, generator=gen)
    v = torch.randn(R + 2, Hkv, S, D, generator=gen)
    for r in range(R):
        k[r, :, starts[r]:], v[r, :, starts[r]:] = float("nan"), float("nan")
    k[R:], v[R:] = float("nan"), float("nan")
    pos = (starts[:, None] + torch.arange(L)).view(-1)  # pads too: their terms are never used
    angles = pos[:, None].double() * 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.cat([angles, angles], dim=-1)
    return dict(q=q.view(R * L, Hq, D), k_new=k_new.view(R * L, Hkv, D), v_new=v_new.view(R * L, Hkv, D), k=k, v=v,
                starts=starts, lengths=lengths, cos=angles.cos().float(), sin=angles.sin().float())


def run_verify(c: dict) -> torch.Tensor:
    return cpu_kernels.verify_attention(c["q"], c["k_new"], c["v_new"], c["k"], c["v"], c["starts"], c["lengths"],
                                        c["cos"], c["sin"], c["q"].shape[-1] ** -0.5)


@pytest.mark.parametrize("shape", [(1, 5, 9, 3, 64, 300), (4, 5, 9, 3, 64, 40), (3, 3, 8, 8, 128, 64),
                                   (2, 4, 4, 2, 16, 9), (3, 2, 4, 1, 48, 12)])
def test_verify_attention_matches_the_pytorch_path_token_by_token(shape):
    """Each real token attends to its row's keys up to its own position (the row's earlier new tokens included), the
    new keys and values land at their positions and nowhere else, the pads' outputs are zeros."""
    R, L = shape[:2]
    c = verify_case(*shape)
    cos, sin = c["cos"].double().unsqueeze(1), c["sin"].double().unsqueeze(1)
    q, k_new = rotate(c["q"].double(), cos, sin), rotate(c["k_new"].double(), cos, sin)
    k_want, v_want = c["k"].double().clone(), c["v"].double().clone()
    real = [(r, j) for r in range(R) for j in range(int(c["lengths"][r]))]
    for r, j in real:
        k_want[r, :, c["starts"][r] + j], v_want[r, :, c["starts"][r] + j] = k_new[r * L + j], c["v_new"][r * L + j].double()
    tokens = [r * L + j for r, j in real]
    want = sdpa(q[tokens], k_want[[r for r, _ in real]], v_want[[r for r, _ in real]],
                torch.tensor([int(c["starts"][r]) + j for r, j in real]))
    got = run_verify(c)
    assert got.shape == c["q"].shape and torch.isfinite(got).all()
    assert (got[tokens].double() - want).abs().max() <= 1e-5
    pads = [t for t in range(R * L) if t not in tokens]
    assert not got[pads].any()
    written = torch.isfinite(k_want)
    assert torch.equal(torch.isfinite(c["k"]), written) and torch.equal(torch.isfinite(c["v"]), written)
    assert (c["k"][written].double() - k_want[written]).abs().max() <= 1e-6
    assert torch.equal(c["v"][written].double(), v_want[written])


def test_verify_attention_refuses_tokens_that_do_not_fit():
    c = verify_case(2, 3, 4, 2, 16, 9)
    with pytest.raises(RuntimeError, match="do not fit"):
        run_verify({**c, "lengths": torch.tensor([4, 1])})  # more than L
    with pytest.raises(RuntimeError, match="do not fit"):
        run_verify({**c, "starts": torch.tensor([7, 1])})  # past the cache
    with pytest.raises(RuntimeError, match="int64 vector"):
        run_verify({**c, "lengths": torch.tensor([1, 1, 1])})
    with pytest.raises(RuntimeError, match="L tokens"):
        run_verify({**c, "starts": torch.tensor([1, 1, 1, 1])})


def test_speculative_steps_with_the_kernel_match_sdpa_through_the_runner(tiny_base, tiny_factors, monkeypatch):
    """`BatchedRunner.verify` for rows at different positions with feeds of different lengths, with the kernel and
    with SDPA: the same logits at every fed position, and the decode step after it reads the same cache."""
    feeds = [[20, 21, 22, 23], [24], [25, 26]]
    outs = {}
    for fused, runner in prefilled_with_and_without_kernels(tiny_base, tiny_factors, monkeypatch):
        starts = [len(p) for p in PROMPTS]
        logits = runner.verify(feeds, starts, [0, 0, 0], [0, 0, 0])
        after = runner.decode(torch.tensor([30, 31, 32]), torch.tensor([s + len(f) for s, f in zip(starts, feeds)]),
                              runner.mapping([0, 0, 0], [0, 0, 0]))
        outs[fused] = ([logits[i, : len(f)] for i, f in enumerate(feeds)], after)
    for a, b in zip(outs[True][0], outs[False][0]):
        assert (a - b).abs().max() <= 1e-5
    assert (outs[True][1] - outs[False][1]).abs().max() <= 1e-5
