// y = x · Wᵀ for the few rows of a decode step (one token per running request), on the CPU.
//
// x (T, K), W (N, K) row-major as nn.Linear stores it, y (T, N); float32 or bfloat16, accumulated in float32.
// BLAS libraries tune for large products; with T ≈ 1–64 rows some (MKL on AMD CPUs: 1.2–4× slower, measured)
// fall far short, and a decode step is nothing but such products. svd_adapters/cpu_kernels.py times this
// against torch's matmul per weight shape and keeps the faster one.
//
// Each task takes a group of CB-column tiles and a chunk of rows; a tile walks its rows RB at a time: RB×CB
// dot products along K in vector registers, each W load shared by RB rows, each x load by CB columns, the CB
// rows of W (a few KB) staying in L1 while the rows stream past.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "parallel.h"
#include "vec.h"

namespace {

using svdserve::hsum;
using svdserve::load;
using V = svdserve::Vec<float>::type;
constexpr int kLanes = svdserve::kFloatLanes;
// RB×CB accumulators + RB x + 1 W within the vector registers: 12 + 4 + 1 of AVX2's 16, 24 + 4 + 1 of AVX-512's 32
constexpr int RB = 4, CB = svdserve::kVecRegs == 32 ? 6 : 3;
constexpr int64_t kRowChunk = 64;  // rows per task: their x (≤ 64·K floats) stays in L2 across the tiles

template <int RB_, int CB_, typename scalar_t>
inline void tile(const scalar_t* x, int64_t sx, const scalar_t* W, int64_t K, scalar_t* y, int64_t sy, int64_t t,
                 int64_t n) {
  V acc[RB_][CB_];
  for (int r = 0; r < RB_; ++r)
    for (int c = 0; c < CB_; ++c) acc[r][c] = V{};  // not `= {}`: that became a slow rep-stos of a stack copy
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
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

// y over rows [t0, t1) and column tiles [b, e) (the last tile may be narrower than CB).
template <typename scalar_t>
void tiles(const scalar_t* x, int64_t sx, const scalar_t* W, int64_t K, scalar_t* y, int64_t sy, int64_t N, int64_t t0,
           int64_t t1, int64_t b, int64_t e) {
  for (int64_t ti = b; ti < e; ++ti) {
    const int64_t n = ti * CB;
    const bool whole = n + CB <= N;
    int64_t t = t0;
    if (whole) {
      for (; t + RB <= t1; t += RB) tile<RB, CB>(x, sx, W, K, y, sy, t, n);
      for (; t < t1; ++t) tile<1, CB>(x, sx, W, K, y, sy, t, n);
    } else {
      for (int64_t c = n; c < N; ++c) {
        for (t = t0; t + RB <= t1; t += RB) tile<RB, 1>(x, sx, W, K, y, sy, t, c);
        for (; t < t1; ++t) tile<1, 1>(x, sx, W, K, y, sy, t, c);
      }
    }
  }
}

// The whole product y = x · Wᵀ, split into (row chunk, tile group) tasks across threads.
template <typename scalar_t>
void gemm(const scalar_t* x, int64_t sx, const scalar_t* W, int64_t K, scalar_t* y, int64_t sy, int64_t T, int64_t N) {
  const int64_t n_tiles = (N + CB - 1) / CB, chunks = (T + kRowChunk - 1) / kRowChunk;
  const int64_t rows = std::min(T, kRowChunk);
  // Enough tiles per task that a task is tens of microseconds of work, not a scheduling overhead.
  const int64_t group = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, rows * K * CB));
  const int64_t groups = (n_tiles + group - 1) / group;
  svdserve::parallel_for(0, chunks * groups, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t ch = task / groups, gr = task % groups;
      tiles(x, sx, W, K, y, sy, N, ch * kRowChunk, std::min(T, (ch + 1) * kRowChunk), gr * group,
            std::min(n_tiles, (gr + 1) * group));
    }
  });
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& W) {
  TORCH_CHECK(x.device().is_cpu() && W.device().is_cpu(), "skinny_linear runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && W.dim() == 2 && x.size(1) == W.size(1), "x (T, K) and W (N, K) must share K, got ",
              x.sizes(), " and ", W.sizes());
  TORCH_CHECK(x.stride(1) == 1 && W.is_contiguous(), "x must be contiguous within a row and W contiguous");
  TORCH_CHECK(x.scalar_type() == W.scalar_type(), "x and W must have one dtype");
  const int64_t T = x.size(0), K = x.size(1), N = W.size(0);
  at::Tensor y = at::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  if (x.scalar_type() == at::kFloat) {
    gemm(x.const_data_ptr<float>(), x.stride(0), W.const_data_ptr<float>(), K, y.data_ptr<float>(), N, T, N);
  } else if (x.scalar_type() == at::kBFloat16) {
    gemm(x.const_data_ptr<c10::BFloat16>(), x.stride(0), W.const_data_ptr<c10::BFloat16>(), K,
         y.data_ptr<c10::BFloat16>(), N, T, N);
  } else {
    TORCH_CHECK(false, "skinny_linear takes float32 or bfloat16, got ", x.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(svdserve, m) {
  m.def("skinny_linear(Tensor x, Tensor W) -> Tensor");
}

TORCH_LIBRARY_IMPL(svdserve, CPU, m) {
  m.impl("skinny_linear", &skinny_linear);
}
