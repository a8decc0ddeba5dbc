// One LinearGroup's core delta on the CPU, added into its output in place (svd_adapters/cpu_kernels.py).
//
// Tokens t = 0..T-1, token t of request row p = t / L (L tokens per row: 1 at decode, the padded prompt length
// at prefill). For member i (output columns [off_i, off_{i+1}) of y), with h_i the token's shared projection:
//   y[t, c] += o[p, c] · Σ_j g[j] U[j, c] + Σ_j e[j] U[j, c],   g = C_{p,i} h_i,  e = d_{p,i} ⊙ h_i
// (o and d only for rows whose adapter scales its outputs: OSoRA). U is the members' U_rᵀ side by side,
// (R, M) in the accumulation type. In PyTorch this is ~6 ops per member at decode (core, scale, two skinny
// GEMMs, multiply-add), each a dispatch and a pass over memory, and at prefill K = R GEMMs that BLAS runs at
// half speed; here it is one call per group: every token's cores (tiny), then one sweep over U per tile.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "vec.h"

namespace {

using svdserve::Vec;
using svdserve::load;
using svdserve::store;

constexpr int NV = 2;  // vectors of output columns per tile (3 measured no faster)

// Every token's cores for every member: g = C h and, for scaled rows, e = d ⊙ h; (T, k·R) each.
template <typename scalar_t, typename acc_t, bool kScaled>
void token_cores(const scalar_t* h, int64_t sh, const scalar_t* Ct, int64_t sC, const scalar_t* d, int64_t sd,
                 int64_t k, int64_t R, int64_t L, acc_t* g, acc_t* e, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const scalar_t* ht = h + t * sh;
    const int64_t p = t / L;
    for (int64_t i = 0; i < k; ++i) {
      acc_t* gi = g + (t * k + i) * R;
      for (int64_t j = 0; j < R; ++j) gi[j] = 0;
      const scalar_t* Ci = Ct + p * sC + i * R * R;  // Cᵀ: g_j = Σ_l h_l Cᵀ[l, j]
      for (int64_t l = 0; l < R; ++l) {
        const acc_t hl = static_cast<acc_t>(ht[i * R + l]);
        for (int64_t j = 0; j < R; ++j) gi[j] += hl * static_cast<acc_t>(Ci[l * R + j]);
      }
      if constexpr (kScaled) {
        for (int64_t j = 0; j < R; ++j)
          e[(t * k + i) * R + j] = static_cast<acc_t>(ht[i * R + j]) * static_cast<acc_t>(d[p * sd + i * R + j]);
      }
    }
  }
}

// One tile (NV vectors of one member's output columns) for tokens t..t+RB-1. The tile's slice of U
// (R × NV vectors) stays in L1 while tokens stream past; RB tokens at a time share each U load.
template <typename scalar_t, typename acc_t, bool kScaled, int RB>
inline void tile_rows(scalar_t* y, int64_t sy, const scalar_t* const* o, const acc_t* g, const acc_t* e,
                      const acc_t* U, int64_t M, int64_t R, int64_t gstride, int64_t c, int64_t t) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = sizeof(V) / sizeof(acc_t);
  V a[RB][NV], b[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) a[r][v] = b[r][v] = V{};  // not `= {}`: that compiled to a slow rep-stos
  for (int64_t j = 0; j < R; ++j) {
    V u[NV];
    for (int v = 0; v < NV; ++v) u[v] = load(U + j * M + c + v * W);
    for (int r = 0; r < RB; ++r) {
      const acc_t gj = g[(t + r) * gstride + j];
      for (int v = 0; v < NV; ++v) a[r][v] += gj * u[v];
      if constexpr (kScaled) {
        const acc_t ej = e[(t + r) * gstride + j];
        for (int v = 0; v < NV; ++v) b[r][v] += ej * u[v];
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    scalar_t* yr = y + (t + r) * sy + c;
    for (int v = 0; v < NV; ++v) {
      V yv = load(yr + v * W);
      if constexpr (kScaled) yv += load(o[t + r] + c + v * W) * a[r][v] + b[r][v];
      else yv += a[r][v];
      store(yr + v * W, yv);
    }
  }
}

template <typename scalar_t, typename acc_t, bool kScaled>
void apply_tiles(scalar_t* y, int64_t sy, const scalar_t* const* o, const acc_t* g, const acc_t* e, const acc_t* U,
                 int64_t M, int64_t R, int64_t k, int64_t T, const std::vector<int64_t>& off,
                 const std::vector<int64_t>& tiles, int64_t begin, int64_t end) {
  constexpr int W = sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
  constexpr int RB = kScaled ? 2 : 4;  // accumulators: RB × NV (× 2 scaled) vectors, within 16 registers
  for (int64_t ti = begin; ti < end; ++ti) {
    const int64_t i = tiles[2 * ti], c = tiles[2 * ti + 1];
    const acc_t* gi = g + i * R;  // token t's member-i cores at gi + t·k·R
    const acc_t* ei = kScaled ? e + i * R : nullptr;
    if (c + NV * W <= off[i + 1]) {
      int64_t t = 0;
      for (; t + RB <= T; t += RB) tile_rows<scalar_t, acc_t, kScaled, RB>(y, sy, o, gi, ei, U, M, R, k * R, c, t);
      for (; t < T; ++t) tile_rows<scalar_t, acc_t, kScaled, 1>(y, sy, o, gi, ei, U, M, R, k * R, c, t);
      continue;
    }
    for (int64_t t = 0; t < T; ++t) {  // the member's last, partial tile
      for (int64_t cc = c; cc < off[i + 1]; ++cc) {
        acc_t a = 0, b = 0;
        for (int64_t j = 0; j < R; ++j) {
          a += gi[t * k * R + j] * U[j * M + cc];
          if constexpr (kScaled) b += ei[t * k * R + j] * U[j * M + cc];
        }
        acc_t v = static_cast<acc_t>(y[t * sy + cc]);
        v += kScaled ? static_cast<acc_t>(o[t][cc]) * a + b : a;
        y[t * sy + cc] = static_cast<scalar_t>(v);
      }
    }
  }
}

void check_rows(const at::Tensor& t, const char* name, int64_t P, int64_t width, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == P && t.size(1) == width, name, " must be (", P, ", ", width, "), got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, name, " must be contiguous within a row");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have y's dtype");
}

