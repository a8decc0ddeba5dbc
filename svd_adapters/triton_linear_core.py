"""The Triton source of `gpu_kernels.linear_core` (see there), in a module of its own so that importing gpu_kernels
does not import Triton."""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a · b accumulated in float32 with exact products: float32 inputs as IEEE products (as cuBLAS without TF32);
    bf16 inputs widened and multiplied as TF32, which holds a bf16 mantissa exactly, on tensor cores. (Widening
    also keeps the tests right: Triton's interpreter, which they run on the CPU, computes bf16 dots wrongly.)"""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")


@triton.jit
def _member_delta(acc, hh, y_tile_first, y_tile_last, start, h_ptr, c_ptr, o, d_ptr, u_ptr, t, c, r, t_ok, c_ok,
                  r_ok, member, R, s_ht, s_cp, s_ck, s_cr, s_dp, s_ur, i: tl.constexpr, SCALED: tl.constexpr,
                  BT: tl.constexpr, R_PAD: tl.constexpr):
    """Member i's part of one tile: write its h where the tile holds its first column, then add each row's
    delta o ⊙ (U_r (C_p h)) + U_r (d_p ⊙ h) to the tile's columns of that member."""
    if (start >= y_tile_first) & (start <= y_tile_last):  # one program writes each member's h
        tl.store(h_ptr + t[:, None] * s_ht + i * R + r[None, :], hh.to(h_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & r_ok[None, :])
    cols = c_ok & (member == i)
    u = tl.load(u_ptr + r[:, None] * s_ur + c[None, :], mask=r_ok[:, None] & cols[None, :], other=0.0).to(tl.float32)
    # g[t, :] = h[t, :] · Ct[t, i]: every row through its own core (stored transposed), one row l of the cores at a
    # time (a (rows, R, R) product at once held too many registers: ptxas spilled them)
    g = tl.zeros((BT, R_PAD), dtype=tl.float32)
    for l in range(0, R_PAD):
        hl = tl.sum(tl.where(r[None, :] == l, hh, 0.0), axis=1)  # h[:, l]
        cl = tl.load(c_ptr + t[:, None] * s_cp + i * s_ck + l * s_cr + r[None, :],
                     mask=t_ok[:, None] & r_ok[None, :] & (l < R), other=0.0).to(tl.float32)
        g += hl[:, None] * cl
    core = tl.dot(g, u, input_precision="ieee")
    if SCALED:
        dd = tl.load(d_ptr + t[:, None] * s_dp + i * R + r[None, :], mask=t_ok[:, None] & r_ok[None, :],
                     other=0.0).to(tl.float32)
        acc += o * core + tl.dot(hh * dd, u, input_precision="ieee")
    else:
        acc += core
    return acc


@triton.jit
def linear_core_kernel(
    x_ptr, w_ptr, y_ptr, h_ptr, c_ptr, o_ptr, d_ptr, u_ptr,
    T, M, R, b1, b2,
    s_xt, s_yt, s_ht, s_cp, s_ck, s_cr, s_op, s_dp, s_ur,
    KIN: tl.constexpr, K: tl.constexpr, SCALED: tl.constexpr, R_PAD: tl.constexpr, BT: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
):
    """One program per BN output columns, all T rows (one token each): the columns' base outputs and the
    projections h_i = V_r,i x of the members those columns belong to, in one pass over x; then each member's delta."""
    pid = tl.program_id(0)
    t = tl.arange(0, BT)
    c = pid * BN + tl.arange(0, BN)
    r = tl.arange(0, R_PAD)
    t_ok, c_ok, r_ok = t < T, c < M, r < R
    first_col = pid * BN
    last_col = tl.minimum(first_col + BN, M) - 1
    first = (first_col >= b1).to(tl.int32) + (first_col >= b2).to(tl.int32)  # members of the tile's first and last column
    last = (last_col >= b1).to(tl.int32) + (last_col >= b2).to(tl.int32)
    member = (c >= b1).to(tl.int32) + (c >= b2).to(tl.int32)
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    h0 = tl.zeros((BT, R_PAD), dtype=tl.float32)
    h1 = tl.zeros((BT, R_PAD), dtype=tl.float32)
    h2 = tl.zeros((BT, R_PAD), dtype=tl.float32)
    for k0 in range(0, KIN, BK):
        kk = k0 + tl.arange(0, BK)
        k_ok = kk < KIN
        xv = tl.load(x_ptr + t[:, None] * s_xt + kk[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + c[None, :] * KIN + kk[:, None], mask=c_ok[None, :] & k_ok[:, None], other=0.0)
        acc += _dot(xv, w, IEEE)
        # V_r,i's rows follow the members' weights in W_aug (row M + i·R + j)
        if first == 0:
            v = tl.load(w_ptr + (M + r)[None, :] * KIN + kk[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
            h0 += _dot(xv, v, IEEE)
        if K > 1:
            if (first <= 1) & (last >= 1):
                v = tl.load(w_ptr + (M + R + r)[None, :] * KIN + kk[:, None], mask=r_ok[None, :] & k_ok[:, None],
                            other=0.0)
                h1 += _dot(xv, v, IEEE)
        if K > 2:
            if last == 2:
                v = tl.load(w_ptr + (M + 2 * R + r)[None, :] * KIN + kk[:, None], mask=r_ok[None, :] & k_ok[:, None],
                            other=0.0)
                h2 += _dot(xv, v, IEEE)
    o = tl.zeros((BT, BN), dtype=tl.float32)
    if SCALED:
        o = tl.load(o_ptr + t[:, None] * s_op + c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=1.0).to(tl.float32)
    if first == 0:
        acc = _member_delta(acc, h0, first_col, last_col, 0, h_ptr, c_ptr, o, d_ptr, u_ptr, t, c, r, t_ok, c_ok,
                            r_ok, member, R, s_ht, s_cp, s_ck, s_cr, s_dp, s_ur, 0, SCALED, BT, R_PAD)
    if K > 1:
        if (first <= 1) & (last >= 1):
            acc = _member_delta(acc, h1, first_col, last_col, b1, h_ptr, c_ptr, o, d_ptr, u_ptr, t, c, r, t_ok, c_ok,
                                r_ok, member, R, s_ht, s_cp, s_ck, s_cr, s_dp, s_ur, 1, SCALED, BT, R_PAD)
    if K > 2:
        if last == 2:
            acc = _member_delta(acc, h2, first_col, last_col, b2, h_ptr, c_ptr, o, d_ptr, u_ptr, t, c, r, t_ok, c_ok,
                                r_ok, member, R, s_ht, s_cp, s_ck, s_cr, s_dp, s_ur, 2, SCALED, BT, R_PAD)
    tl.store(y_ptr + t[:, None] * s_yt + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :])
