// y = x · Wᵀ over a block of rows and columns, for the few rows of a decode step: the register-blocked tile shared
// by skinny_linear.cpp (a whole product) and core_linear.cpp (a group's product fused with its core delta).
//
// x (T, K) and W (N, K) row-major as nn.Linear stores it; float32 or bfloat16, accumulated in float32. A tile is RB
// rows × CB columns of dot products along K in vector registers: each W load shared by RB rows, each x load by CB
// columns, the CB rows of W (a few KB) staying in L1 while the rows stream past.
#pragma once

#include <cstdint>

#include "vec.h"

namespace svdserve {

// RB×CB accumulators + RB x + 1 W within the vector registers: 12 + 4 + 1 of AVX2's 16, 24 + 4 + 1 of AVX-512's 32
constexpr int kGemmRB = 4, kGemmCB = kVecRegs == 32 ? 6 : 3;

template <int RB_, int CB_, typename scalar_t>
inline void gemm_tile(const scalar_t* x, int64_t sx, const scalar_t* W, int64_t K, scalar_t* y, int64_t sy, int64_t t,
                      int64_t n) {
  using V = Vec<float>::type;
  V acc[RB_][CB_];
  for (int r = 0; r < RB_; ++r)
    for (int c = 0; c < CB_; ++c) acc[r][c] = V{};  // not `= {}`: that became a slow rep-stos of a stack copy
  int64_t k = 0;
  for (; k + kFloatLanes <= K; k += kFloatLanes) {
    V xv[RB_];
    for (int r = 0; r < RB_; ++r) xv[r] = load(x + (t + r) * sx + k);
    for (int c = 0; c < CB_; ++c) {
      const V w = load(W + (n + c) * K + k);
      for (int r = 0; r < RB_; ++r) acc[r][c] += xv[r] * w;
    }
  }
  for (int r = 0; r < RB_; ++r) {
    for (int c = 0; c < CB_; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t kk = k; kk < K; ++kk)
        s += static_cast<float>(x[(t + r) * sx + kk]) * static_cast<float>(W[(n + c) * K + kk]);
      y[(t + r) * sy + n + c] = static_cast<scalar_t>(s);
    }
  }
}

// Up to this many rows, a product is bound by reading W, not by arithmetic: it goes one weight row at a time.
constexpr int64_t kStreamRows = 4;

// y[t, n] for rows [t0, t1) and columns [n0, n1): whole CB-column tiles first, then the columns left one at a time.
// With at most kStreamRows rows (one or a few requests decoding), each weight row is read once, front to back, for
// all rows at once: W is then read as one sequential stream. A CB-column tile reads CB rows of W side by side, CB
// short streams that restart every tile, which the hardware prefetchers follow worse: on a Zen 4 host one row at a
// time read SmolLM2's weights at 34–39 GB/s against 20–22 for 6-row tiles (a plain sum: 36–47); a whole decode step
// of one or two rows ran 1.14× / 1.3–1.4× faster, of four 1.1×; six rows (two passes per weight row) ran 0.91×.
template <typename scalar_t>
void gemm_block(const scalar_t* x, int64_t sx, const scalar_t* W, int64_t K, scalar_t* y, int64_t sy, int64_t t0,
                int64_t t1, int64_t n0, int64_t n1) {
  constexpr int RB = kGemmRB, CB = kGemmCB;
  static_assert(kStreamRows <= RB, "the streaming path's widest tile is RB rows");
  if (t1 - t0 <= kStreamRows) {
    for (int64_t n = n0; n < n1; ++n) {
      switch (t1 - t0) {
        case 4: gemm_tile<4, 1>(x, sx, W, K, y, sy, t0, n); break;
        case 3: gemm_tile<3, 1>(x, sx, W, K, y, sy, t0, n); break;
        case 2: gemm_tile<2, 1>(x, sx, W, K, y, sy, t0, n); break;
        case 1: gemm_tile<1, 1>(x, sx, W, K, y, sy, t0, n); break;
        default: break;
      }
    }
    return;
  }
  int64_t n = n0;
  for (; n + CB <= n1; n += CB) {
    int64_t t = t0;
    for (; t + RB <= t1; t += RB) gemm_tile<RB, CB>(x, sx, W, K, y, sy, t, n);
    for (; t < t1; ++t) gemm_tile<1, CB>(x, sx, W, K, y, sy, t, n);
  }
  for (; n < n1; ++n) {
    int64_t t = t0;
    for (; t + RB <= t1; t += RB) gemm_tile<RB, 1>(x, sx, W, K, y, sy, t, n);
    for (; t < t1; ++t) gemm_tile<1, 1>(x, sx, W, K, y, sy, t, n);
  }
}

}  // namespace svdserve
