// The pieces both core-delta kernels build on (csrc/core_delta.cpp: the delta added to an output, at prefill and
// decode; csrc/core_linear.cpp: a decode step's GEMM fused with it): the tile shape, per-thread scratch, every
// token's cores, the register-blocked tile that adds a delta to a block of outputs, and the checks and row
// pointers of a group's terms. See core_delta.cpp for the formula.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "parallel.h"
#include "vec.h"

namespace svdserve::core {

using svdserve::Vec;
using svdserve::load;
using svdserve::store;
using svdserve::scratch;

constexpr int NV = 2;        // vectors of output columns per tile (3 measured no faster)

// Tokens (or core rows) per register block of an unscaled tile: RB × NV accumulator vectors within the vector
// registers (16 with AVX2, 32 with AVX-512); scaled tiles keep two accumulators per output, so half as many.
constexpr int kRB = 4 * (svdserve::kVecRegs / 16);

// Every token's cores for every member: g = C h and, for scaled rows, e = d ⊙ h; (T, k·R) each. With `srow`,
// a row whose srow[p] is set has diagonal cores (OSoRA's diag S), srow[p] their diagonals (k·R): g = s ⊙ h, and C
// is not read (R² numbers per member, of which R count). Rows that `zero` flags (core_delta.cpp's zero_tokens) get zeros,
// whatever their h: a register block that straddles one of them and another row adds exactly nothing to it.
// With `map` (a decode step's rows in the order `DecodeRows` sorts them): entry t of g and e is token map[t]'s.
template <typename scalar_t, typename acc_t, bool kScaled>
void token_cores(const scalar_t* h, int64_t sh, const scalar_t* const* Crow, const scalar_t* const* drow,
                 int64_t k, int64_t R, int64_t L, acc_t* g, acc_t* e, int64_t begin, int64_t end,
                 const scalar_t* const* srow = nullptr, const char* zero = nullptr, const int64_t* map = nullptr) {
  for (int64_t t = begin; t < end; ++t) {
    const int64_t src = map ? map[t] : t;
    const scalar_t* ht = h + src * sh;
    const int64_t p = src / L;
    if (zero != nullptr && zero[p]) {
      for (int64_t j = 0; j < k * R; ++j) g[t * k * R + j] = 0;
      continue;
    }
    for (int64_t i = 0; i < k; ++i) {
      acc_t* gi = g + (t * k + i) * R;
      if (srow != nullptr && srow[p] != nullptr) {
        for (int64_t j = 0; j < R; ++j) gi[j] = static_cast<acc_t>(ht[i * R + j]) * static_cast<acc_t>(srow[p][i * R + j]);
      } else {
        for (int64_t j = 0; j < R; ++j) gi[j] = 0;
        const scalar_t* Ci = Crow[p] + i * R * R;  // Cᵀ: g_j = Σ_l h_l Cᵀ[l, j]
        for (int64_t l = 0; l < R; ++l) {
          const acc_t hl = static_cast<acc_t>(ht[i * R + l]);
          for (int64_t j = 0; j < R; ++j) gi[j] += hl * static_cast<acc_t>(Ci[l * R + j]);
        }
      }
      if constexpr (kScaled) {
        for (int64_t j = 0; j < R; ++j)
          e[(t * k + i) * R + j] = static_cast<acc_t>(ht[i * R + j]) * static_cast<acc_t>(drow[p][i * R + j]);
      }
    }
  }
}

// Where each tile's slice of U is read: U (R × M, row stride M) as given, or packed tile by tile (`pack_tiles`:
// tile ti's R rows of TW columns contiguous at U + ti·R·TW). With M a multiple of 1024 floats (SmolLM2's gate/up
// group: 3072), the R rows of a tile sit a multiple of 4 KB apart, all in one L1 set of 8 ways, and every U
// load of the prefill sweep missed L1 (measured: its U loads were the sweep's hottest instructions).
template <typename acc_t>
struct TileSource {
  const acc_t* U;
  int64_t M;      // U's row stride when not packed
  int64_t block;  // R·TW when packed, else 0
  int64_t TW;
  const acc_t* at(int64_t ti, int64_t c) const { return block ? U + ti * block : U + c; }
  int64_t ld() const { return block ? TW : M; }
};

// U (R × M, row stride M) packed tile by tile into P (tiles.size()/2 · R · TW; a member's last, partial tile
// zero-padded): the layout TileSource reads with block = R·TW.
template <typename acc_t>
void pack_tiles(const acc_t* U, int64_t M, int64_t R, const std::vector<int64_t>& off, const std::vector<int64_t>& tiles,
                int64_t TW, acc_t* P) {
  for (size_t ti = 0; ti < tiles.size() / 2; ++ti) {
    const int64_t i = tiles[2 * ti], c = tiles[2 * ti + 1], width = std::min(TW, off[i + 1] - c);
    for (int64_t j = 0; j < R; ++j) {
      acc_t* dst = P + (ti * R + j) * TW;
      for (int64_t x = 0; x < width; ++x) dst[x] = U[j * M + c + x];
      for (int64_t x = width; x < TW; ++x) dst[x] = 0;
    }
  }
}

// Token t's row of y: row t, or with `ymap` (a decode step's rows in `DecodeRows`' order) row ymap[t].
template <typename scalar_t>
inline scalar_t* y_row(scalar_t* y, int64_t sy, const int64_t* ymap, int64_t t) {
  return y + (ymap ? ymap[t] : t) * sy;
}

// One tile (NV vectors of one member's output columns) for tokens t..t+RB-1. The tile's slice of U
// (R × NV vectors at Uc, row stride ldu) stays in L1 while tokens stream past; RB tokens at a time share each U load.
template <typename scalar_t, typename acc_t, bool kScaled, int RB>
inline void tile_rows(scalar_t* y, int64_t sy, const scalar_t* const* o, const acc_t* g, const acc_t* e,
                      const acc_t* Uc, int64_t ldu, int64_t R, int64_t gstride, int64_t c, int64_t t,
                      const int64_t* ymap) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = sizeof(V) / sizeof(acc_t);
  V a[RB][NV], b[RB][NV];
  UNROLL for (int r = 0; r < RB; ++r)
    UNROLL for (int v = 0; v < NV; ++v) a[r][v] = b[r][v] = V{};  // not `= {}`: that compiled to a slow rep-stos
  for (int64_t j = 0; j < R; ++j) {
    V u[NV];
    UNROLL for (int v = 0; v < NV; ++v) u[v] = load(Uc + j * ldu + v * W);
    UNROLL for (int r = 0; r < RB; ++r) {
      const acc_t gj = g[(t + r) * gstride + j];
      UNROLL for (int v = 0; v < NV; ++v) a[r][v] += gj * u[v];
      if constexpr (kScaled) {
        const acc_t ej = e[(t + r) * gstride + j];
        UNROLL for (int v = 0; v < NV; ++v) b[r][v] += ej * u[v];
      }
    }
  }
  UNROLL for (int r = 0; r < RB; ++r) {
    scalar_t* yr = y_row(y, sy, ymap, t + r) + c;
    UNROLL for (int v = 0; v < NV; ++v) {
      V yv = load(yr + v * W);
      if constexpr (kScaled) yv += load(o[t + r] + c + v * W) * a[r][v] + b[r][v];
      else yv += a[r][v];
      store(yr + v * W, yv);
    }
  }
}

