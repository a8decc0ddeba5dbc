"""The Triton source of `gpu_kernels.lowrank_delta` (see there), in a module of its own so that importing
gpu_kernels does not import Triton."""
import triton
import triton.language as tl


@triton.jit
def _member(y_ptr, x_ptr, a_ptr, b_ptr, h_ptr, d_ptr, u_ptr, p, s, kr, live, i: tl.constexpr, col0: tl.constexpr,
            col1: tl.constexpr, N_IN: tl.constexpr, R, s_yt, s_xt, s_as, s_ak, s_bs, s_ht, s_ds, s_ur,
            K: tl.constexpr, K_PAD: tl.constexpr, R_PAD: tl.constexpr, BK_IN: tl.constexpr, BN: tl.constexpr,
            SUB: tl.constexpr):
    j = tl.arange(0, K_PAD)
    j_ok = j < kr
    # t = A_i x: the slot's first kr rows of member i's A, in chunks of the input
    t = tl.zeros((K_PAD,), dtype=tl.float32)
    for n0 in range(0, N_IN, BK_IN):
        nn = n0 + tl.arange(0, BK_IN)
        n_ok = nn < N_IN
        xv = tl.load(x_ptr + p * s_xt + nn, mask=n_ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + s * s_as + (i * K + j)[:, None] * s_ak + nn[None, :], mask=j_ok[:, None] & n_ok[None, :],
                    other=0.0).to(tl.float32)
        t += tl.sum(a * xv[None, :], axis=1)
    if SUB:  # e = d ⊙ h for the subtraction along U_r (SORSA's −σ_r; zero for slots without one)
        r = tl.arange(0, R_PAD)
        r_ok = r < R
        e = (tl.load(d_ptr + s * s_ds + i * R + r, mask=r_ok, other=0.0).to(tl.float32)
             * tl.load(h_ptr + p * s_ht + i * R + r, mask=r_ok, other=0.0).to(tl.float32))
    m = col1 - col0
    for c0 in range(col0, col1, BN):
        cc = c0 + tl.arange(0, BN)
        c_ok = cc < col1
        bt = tl.load(b_ptr + s * s_bs + j[:, None] * m + (cc - col0)[None, :], mask=j_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.sum(t[:, None] * bt, axis=0)
        if SUB:
            u = tl.load(u_ptr + r[:, None] * s_ur + cc[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
            acc += tl.sum(e[:, None] * u.to(tl.float32), axis=0)
        ptrs = y_ptr + p * s_yt + cc
        # `live`: padded entries (slot 0, the zero adapter) store nothing, so they never race a real entry's row
        yv = tl.load(ptrs, mask=c_ok & live, other=0.0).to(tl.float32)
        tl.store(ptrs, (yv + acc).to(y_ptr.dtype.element_ty), mask=c_ok & live)


@triton.jit
def lowrank_delta_kernel(
    y_ptr, x_ptr, a_ptr, b0_ptr, b1_ptr, b2_ptr, rows_ptr, slots_ptr, ranks_ptr, h_ptr, d_ptr, u_ptr,
    N_IN: tl.constexpr, R, b1: tl.constexpr, b2: tl.constexpr, M: tl.constexpr,
    s_yt, s_xt, s_as, s_ak, s_b0s, s_b1s, s_b2s, s_ht, s_ds, s_ur,
    NMEM: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, R_PAD: tl.constexpr, BK_IN: tl.constexpr,
    BN: tl.constexpr, SUB: tl.constexpr,
):
    """One program per (low-rank entry, member): entry e is request row rows[e] reading slot slots[e]. The group's
    shape (input width, member bounds) is compiled in: four variants per model."""
    e = tl.program_id(0)
    i = tl.program_id(1)
    p = tl.load(rows_ptr + e)
    s = tl.load(slots_ptr + e)
    kr = tl.load(ranks_ptr + s)
    live = s != 0
    if i == 0:
        _member(y_ptr, x_ptr, a_ptr, b0_ptr, h_ptr, d_ptr, u_ptr, p, s, kr, live, 0, 0, b1,
                N_IN, R, s_yt, s_xt, s_as, s_ak, s_b0s, s_ht, s_ds, s_ur, K, K_PAD, R_PAD, BK_IN, BN, SUB)
    if NMEM > 1:
        if i == 1:
            _member(y_ptr, x_ptr, a_ptr, b1_ptr, h_ptr, d_ptr, u_ptr, p, s, kr, live, 1, b1, b2,
                    N_IN, R, s_yt, s_xt, s_as, s_ak, s_b1s, s_ht, s_ds, s_ur, K, K_PAD, R_PAD, BK_IN, BN, SUB)
    if NMEM > 2:
        if i == 2:
            _member(y_ptr, x_ptr, a_ptr, b2_ptr, h_ptr, d_ptr, u_ptr, p, s, kr, live, 2, b2, M,
                    N_IN, R, s_yt, s_xt, s_as, s_ak, s_b2s, s_ht, s_ds, s_ur, K, K_PAD, R_PAD, BK_IN, BN, SUB)
