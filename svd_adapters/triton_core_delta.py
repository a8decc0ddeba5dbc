"""The Triton source of `gpu_kernels.core_delta` (see there), in a module of its own so that importing
gpu_kernels does not import Triton."""
import triton
import triton.language as tl


@triton.jit
def core_delta_kernel(
    y_ptr, h_ptr, c_ptr, o_ptr, d_ptr, u_ptr,
    T, M, R, tokens_per_row, b1, b2,
    s_yt, s_ht, s_cp, s_ck, s_cr, s_op, s_dp, s_ur,
    K: tl.constexpr, SCALED: tl.constexpr, R_PAD: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
):
    t = tl.program_id(0) * BT + tl.arange(0, BT)  # tokens
    c = tl.program_id(1) * BN + tl.arange(0, BN)  # output columns
    r = tl.arange(0, R_PAD)
    t_ok, c_ok, r_ok = t < T, c < M, r < R
    p = t // tokens_per_row  # each token's request row
    member = (c >= b1).to(tl.int32) + (c >= b2).to(tl.int32)  # which member each column belongs to
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    if SCALED:
        o = tl.load(o_ptr + p[:, None] * s_op + c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=1.0).to(tl.float32)
    # Only the members this tile's columns belong to (one, unless the tile straddles a member bound): each
    # member's pass is a chain of dependent loads and products, which sets a decode-sized kernel's time.
    c_last = tl.minimum(tl.program_id(1) * BN + BN, M) - 1
    first = (tl.program_id(1) * BN >= b1).to(tl.int32) + (tl.program_id(1) * BN >= b2).to(tl.int32)
    last = (c_last >= b1).to(tl.int32) + (c_last >= b2).to(tl.int32)
    for i in tl.static_range(K):
        if (i >= first) & (i <= last):
            cols_i = c_ok & (member == i)
            u = tl.load(u_ptr + r[:, None] * s_ur + c[None, :], mask=r_ok[:, None] & cols_i[None, :], other=0.0).to(tl.float32)
            h = tl.load(h_ptr + t[:, None] * s_ht + i * R + r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            # g[t, :] = h[t, :] · Ct[p(t), i]: every token through its own row's core (stored transposed)
            ct = tl.load(c_ptr + p[:, None, None] * s_cp + i * s_ck + r[None, :, None] * s_cr + r[None, None, :],
                         mask=t_ok[:, None, None] & r_ok[None, :, None] & r_ok[None, None, :], other=0.0).to(tl.float32)
            g = tl.sum(h[:, :, None] * ct, axis=1)
            core = tl.dot(g, u, input_precision="ieee")
            if SCALED:
                dd = tl.load(d_ptr + p[:, None] * s_dp + i * R + r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
                acc += o * core + tl.dot(h * dd, u, input_precision="ieee")
            else:
                acc += core
    ptrs = y_ptr + t[:, None] * s_yt + c[None, :]
    mask = t_ok[:, None] & c_ok[None, :]
    y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)