// Tiles [tb, te) of `tiles` for tokens [t0, t1), each reading its slice of U from `src`. g and e hold k·R cores
// per token (member i's at offset i·R).
template <typename scalar_t, typename acc_t, bool kScaled>
void apply_tiles(scalar_t* y, int64_t sy, const scalar_t* const* o, const acc_t* g, const acc_t* e,
                 const TileSource<acc_t>& src, int64_t R, int64_t k, const std::vector<int64_t>& off,
                 const std::vector<int64_t>& tiles, int64_t tb, int64_t te, int64_t t0, int64_t t1,
                 const int64_t* ymap = nullptr) {
  constexpr int W = sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
  constexpr int RB = kScaled ? kRB / 2 : kRB;
  const int64_t ldu = src.ld();
  for (int64_t ti = tb; ti < te; ++ti) {
    const int64_t i = tiles[2 * ti], c = tiles[2 * ti + 1];
    const acc_t* gi = g + i * R;  // token t's member-i cores at gi + t·k·R
    const acc_t* ei = kScaled ? e + i * R : nullptr;
    const acc_t* Uc = src.at(ti, c);
    if (c + NV * W <= off[i + 1]) {
      int64_t t = t0;
      for (; t + RB <= t1; t += RB) tile_rows<scalar_t, acc_t, kScaled, RB>(y, sy, o, gi, ei, Uc, ldu, R, k * R, c, t, ymap);
      for (; t < t1; ++t) tile_rows<scalar_t, acc_t, kScaled, 1>(y, sy, o, gi, ei, Uc, ldu, R, k * R, c, t, ymap);
      continue;
    }
    for (int64_t t = t0; t < t1; ++t) {  // the member's last, partial tile
      for (int64_t cc = c; cc < off[i + 1]; ++cc) {
        acc_t a = 0, b = 0;
        for (int64_t j = 0; j < R; ++j) {
          a += gi[t * k * R + j] * Uc[j * ldu + cc - c];
          if constexpr (kScaled) b += ei[t * k * R + j] * Uc[j * ldu + cc - c];
        }
        scalar_t* yt = y_row(y, sy, ymap, t);
        acc_t v = static_cast<acc_t>(yt[cc]);
        v += kScaled ? static_cast<acc_t>(o[t][cc]) * a + b : a;
        yt[cc] = static_cast<scalar_t>(v);
      }
    }
  }
}

