// Fused decode-step core delta for one LinearGroup on the CPU (svd_adapters/cpu_kernels.py builds it).
//
// One token per row p; for member i (output columns [off_i, off_{i+1}) of y), with h_i its shared projection:
//   y[p, c] += o[p, c] * Σ_j g[j] U[j, c] + Σ_j e[j] U[j, c],   g = C_i h_i,  e = d_i ⊙ h_i
// (o and d only for rows whose adapter scales its outputs: OSoRA). U is the members' U_rᵀ side by side,
// (R, M) in the accumulation type. In PyTorch this is ~6 ops per member (core, scale, two skinny GEMMs,
// multiply-add), each a dispatch and a pass over memory; at decode those op costs, not FLOPs, dominate.
// Here it is one call per group: each row's cores in registers, then one sweep over U per row.
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

// Row cores of every row and member: g = C h and, for scaled rows, e = d ⊙ h; (P, k·R) each.
template <typename scalar_t, typename acc_t, bool kScaled>
void row_cores(const scalar_t* h, int64_t sh, const scalar_t* Ct, int64_t sC, const scalar_t* d, int64_t sd,
               int64_t k, int64_t R, acc_t* g, acc_t* e, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const scalar_t* hp = h + p * sh;
    for (int64_t i = 0; i < k; ++i) {
      acc_t* gi = g + (p * k + i) * R;
      for (int64_t j = 0; j < R; ++j) gi[j] = 0;
      const scalar_t* Ci = Ct + p * sC + i * R * R;  // Cᵀ: g_j = Σ_l h_l Cᵀ[l, j]
      for (int64_t l = 0; l < R; ++l) {
        const acc_t hl = static_cast<acc_t>(hp[i * R + l]);
        for (int64_t j = 0; j < R; ++j) gi[j] += hl * static_cast<acc_t>(Ci[l * R + j]);
      }
      if constexpr (kScaled) {
        for (int64_t j = 0; j < R; ++j)
          e[(p * k + i) * R + j] = static_cast<acc_t>(hp[i * R + j]) * static_cast<acc_t>(d[p * sd + i * R + j]);
      }
    }
  }
}

// A tile: two vectors' worth of one member's output columns, for every row. Its slice of U (R × 2 vectors)
// stays in L1 while rows stream past; RB rows at a time share each U load (register blocking).
template <typename scalar_t, typename acc_t, bool kScaled, int RB>
inline void tile_rows(scalar_t* y, int64_t sy, const scalar_t* o, int64_t so, const acc_t* g, const acc_t* e,
                      const acc_t* U, int64_t M, int64_t R, int64_t gstride, int64_t c, int64_t p) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = sizeof(V) / sizeof(acc_t);
  V a[RB][2], b[RB][2];
  for (int r = 0; r < RB; ++r) a[r][0] = a[r][1] = b[r][0] = b[r][1] = V{};
  for (int64_t j = 0; j < R; ++j) {
    const V u0 = load(U + j * M + c), u1 = load(U + j * M + c + W);
    for (int r = 0; r < RB; ++r) {
      const acc_t gj = g[(p + r) * gstride + j];
      a[r][0] += gj * u0;
      a[r][1] += gj * u1;
      if constexpr (kScaled) {
        const acc_t ej = e[(p + r) * gstride + j];
        b[r][0] += ej * u0;
        b[r][1] += ej * u1;
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    scalar_t* yr = y + (p + r) * sy + c;
    for (int half = 0; half < 2; ++half) {
      V v = load(yr + half * W);
      if constexpr (kScaled) v += load(o + (p + r) * so + c + half * W) * a[r][half] + b[r][half];
      else v += a[r][half];
      store(yr + half * W, v);
    }
  }
}

template <typename scalar_t, typename acc_t, bool kScaled>
void apply_tiles(scalar_t* y, int64_t sy, const scalar_t* o, int64_t so, const acc_t* g, const acc_t* e,
                 const acc_t* U, int64_t M, int64_t R, int64_t k, int64_t P, const std::vector<int64_t>& off,
                 const std::vector<int64_t>& tiles, int64_t begin, int64_t end) {
  constexpr int W = sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
  constexpr int RB = kScaled ? 2 : 4;  // accumulators: RB × 2 (× 2 scaled) vectors, within 16 registers
  for (int64_t t = begin; t < end; ++t) {
    const int64_t i = tiles[2 * t], c = tiles[2 * t + 1];
    const acc_t* gi = g + i * R;  // row p's member-i core at gi + p·k·R
    const acc_t* ei = kScaled ? e + i * R : nullptr;
    if (c + 2 * W <= off[i + 1]) {
      int64_t p = 0;
      for (; p + RB <= P; p += RB) tile_rows<scalar_t, acc_t, kScaled, RB>(y, sy, o, so, gi, ei, U, M, R, k * R, c, p);
      for (; p < P; ++p) tile_rows<scalar_t, acc_t, kScaled, 1>(y, sy, o, so, gi, ei, U, M, R, k * R, c, p);
      continue;
    }
    for (int64_t p = 0; p < P; ++p) {  // the member's last, partial tile
      for (int64_t cc = c; cc < off[i + 1]; ++cc) {
        acc_t a = 0, b = 0;
        for (int64_t j = 0; j < R; ++j) {
          a += gi[p * k * R + j] * U[j * M + cc];
          if constexpr (kScaled) b += ei[p * k * R + j] * U[j * M + cc];
        }
        acc_t v = static_cast<acc_t>(y[p * sy + cc]);
        v += kScaled ? static_cast<acc_t>(o[p * so + cc]) * a + b : a;
        y[p * sy + cc] = static_cast<scalar_t>(v);
      }
    }
  }
}

void check_rows(const at::Tensor& t, const char* name, int64_t P, int64_t width, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == P && t.size(1) == width, name, " must be (", P, ", ", width, "), got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, name, " must be contiguous within a row");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have y's dtype");
}

