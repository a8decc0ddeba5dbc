// y = x · Wᵀ for the few rows of a decode step (one token per running request), on the CPU.
//
// x (T, K), W (N, K) row-major as nn.Linear stores it, y (T, N); float32 or bfloat16, accumulated in float32.
// BLAS libraries tune for large products; with T ≈ 1–64 rows some (MKL on AMD CPUs: 1.2–4× slower, measured)
// fall far short, and a decode step is nothing but such products. svd_adapters/cpu_kernels.py times this
// against torch's matmul per weight shape and keeps the faster one.
//
// Each task takes a group of CB-column tiles and a chunk of rows (csrc/skinny_gemm.h: the tile).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "parallel.h"
#include "skinny_gemm.h"

namespace {

constexpr int CB = svdserve::kGemmCB;
constexpr int64_t kRowChunk = 64;  // rows per task: their x (≤ 64·K floats) stays in L2 across the tiles

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
      svdserve::gemm_block(x, sx, W, K, y, sy, ch * kRowChunk, std::min(T, (ch + 1) * kRowChunk), gr * group * CB,
                           std::min(N, (gr + 1) * group * CB));
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
  svdserve::dispatch_float_bf16(x.scalar_type(), "skinny_linear", [&](auto zero) {
    using scalar_t = decltype(zero);
    gemm(x.const_data_ptr<scalar_t>(), x.stride(0), W.const_data_ptr<scalar_t>(), K, y.data_ptr<scalar_t>(), N, T, N);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(svdserve, m) {
  m.def("skinny_linear(Tensor x, Tensor W) -> Tensor");
}

TORCH_LIBRARY_IMPL(svdserve, CPU, m) {
  m.impl("skinny_linear", &skinny_linear);
}