// Tiles [tb, te) for all T tokens of a decode step: unscaled, every token at once (register blocks of kRB share each
// load of U); scaled (OSoRA rows), a few tokens at a time, so each token's o and y rows are read front to back — o
// comes from memory at decode (the step's GEMMs stream the weights through every cache level), and this order
// measured ~25 % faster there (2 threads, AVX-512). Shared by core_delta's decode sweep and core_linear.
template <typename scalar_t, typename acc_t, bool kScaled>
void decode_tiles(scalar_t* y, int64_t sy, const scalar_t* const* o, const acc_t* g, const acc_t* e,
                  const TileSource<acc_t>& src, int64_t R, int64_t k, const std::vector<int64_t>& off,
                  const std::vector<int64_t>& tiles, int64_t tb, int64_t te, int64_t T, const int64_t* ymap = nullptr) {
  if constexpr (kScaled) {
    constexpr int64_t kTokens = 4;
    for (int64_t t = 0; t < T; t += kTokens)
      apply_tiles<scalar_t, acc_t, true>(y, sy, o, g, e, src, R, k, off, tiles, tb, te, t, std::min(T, t + kTokens), ymap);
  } else {
    apply_tiles<scalar_t, acc_t, false>(y, sy, o, g, e, src, R, k, off, tiles, tb, te, 0, T, ymap);
  }
}

inline void check_rows(const at::Tensor& t, const char* name, int64_t P, int64_t width, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == P && t.size(1) == width, name, " must be (", P, ", ", width, "), got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, name, " must be contiguous within a row");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have y's dtype");
}

// Each row's slot: slots[p] with slot pools (checked against the pool's S entries), else the row itself.
inline std::vector<int64_t> row_slots(int64_t P, const std::optional<at::Tensor>& slots, int64_t S) {
  std::vector<int64_t> slot(P);
  if (!slots.has_value()) {
    for (int64_t p = 0; p < P; ++p) slot[p] = p;
    return slot;
  }
  TORCH_CHECK(slots->dim() == 1 && slots->size(0) == P && slots->scalar_type() == at::kLong && slots->device().is_cpu(),
              "slots must be a CPU int64 vector with one entry per row (", P, ")");
  const at::Tensor sl = slots->contiguous();
  for (int64_t p = 0; p < P; ++p) {
    slot[p] = sl.const_data_ptr<int64_t>()[p];
    TORCH_CHECK(slot[p] >= 0 && slot[p] < S, "slot ", slot[p], " of row ", p, " is outside the pool of ", S);
  }
  return slot;
}

// The checks both entry points make of a group's terms: Ct (S, k, R, R), o (S, M) and d (S, k·R), U (R, M).
inline void check_terms(const at::Tensor& Ct, const std::optional<at::Tensor>& o, const std::optional<at::Tensor>& d,
                 const at::Tensor& U, int64_t S, int64_t k, int64_t M, at::ScalarType dtype) {
  const int64_t R = U.size(0);
  TORCH_CHECK(U.dim() == 2 && U.size(1) == M && U.is_contiguous(), "U must be a contiguous (R, M) matrix");
  TORCH_CHECK(Ct.dim() == 4 && Ct.size(0) == S && Ct.size(1) == k && Ct.size(2) == R && Ct.size(3) == R,
              "Ct must be (rows, k, R, R), or (slots, k, R, R) with slots");
  TORCH_CHECK(Ct.stride(3) == 1 && Ct.stride(2) == R && Ct.stride(1) == R * R, "Ct must be contiguous within a row");
  TORCH_CHECK(Ct.scalar_type() == dtype, "Ct must have y's dtype");
  TORCH_CHECK(o.has_value() == d.has_value(), "o and d come together");
  if (o.has_value()) {
    check_rows(*o, "o", S, M, dtype);
    check_rows(*d, "d", S, k * R, dtype);
  }
}