void core_delta_decode(at::Tensor y, const at::Tensor& h, const at::Tensor& Ct, const std::optional<at::Tensor>& o,
                       const std::optional<at::Tensor>& d, const at::Tensor& U, at::IntArrayRef offsets) {
  TORCH_CHECK(y.device().is_cpu(), "core_delta_decode runs on the CPU");
  const int64_t P = y.size(0), M = y.size(1), R = U.size(0), k = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK(k >= 1 && offsets[0] == 0 && offsets[k] == M, "offsets must run from 0 to y's width");
  TORCH_CHECK(U.dim() == 2 && U.size(1) == M && U.is_contiguous(), "U must be a contiguous (R, M) matrix");
  check_rows(h, "h", P, k * R, y.scalar_type());
  TORCH_CHECK(y.stride(1) == 1, "y must be contiguous within a row");
  TORCH_CHECK(Ct.dim() == 4 && Ct.size(0) == P && Ct.size(1) == k && Ct.size(2) == R && Ct.size(3) == R,
              "Ct must be (P, k, R, R)");
  TORCH_CHECK(Ct.stride(3) == 1 && Ct.stride(2) == R && Ct.stride(1) == R * R, "Ct must be contiguous within a row");
  TORCH_CHECK(Ct.scalar_type() == y.scalar_type(), "Ct must have y's dtype");
  TORCH_CHECK(o.has_value() == d.has_value(), "o and d come together");
  if (o.has_value()) {
    check_rows(*o, "o", P, M, y.scalar_type());
    check_rows(*d, "d", P, k * R, y.scalar_type());
  }
  const std::vector<int64_t> off(offsets.begin(), offsets.end());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "core_delta_decode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(U.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "U must be in the accumulation dtype");
    constexpr int64_t TW = 2 * sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
    std::vector<int64_t> tiles;  // (member, first column) of every tile, members' columns in TW-wide tiles
    for (int64_t i = 0; i < k; ++i)
      for (int64_t c = off[i]; c < off[i + 1]; c += TW) tiles.insert(tiles.end(), {i, c});
    const int64_t n_tiles = static_cast<int64_t>(tiles.size()) / 2;
    std::vector<acc_t> g(P * k * R), e(o.has_value() ? P * k * R : 0);
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* Cp = Ct.const_data_ptr<scalar_t>();
    const acc_t* Up = U.const_data_ptr<acc_t>();
    const int64_t sy = y.stride(0), sh = h.stride(0), sC = Ct.stride(0);
    // Two passes, each split across threads: the rows' cores (tiny), then the output tiles.
    if (o.has_value()) {
      const scalar_t* op = o->const_data_ptr<scalar_t>();
      const scalar_t* dp = d->const_data_ptr<scalar_t>();
      const int64_t so = o->stride(0), sd = d->stride(0);
      at::parallel_for(0, P, 8, [&](int64_t b, int64_t en) {
        row_cores<scalar_t, acc_t, true>(hp, sh, Cp, sC, dp, sd, k, R, g.data(), e.data(), b, en);
      });
      at::parallel_for(0, n_tiles, 4, [&](int64_t b, int64_t en) {
        apply_tiles<scalar_t, acc_t, true>(yp, sy, op, so, g.data(), e.data(), Up, M, R, k, P, off, tiles, b, en);
      });
    } else {
      at::parallel_for(0, P, 8, [&](int64_t b, int64_t en) {
        row_cores<scalar_t, acc_t, false>(hp, sh, Cp, sC, nullptr, 0, k, R, g.data(), nullptr, b, en);
      });
      at::parallel_for(0, n_tiles, 4, [&](int64_t b, int64_t en) {
        apply_tiles<scalar_t, acc_t, false>(yp, sy, nullptr, 0, g.data(), nullptr, Up, M, R, k, P, off, tiles, b, en);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(svdserve, m) {
  m.def("core_delta_decode(Tensor(a!) y, Tensor h, Tensor Ct, Tensor? o, Tensor? d, Tensor U, int[] offsets) -> ()");
}

TORCH_LIBRARY_IMPL(svdserve, CPU, m) {
  m.impl("core_delta_decode", &core_delta_decode);
}
