// A decode step's GEMM for one group fused with its core delta, on the CPU (svd_adapters/cpu_kernels.py:
// core_linear). The delta's formula and its terms are core_delta.cpp's; the pieces both use are in core_tiles.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "core_tiles.h"
#include "parallel.h"
#include "skinny_gemm.h"
#include "vec.h"

namespace {

using namespace svdserve::core;

// A decode step's GEMM for one group fused with its core delta (core_linear): [y | h] = x · W_augᵀ with W_aug =
// [W; V_rᵀ] (the members' weights, then their shared projections), every row's core delta added into y, one token
// per row (`DecodeRows`: none for rows reading slot 0; the unscaled arithmetic for rows not flagged `scaled`).
// In one parallel region (a region costs microseconds, as much as a small pass here): h (W_aug's last
// k·R rows), every token's cores, then blocks of up to kBlockTiles tiles of one member: the block's columns of y
// from the GEMM, with the block's U and o prefetched a few lines per GEMM tile, then at once its delta while
// they are in L1. Run separately (skinny_linear, then core_delta), the delta's reads of U, o and the cores waited
// on memory after the GEMM had streamed the weights through every cache level. bench/decode_kernels.py (SmolLM2's
// shapes, 32 rows, 2 threads of a Zen 5): the step's core delta over the bare GEMMs ~3.0 → 1.7–2.3 ms (LoRA-XS),
// ~4.0–5.0 → 2.7–3.3 ms (OSoRA); all the block's prefetches issued before its GEMM measured ~0.4 ms slower, the
// next block's instead of this one's no faster, into L2 only slower.
constexpr int64_t kBlockTiles = 3;

// Blocks of output columns for core_linear: up to kBlockTiles consecutive tiles of one member each, as the first
// tile of each block and then the end.
std::vector<int64_t> column_blocks(const std::vector<int64_t>& tiles) {
  std::vector<int64_t> blocks;
  const int64_t n_tiles = static_cast<int64_t>(tiles.size()) / 2;
  for (int64_t ti = 0; ti < n_tiles; ++ti)
    if (blocks.empty() || ti - blocks.back() == kBlockTiles || tiles[2 * ti] != tiles[2 * blocks.back()])
      blocks.push_back(ti);
  blocks.push_back(n_tiles);
  return blocks;
}

// The rows a call's delta goes to, in `DecodeRows`' order: entries [0, n_plain) unscaled, then n_scaled scaled
// ones; entry t's cores at g + t·k·R; scaled entry j's e at e + j·k·R and its row of o at o[j]; map as
// `DecodeRows::map()`.
template <typename scalar_t, typename acc_t>
struct DeltaRows {
  const scalar_t* const* o;
  acc_t* g;  // written by the call's cores pass, read by its tiles
  acc_t* e;
  int64_t n_plain, n_scaled, kR;
  const int64_t* map;
  // The scaled entries' cores and rows (their part of g and of map)
  acc_t* g_scaled() const { return g + n_plain * kR; }
  const int64_t* map_scaled() const { return map ? map + n_plain : nullptr; }
};

// Tiles [tb, te) of the delta for every entry: the unscaled entries' walk, then the scaled entries'.
template <typename scalar_t, typename acc_t>
void delta_tiles(scalar_t* y, int64_t sy, const DeltaRows<scalar_t, acc_t>& d, const TileSource<acc_t>& src,
                 int64_t R, int64_t k, const std::vector<int64_t>& off, const std::vector<int64_t>& tiles, int64_t tb,
                 int64_t te) {
  if (d.n_plain > 0)
    decode_tiles<scalar_t, acc_t, false>(y, sy, nullptr, d.g, nullptr, src, R, k, off, tiles, tb, te, d.n_plain, d.map);
  if (d.n_scaled > 0)
    decode_tiles<scalar_t, acc_t, true>(y, sy, d.o, d.g_scaled(), d.e, src, R, k, off, tiles, tb, te, d.n_scaled,
                                        d.map_scaled());
}

// Blocks [b, e) of core_linear: each block's U and the scaled entries' o prefetched, its columns of y from the GEMM
// (all T rows), then its delta.
template <typename scalar_t, typename acc_t>
void gemm_core_blocks(const scalar_t* x, int64_t sx, const scalar_t* W, int64_t K, scalar_t* y, int64_t sy,
                      const DeltaRows<scalar_t, acc_t>& d, const acc_t* U, int64_t M, int64_t R, int64_t k,
                      const std::vector<int64_t>& off, const std::vector<int64_t>& tiles,
                      const std::vector<int64_t>& blocks, int64_t T, int64_t b, int64_t en) {
  constexpr int64_t TW = NV * sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
  const TileSource<acc_t> src{U, M, 0, TW};
  for (int64_t bi = b; bi < en; ++bi) {
    const int64_t tb = blocks[bi], te = blocks[bi + 1], i = tiles[2 * tb];  // tiles [tb, te) of member i
    const int64_t c0 = tiles[2 * tb + 1], c1 = std::min(off[i + 1], tiles[2 * (te - 1) + 1] + TW);
    // The block's U and o into L1 while its GEMM runs, spread over the GEMM's tiles.
    constexpr int64_t kLine = 64 / sizeof(acc_t);  // o's scalar_t lines are as wide or wider
    const int64_t lines = (c1 - c0 + kLine - 1) / kLine, items = (R + d.n_scaled) * lines;
    constexpr int64_t CB = svdserve::kGemmCB;
    const int64_t n_gemm = (c1 - c0 + CB - 1) / CB, per = (items + n_gemm - 1) / n_gemm;
    int64_t item = 0;
    for (int64_t n = c0; n < c1; n += CB) {
      for (const int64_t stop = std::min(items, item + per); item < stop; ++item) {
        const int64_t row = item / lines, c = c0 + (item % lines) * kLine;
        if (row < R) __builtin_prefetch(U + row * M + c, 0, 3);
        else __builtin_prefetch(d.o[row - R] + c, 0, 3);
      }
      svdserve::gemm_block(x, sx, W, K, y, sy, 0, T, n, std::min(c1, n + CB));
    }
    delta_tiles<scalar_t, acc_t>(y, sy, d, src, R, k, off, tiles, tb, te);
  }
}

// With `blas`, the GEMM is ATen's (at::mm: MKL, or oneDNN's AMX tiles for bfloat16 where the CPU has them), for
// shapes where calibration found it faster than gemm_block, and the delta follows in the same call: y and h are then
// views of the one [y | h] product. The alternative, torch's matmul from Python, slicing y and h, and core_delta
// as an op of its own, cost ~9 µs more a group in dispatch alone (a bfloat16 step on an AMX Xeon: ~1 ms of ~40).
std::tuple<at::Tensor, at::Tensor> core_linear(const at::Tensor& x, const at::Tensor& W_aug, const at::Tensor& Ct,
                                               const std::optional<at::Tensor>& o, const std::optional<at::Tensor>& d,
                                               const at::Tensor& U, at::IntArrayRef offsets, const at::Tensor& slots,
                                               const std::optional<at::Tensor>& s,
                                               const std::optional<at::Tensor>& diagonal, bool blas,
                                               const std::optional<at::Tensor>& scaled) {
  TORCH_CHECK(x.device().is_cpu() && W_aug.device().is_cpu(), "core_linear runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && W_aug.dim() == 2 && x.size(1) == W_aug.size(1), "x (T, K) and W_aug (N, K) must share K, got ",
              x.sizes(), " and ", W_aug.sizes());
  TORCH_CHECK(x.stride(1) == 1 && W_aug.is_contiguous(), "x must be contiguous within a row and W_aug contiguous");
  TORCH_CHECK(x.scalar_type() == W_aug.scalar_type(), "x and W_aug must have one dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "core_linear takes float32 or bfloat16, got ", x.scalar_type());
  const int64_t T = x.size(0), K = x.size(1), R = U.size(0), k = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK(k >= 1 && offsets[0] == 0, "offsets must start at 0");
  const int64_t M = offsets[k];
  TORCH_CHECK(W_aug.size(0) == M + k * R, "W_aug must hold the members' ", M, " output rows and their ", k * R,
              " projection rows, got ", W_aug.size(0));
  const std::vector<int64_t> slot = row_slots(T, slots, Ct.size(0));
  check_terms(Ct, o, d, U, Ct.size(0), k, M, x.scalar_type());
  TORCH_CHECK(s.has_value() == diagonal.has_value(), "s and diagonal come together");
  if (s.has_value()) {
    check_rows(*s, "s", Ct.size(0), k * R, x.scalar_type());
    TORCH_CHECK(diagonal->dim() == 1 && diagonal->size(0) == Ct.size(0) && diagonal->scalar_type() == at::kBool &&
                diagonal->device().is_cpu() && diagonal->is_contiguous(),
                "diagonal must be a contiguous CPU bool vector with one entry per slot (", Ct.size(0), ")");
  }
  // Rows reading slot 0 get the GEMM's outputs alone; LoRA-XS rows of a batch with OSoRA rows, the unscaled tiles.
  const DecodeRows active(slot, o.has_value(), scaled);
  at::Tensor y, h;
  if (blas) {
    const at::Tensor z = at::mm(x, W_aug.t());
    y = z.narrow(1, 0, M), h = z.narrow(1, M, k * R);
  } else {
    y = at::empty({T, M}, x.options()), h = at::empty({T, k * R}, x.options());
  }
  if (T == 0) return {y, h};
  const std::vector<int64_t> off(offsets.begin(), offsets.end());
  // float32 or bfloat16 only: the GEMM tile accumulates in float vectors
  const auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(U.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "U must be in the accumulation dtype");
    constexpr int64_t TW = NV * sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
    const std::vector<int64_t> tiles = member_tiles(off, TW);
    const std::vector<int64_t> blocks = column_blocks(tiles);
    const int64_t n_blocks = static_cast<int64_t>(blocks.size()) - 1;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* Wp = W_aug.const_data_ptr<scalar_t>();
    const acc_t* Up = U.const_data_ptr<acc_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    const int64_t sx = x.stride(0), kR = k * R, sy = y.stride(0), sh = h.stride(0);
    const RowTerms<scalar_t> rows(slot, Ct, o, d, s, diagonal);
    const int64_t np = active.n_plain, ns = active.n_scaled;
    std::vector<const scalar_t*> o_scaled(ns);  // the scaled entries' rows of o
    for (int64_t j = 0; j < ns; ++j) o_scaled[j] = rows.o[active.order[np + j]];
    acc_t* g = scratch<acc_t>(0, active.active() * kR);
    acc_t* e = ns > 0 ? scratch<acc_t>(1, ns * kR) : nullptr;
    const DeltaRows<scalar_t, acc_t> delta{o_scaled.data(), g, e, np, ns, kR, active.map()};
    constexpr int64_t CB = svdserve::kGemmCB;
    // One region, three passes: h (the projection rows of W_aug, CB-column tiles split across threads; with
    // `blas`, already there), the active rows' cores, then the blocks (with `blas`, the delta alone: `delta_tiles`
    // over each thread's share of the tiles, as core_delta's decode sweep).
    svdserve::parallel_region([&](int64_t tid, int64_t n) {
      if (!blas) {
        const auto [hb, he] = svdserve::share((kR + CB - 1) / CB, tid, n);
        svdserve::gemm_block(xp, sx, Wp + M * K, K, hp, sh, 0, T, hb * CB, std::min(kR, he * CB));
        svdserve::barrier(n);
      }
      const auto [pb, pe] = svdserve::share(np, tid, n);
      token_cores<scalar_t, acc_t, false>(hp, sh, rows.C.data(), nullptr, k, R, 1, g, nullptr, pb, pe, rows.s.data(),
                                          nullptr, delta.map);
      const auto [sb, se] = svdserve::share(ns, tid, n);
      token_cores<scalar_t, acc_t, true>(hp, sh, rows.C.data(), rows.d.data(), k, R, 1, delta.g_scaled(), e, sb, se,
                                         rows.s.data(), nullptr, delta.map_scaled());
      svdserve::barrier(n);
      if (blas) {
        const TileSource<acc_t> src{Up, M, 0, TW};
        const auto [b, en] = svdserve::share(static_cast<int64_t>(tiles.size()) / 2, tid, n);
        delta_tiles<scalar_t, acc_t>(yp, sy, delta, src, R, k, off, tiles, b, en);
        return;
      }
      const auto [bb, be] = svdserve::share(n_blocks, tid, n);
      gemm_core_blocks<scalar_t, acc_t>(xp, sx, Wp, K, yp, sy, delta, Up, M, R, k, off, tiles, blocks, T, bb, be);
    });
  };
  if (x.scalar_type() == at::kFloat) run(float{});
  else run(c10::BFloat16{});
  return {y, h};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(svdserve, m) {
  m.def("core_linear(Tensor x, Tensor W_aug, Tensor Ct, Tensor? o, Tensor? d, Tensor U, int[] offsets, Tensor slots, "
        "Tensor? s=None, Tensor? diagonal=None, bool blas=False, Tensor? scaled=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(svdserve, CPU, m) {
  m.impl("core_linear", &core_linear);
}