// Where each row's core, scale and d live (its slot's, or its own), so the inner loops index no pools.
// With `s` and `diagonal`: s[p] is the row's core diagonals where its slot's cores are all diagonal, else null.
template <typename scalar_t>
struct RowTerms {
  std::vector<const scalar_t*> C, o, d, s;
  RowTerms(const std::vector<int64_t>& slot, const at::Tensor& Ct, const std::optional<at::Tensor>& o_,
           const std::optional<at::Tensor>& d_, const std::optional<at::Tensor>& s_ = std::nullopt,
           const std::optional<at::Tensor>& diagonal = std::nullopt)
      : C(slot.size()), o(slot.size()), d(slot.size()), s(slot.size()) {
    for (size_t p = 0; p < slot.size(); ++p) {
      C[p] = Ct.const_data_ptr<scalar_t>() + slot[p] * Ct.stride(0);
      if (o_.has_value()) {
        o[p] = o_->const_data_ptr<scalar_t>() + slot[p] * o_->stride(0);
        d[p] = d_->const_data_ptr<scalar_t>() + slot[p] * d_->stride(0);
      }
      if (s_.has_value() && diagonal->const_data_ptr<bool>()[slot[p]])
        s[p] = s_->const_data_ptr<scalar_t>() + slot[p] * s_->stride(0);
    }
  }
};

// A decode step's rows by what their delta needs: rows reading slot 0 (the pools' zero adapter: base rows, the
// low-rank rows of a mixed batch) add nothing and are left out; of the others, rows that `scaled` does not flag
// (LoRA-XS's: o = 1, d = 0 in their slots) take the unscaled tiles, half the arithmetic and none of o's bytes, and
// only flagged rows (OSoRA's) the scaled ones. Without o and d no row is scaled; with them and no `scaled`, all are.
// `order` lists the unscaled rows, then the scaled; `map()` is its data, or null where that is every row in order.
struct DecodeRows {
  std::vector<int64_t> order;
  int64_t n_plain = 0, n_scaled = 0;
  bool identity = false;
  DecodeRows(const std::vector<int64_t>& slot, bool has_o, const std::optional<at::Tensor>& scaled) {
    const int64_t P = static_cast<int64_t>(slot.size());
    const bool* flag = nullptr;
    if (has_o && scaled.has_value()) {
      TORCH_CHECK(scaled->dim() == 1 && scaled->size(0) == P && scaled->scalar_type() == at::kBool &&
                  scaled->device().is_cpu() && scaled->is_contiguous(),
                  "scaled must be a contiguous CPU bool vector with one entry per row (", P, ")");
      flag = scaled->const_data_ptr<bool>();
    }
    std::vector<int64_t> scaled_rows;
    for (int64_t p = 0; p < P; ++p) {
      if (slot[p] == 0) continue;
      if (has_o && (flag == nullptr || flag[p])) scaled_rows.push_back(p);
      else order.push_back(p);
    }
    n_plain = static_cast<int64_t>(order.size()), n_scaled = static_cast<int64_t>(scaled_rows.size());
    order.insert(order.end(), scaled_rows.begin(), scaled_rows.end());
    identity = n_plain + n_scaled == P && (n_plain == 0 || n_scaled == 0);
  }
  int64_t active() const { return n_plain + n_scaled; }
  const int64_t* map() const { return identity ? nullptr : order.data(); }
};

// (member, first column) of every TW-wide tile, the members' columns in order.
inline std::vector<int64_t> member_tiles(const std::vector<int64_t>& off, int64_t TW) {
  std::vector<int64_t> tiles;
  for (size_t i = 0; i + 1 < off.size(); ++i)
    for (int64_t c = off[i]; c < off[i + 1]; c += TW) tiles.insert(tiles.end(), {static_cast<int64_t>(i), c});
  return tiles;
}

}  // namespace svdserve::core