void core_delta(at::Tensor y, const at::Tensor& h, const at::Tensor& Ct, const std::optional<at::Tensor>& o,
                const std::optional<at::Tensor>& d, const at::Tensor& U, at::IntArrayRef offsets, int64_t L) {
  TORCH_CHECK(y.device().is_cpu(), "core_delta runs on the CPU");
  const int64_t T = y.size(0), M = y.size(1), R = U.size(0), k = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK(k >= 1 && offsets[0] == 0 && offsets[k] == M, "offsets must run from 0 to y's width");
  TORCH_CHECK(U.dim() == 2 && U.size(1) == M && U.is_contiguous(), "U must be a contiguous (R, M) matrix");
  TORCH_CHECK(L >= 1 && T % L == 0, "tokens_per_row must divide y's rows");
  const int64_t P = T / L;
  check_rows(h, "h", T, k * R, y.scalar_type());
  TORCH_CHECK(y.stride(1) == 1, "y must be contiguous within a row");
  TORCH_CHECK(Ct.dim() == 4 && Ct.size(0) == P && Ct.size(1) == k && Ct.size(2) == R && Ct.size(3) == R,
              "Ct must be (rows, k, R, R)");
  TORCH_CHECK(Ct.stride(3) == 1 && Ct.stride(2) == R && Ct.stride(1) == R * R, "Ct must be contiguous within a row");
  TORCH_CHECK(Ct.scalar_type() == y.scalar_type(), "Ct must have y's dtype");
  TORCH_CHECK(o.has_value() == d.has_value(), "o and d come together");
  if (o.has_value()) {
    check_rows(*o, "o", P, M, y.scalar_type());
    check_rows(*d, "d", P, k * R, y.scalar_type());
  }
  if (T == 0) return;
  const std::vector<int64_t> off(offsets.begin(), offsets.end());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "core_delta", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(U.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "U must be in the accumulation dtype");
    constexpr int64_t TW = NV * sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
    std::vector<int64_t> tiles;  // (member, first column) of every tile, members' columns in TW-wide tiles
    for (int64_t i = 0; i < k; ++i)
      for (int64_t c = off[i]; c < off[i + 1]; c += TW) tiles.insert(tiles.end(), {i, c});
    const int64_t n_tiles = static_cast<int64_t>(tiles.size()) / 2;
    std::vector<acc_t> g(T * k * R), e(o.has_value() ? T * k * R : 0);
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* Cp = Ct.const_data_ptr<scalar_t>();
    const acc_t* Up = U.const_data_ptr<acc_t>();
    const int64_t sy = y.stride(0), sh = h.stride(0), sC = Ct.stride(0);
    // Two passes, each split across threads: every token's cores (tiny), then the output tiles.
    if (o.has_value()) {
      const scalar_t* dp = d->const_data_ptr<scalar_t>();
      const int64_t sd = d->stride(0);
      std::vector<const scalar_t*> orow(T);  // token t's row of o: no division in the inner loops
      for (int64_t t = 0; t < T; ++t) orow[t] = o->const_data_ptr<scalar_t>() + (t / L) * o->stride(0);
      at::parallel_for(0, T, 8, [&](int64_t b, int64_t en) {
        token_cores<scalar_t, acc_t, true>(hp, sh, Cp, sC, dp, sd, k, R, L, g.data(), e.data(), b, en);
      });
      at::parallel_for(0, n_tiles, 4, [&](int64_t b, int64_t en) {
        apply_tiles<scalar_t, acc_t, true>(yp, sy, orow.data(), g.data(), e.data(), Up, M, R, k, T, off, tiles, b, en);
      });
    } else {
      at::parallel_for(0, T, 8, [&](int64_t b, int64_t en) {
        token_cores<scalar_t, acc_t, false>(hp, sh, Cp, sC, nullptr, 0, k, R, L, g.data(), nullptr, b, en);
      });
      at::parallel_for(0, n_tiles, 4, [&](int64_t b, int64_t en) {
        apply_tiles<scalar_t, acc_t, false>(yp, sy, nullptr, g.data(), nullptr, Up, M, R, k, T, off, tiles, b, en);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(svdserve, m) {
  m.def("core_delta(Tensor(a!) y, Tensor h, Tensor Ct, Tensor? o, Tensor? d, Tensor U, int[] offsets, "
        "int tokens_per_row) -> ()");
}

TORCH_LIBRARY_IMPL(svdserve, CPU, m) {
  m.impl("core_delta", &core_delta);
}
