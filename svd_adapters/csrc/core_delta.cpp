// One LinearGroup's core delta on the CPU, added into its output in place (svd_adapters/cpu_kernels.py).
//
// Tokens t = 0..T-1, token t of request row p = t / L (L tokens per row: 1 at decode, the padded prompt length
// at prefill). For member i (output columns [off_i, off_{i+1}) of y), with h_i the token's shared projection:
//   y[t, c] += o[p, c] · Σ_j g[j] U[j, c] + Σ_j e[j] U[j, c],   g = C_{p,i} h_i,  e = d_{p,i} ⊙ h_i
// (o and d only for rows whose adapter scales its outputs: OSoRA). With `slots`, C, o and d are the adapter slot
// pools and row p reads slot slots[p], so no per-row copy of them is ever made. U is the members' U_rᵀ side by side,
// (R, M) in the accumulation type. In PyTorch this is ~6 ops per member at decode (core, scale, two skinny
// GEMMs, multiply-add), each a dispatch and a pass over memory, and at prefill K = R GEMMs that BLAS runs at
// half speed; here it is one call per group: every token's cores (tiny), then one sweep over U per tile.
// With output scales and several tokens per row (OSoRA at prefill) each row's scale, core and d are first
// folded into its own projection, Δy_t = h_t · U_eff,p with U_eff,p[l, c] = o[p, c] (Cᵀ U)[l, c] + d[p, l] U[l, c]
// (R²·M per row, R·M for a diagonal core, against R·M per token for the two sums above), tile by tile, so its
// tokens take the unscaled path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <functional>
#include <vector>

#include "parallel.h"
#include "vec.h"

namespace {

using svdserve::Vec;
using svdserve::load;
using svdserve::store;

constexpr int NV = 2;        // vectors of output columns per tile (3 measured no faster)
constexpr int64_t kChunk = 64;  // tokens per task at prefill
// Tokens (or core rows) per register block of an unscaled tile: RB × NV accumulator vectors within the vector
// registers (16 with AVX2, 32 with AVX-512); scaled tiles keep two accumulators per output, so half as many.
constexpr int kRB = 4 * (svdserve::kVecRegs / 16);

// Every token's cores for every member: g = C h and, for scaled rows, e = d ⊙ h; (T, k·R) each.
template <typename scalar_t, typename acc_t, bool kScaled>
void token_cores(const scalar_t* h, int64_t sh, const scalar_t* const* Crow, const scalar_t* const* drow,
                 int64_t k, int64_t R, int64_t L, acc_t* g, acc_t* e, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const scalar_t* ht = h + t * sh;
    const int64_t p = t / L;
    for (int64_t i = 0; i < k; ++i) {
      acc_t* gi = g + (t * k + i) * R;
      for (int64_t j = 0; j < R; ++j) gi[j] = 0;
      const scalar_t* Ci = Crow[p] + i * R * R;  // Cᵀ: g_j = Σ_l h_l Cᵀ[l, j]
      for (int64_t l = 0; l < R; ++l) {
        const acc_t hl = static_cast<acc_t>(ht[i * R + l]);
        for (int64_t j = 0; j < R; ++j) gi[j] += hl * static_cast<acc_t>(Ci[l * R + j]);
      }
      if constexpr (kScaled) {
        for (int64_t j = 0; j < R; ++j)
          e[(t * k + i) * R + j] = static_cast<acc_t>(ht[i * R + j]) * static_cast<acc_t>(drow[p][i * R + j]);
      }
    }
  }
}

// One tile (NV vectors of one member's output columns) for tokens t..t+RB-1. The tile's slice of U
// (R × NV vectors) stays in L1 while tokens stream past; RB tokens at a time share each U load.
template <typename scalar_t, typename acc_t, bool kScaled, int RB>
inline void tile_rows(scalar_t* y, int64_t sy, const scalar_t* const* o, const acc_t* g, const acc_t* e,
                      const acc_t* Uc, int64_t ldu, int64_t R, int64_t gstride, int64_t c, int64_t t) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = sizeof(V) / sizeof(acc_t);
  V a[RB][NV], b[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) a[r][v] = b[r][v] = V{};  // not `= {}`: that compiled to a slow rep-stos
  for (int64_t j = 0; j < R; ++j) {
    V u[NV];
    for (int v = 0; v < NV; ++v) u[v] = load(Uc + j * ldu + v * W);
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

// Tiles [tb, te) of `tiles` for tokens [t0, t1), all reading U (R × M, row stride M). g and e hold k·R cores
// per token (member i's at offset i·R).
template <typename scalar_t, typename acc_t, bool kScaled>
void apply_tiles(scalar_t* y, int64_t sy, const scalar_t* const* o, const acc_t* g, const acc_t* e, const acc_t* U,
                 int64_t M, int64_t R, int64_t k, const std::vector<int64_t>& off, const std::vector<int64_t>& tiles,
                 int64_t tb, int64_t te, int64_t t0, int64_t t1) {
  constexpr int W = sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
  constexpr int RB = kScaled ? kRB / 2 : kRB;
  for (int64_t ti = tb; ti < te; ++ti) {
    const int64_t i = tiles[2 * ti], c = tiles[2 * ti + 1];
    const acc_t* gi = g + i * R;  // token t's member-i cores at gi + t·k·R
    const acc_t* ei = kScaled ? e + i * R : nullptr;
    if (c + NV * W <= off[i + 1]) {
      int64_t t = t0;
      for (; t + RB <= t1; t += RB) tile_rows<scalar_t, acc_t, kScaled, RB>(y, sy, o, gi, ei, U + c, M, R, k * R, c, t);
      for (; t < t1; ++t) tile_rows<scalar_t, acc_t, kScaled, 1>(y, sy, o, gi, ei, U + c, M, R, k * R, c, t);
      continue;
    }
    for (int64_t t = t0; t < t1; ++t) {  // the member's last, partial tile
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

// Whether an R×R core has nothing off its diagonal (OSoRA's diag(S); LoRA-XS's cores are dense).
template <typename scalar_t>
bool is_diagonal(const scalar_t* C, int64_t R) {
  for (int64_t l = 0; l < R; ++l)
    for (int64_t j = 0; j < R; ++j)
      if (l != j && C[l * R + j] != scalar_t(0)) return false;
  return true;
}

// Row p's folded projection for one tile's full width (see the top), rows l0..l0+LB-1, into buf (row stride
// NV·W): U_eff[l, x] = o[x] Σ_j Cᵀ[l, j] U[j, x] + d_l U[l, x], register-blocked like tile_rows. op and Uc point at
// the tile's first column.
template <typename scalar_t, typename acc_t, int LB>
inline void fold_tile(const scalar_t* Ci, const scalar_t* op, const scalar_t* di, const acc_t* Uc, int64_t M, int64_t R,
                      int64_t l0, acc_t* buf) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = sizeof(V) / sizeof(acc_t);
  V a[LB][NV];
  for (int r = 0; r < LB; ++r)
    for (int v = 0; v < NV; ++v) a[r][v] = V{};
  for (int64_t j = 0; j < R; ++j) {
    V u[NV];
    for (int v = 0; v < NV; ++v) u[v] = load(Uc + j * M + v * W);
    for (int r = 0; r < LB; ++r) {
      const acc_t cj = static_cast<acc_t>(Ci[(l0 + r) * R + j]);
      for (int v = 0; v < NV; ++v) a[r][v] += cj * u[v];
    }
  }
  for (int r = 0; r < LB; ++r) {
    const acc_t dl = static_cast<acc_t>(di[l0 + r]);
    for (int v = 0; v < NV; ++v)
      store(buf + (l0 + r) * NV * W + v * W, load(op + v * W) * a[r][v] + dl * load(Uc + (l0 + r) * M + v * W));
  }
}

// Called with a range of tokens [t0, t1) once their rows of y are final (see `gated_silu_rows`), or null.
using Epilogue = std::function<void(int64_t, int64_t)>;

// out[t, c] = silu(y[t, c]) · y[t, m + c] for tokens [t0, t1): a gate/up group's activation (its two members'
// outputs side by side). The unscaled sweep runs it on each chunk right after the chunk's delta, while its rows are
// in cache; for scaled rows core_delta, and `gated_silu`, run it as a pass of its own.
template <typename scalar_t>
void gated_silu_rows(const scalar_t* y, int64_t sy, scalar_t* out, int64_t so, int64_t m, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const scalar_t* yt = y + t * sy;
    scalar_t* ot = out + t * so;
    int64_t c = 0;
    if constexpr (!std::is_same_v<scalar_t, double>) {
      for (; c + svdserve::kFloatLanes <= m; c += svdserve::kFloatLanes)
        store(ot + c, svdserve::silu(load(yt + c)) * load(yt + m + c));
    }
    for (; c < m; ++c) {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t gate = static_cast<acc_t>(yt[c]);
      ot[c] = static_cast<scalar_t>(gate / (acc_t(1) + std::exp(-gate)) * static_cast<acc_t>(yt[m + c]));
    }
  }
}

// Scaled rows of several tokens each (OSoRA at prefill): in (row, tile) tasks, fold the row's scale, core and d into
// the tile's slice of its projection (R × NV·W, in L1: R²·NV·W multiply-adds, or R·NV·W for a diagonal core), then
// run the row's L tokens through it as unscaled ones, with their h as the cores. Nothing of size rows × R × M is
// ever written out (folding whole projections first cost ~10 MB of memory traffic per layer).
template <typename scalar_t, typename acc_t>
void sweep_folded(scalar_t* y, int64_t sy, const acc_t* g, const scalar_t* const* Crow, const scalar_t* const* orow,
                  const scalar_t* const* drow, const acc_t* U, int64_t M, int64_t R, int64_t k,
                  const std::vector<int64_t>& off, const std::vector<int64_t>& tiles, int64_t P, int64_t L) {
  constexpr int W = sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
  constexpr int64_t TW = NV * W;
  constexpr int LB = kRB, RB = kRB;
  const int64_t n_tiles = static_cast<int64_t>(tiles.size()) / 2;
  std::vector<char> diagonal(P * k);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = 0; i < k; ++i) diagonal[p * k + i] = is_diagonal(Crow[p] + i * R * R, R);
  // Row p's tile ti, with buf (R × TW) as its folded projection's slice.
  auto row_tile = [&](int64_t p, int64_t ti, acc_t* bufp) {
    const int64_t i = tiles[2 * ti], c = tiles[2 * ti + 1];
    const int64_t width = std::min(TW, off[i + 1] - c);
    const scalar_t* Ci = Crow[p] + i * R * R;
    const scalar_t* op = orow[p] + c;
    const scalar_t* di = drow[p] + i * R;
    const acc_t* Uc = U + c;
    if (diagonal[p * k + i]) {  // U_eff[l, x] = U[l, x] (o[x] S_l + d_l)
      for (int64_t l = 0; l < R; ++l) {
        const acc_t sl = static_cast<acc_t>(Ci[l * R + l]), dl = static_cast<acc_t>(di[l]);
        int64_t x = 0;
        for (; x + W <= width; x += W) store(bufp + l * TW + x, load(Uc + l * M + x) * (load(op + x) * sl + dl));
        for (; x < width; ++x) bufp[l * TW + x] = Uc[l * M + x] * (static_cast<acc_t>(op[x]) * sl + dl);
      }
    } else if (width == TW) {
      int64_t l = 0;
      for (; l + LB <= R; l += LB) fold_tile<scalar_t, acc_t, LB>(Ci, op, di, Uc, M, R, l, bufp);
      for (; l < R; ++l) fold_tile<scalar_t, acc_t, 1>(Ci, op, di, Uc, M, R, l, bufp);
    } else {  // the member's last, partial tile
      for (int64_t l = 0; l < R; ++l) {
        for (int64_t x = 0; x < width; ++x) {
          acc_t a = 0;
          for (int64_t j = 0; j < R; ++j) a += static_cast<acc_t>(Ci[l * R + j]) * Uc[j * M + x];
          bufp[l * TW + x] = static_cast<acc_t>(op[x]) * a + static_cast<acc_t>(di[l]) * Uc[l * M + x];
        }
      }
    }
    const acc_t* gi = g + i * R;  // token t's member-i projection at gi + t·k·R
    const int64_t t0 = p * L, t1 = t0 + L;
    if (width == TW) {
      int64_t t = t0;
      for (; t + RB <= t1; t += RB) tile_rows<scalar_t, acc_t, false, RB>(y, sy, nullptr, gi, nullptr, bufp, TW, R, k * R, c, t);
      for (; t < t1; ++t) tile_rows<scalar_t, acc_t, false, 1>(y, sy, nullptr, gi, nullptr, bufp, TW, R, k * R, c, t);
      return;
    }
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t x = 0; x < width; ++x) {
        acc_t a = 0;
        for (int64_t j = 0; j < R; ++j) a += gi[t * k * R + j] * bufp[j * TW + x];
        y[t * sy + c + x] = static_cast<scalar_t>(static_cast<acc_t>(y[t * sy + c + x]) + a);
      }
    }
  };
  svdserve::parallel_for(0, P * n_tiles, 4, [&](int64_t b, int64_t en) {
    std::vector<acc_t> buf(R * TW);
    for (int64_t item = b; item < en; ++item) row_tile(item / n_tiles, item % n_tiles, buf.data());
  });
}

// Every tile for every token, split across threads. Unscaled: in (chunk of `chunk` tokens, tile) tasks, so a
// task's stretch of y (chunk rows × one tile) stays in cache and its pages in the TLB; with an epilogue, a chunk
// per task, the epilogue right after its tiles (the scaled order here takes none). Scaled (OSoRA rows at
// decode): each thread takes a range of tiles and walks it a few tokens at a time, so each token's o and y rows
// are read front to back, streams the hardware prefetchers follow, instead of 128-byte pieces of every row at
// once: o comes from memory at decode (the step's GEMMs stream the weights through every cache level), and this
// order measured ~25 % faster there (2 threads, AVX-512); for unscaled rows it was slower.
template <typename scalar_t, typename acc_t, bool kScaled>
void sweep(scalar_t* y, int64_t sy, const scalar_t* const* o, const acc_t* g, const acc_t* e, const acc_t* U,
           int64_t M, int64_t R, int64_t k, const std::vector<int64_t>& off, const std::vector<int64_t>& tiles,
           int64_t T, int64_t chunk, const Epilogue* epilogue) {
  const int64_t n_tiles = static_cast<int64_t>(tiles.size()) / 2;
  if constexpr (kScaled) {
    constexpr int64_t kTokens = 4;
    svdserve::parallel_for(0, n_tiles, 4, [&](int64_t tb, int64_t te) {
      for (int64_t t = 0; t < T; t += kTokens)
        apply_tiles<scalar_t, acc_t, kScaled>(y, sy, o, g, e, U, M, R, k, off, tiles, tb, te, t, std::min(T, t + kTokens));
    });
    return;
  }
  const int64_t chunks = (T + chunk - 1) / chunk;
  if (epilogue) {  // a chunk per task: all its tiles, then the epilogue over its tokens while they are in cache
    svdserve::parallel_for(0, chunks, 1, [&](int64_t b, int64_t en) {
      for (int64_t c = b; c < en; ++c) {
        const int64_t t0 = c * chunk, t1 = std::min(T, (c + 1) * chunk);
        apply_tiles<scalar_t, acc_t, kScaled>(y, sy, o, g, e, U, M, R, k, off, tiles, 0, n_tiles, t0, t1);
        (*epilogue)(t0, t1);
      }
    });
    return;
  }
  svdserve::parallel_for(0, chunks * n_tiles, 4, [&](int64_t b, int64_t en) {
    for (int64_t item = b; item < en; ++item) {
      const int64_t c = item / n_tiles, ti = item % n_tiles;
      apply_tiles<scalar_t, acc_t, kScaled>(y, sy, o, g, e, U, M, R, k, off, tiles, ti, ti + 1, c * chunk,
                                            std::min(T, (c + 1) * chunk));
    }
  });
}

// Per-thread scratch buffers that only grow: a fresh allocation of a prefill's size per call costs a memset and
// page faults (measured, when it held whole folded projections: OSoRA's prefill delta ~1.7× slower in the model
// than in a loop that reused its memory). Every element used is written before it is read.
template <typename acc_t>
acc_t* scratch(int which, int64_t n) {
  thread_local std::vector<acc_t> buffers[2];
  std::vector<acc_t>& b = buffers[which];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

void check_rows(const at::Tensor& t, const char* name, int64_t P, int64_t width, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == P && t.size(1) == width, name, " must be (", P, ", ", width, "), got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, name, " must be contiguous within a row");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have y's dtype");
}

void core_delta(at::Tensor y, const at::Tensor& h, const at::Tensor& Ct, const std::optional<at::Tensor>& o,
                const std::optional<at::Tensor>& d, const at::Tensor& U, at::IntArrayRef offsets, int64_t L,
                const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& slots) {
  TORCH_CHECK(y.device().is_cpu(), "core_delta runs on the CPU");
  const int64_t T = y.size(0), M = y.size(1), R = U.size(0), k = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK(k >= 1 && offsets[0] == 0 && offsets[k] == M, "offsets must run from 0 to y's width");
  TORCH_CHECK(U.dim() == 2 && U.size(1) == M && U.is_contiguous(), "U must be a contiguous (R, M) matrix");
  TORCH_CHECK(L >= 1 && T % L == 0, "tokens_per_row must divide y's rows");
  const int64_t P = T / L;
  check_rows(h, "h", T, k * R, y.scalar_type());
  TORCH_CHECK(y.stride(1) == 1, "y must be contiguous within a row");
  // With `slots`, Ct, o and d are slot pools (S, ...) and row p reads slot slots[p]; else row p reads its own.
  const int64_t S = slots.has_value() ? Ct.size(0) : P;
  std::vector<int64_t> slot(P);
  if (slots.has_value()) {
    TORCH_CHECK(slots->dim() == 1 && slots->size(0) == P && slots->scalar_type() == at::kLong && slots->device().is_cpu(),
                "slots must be a CPU int64 vector with one entry per row (", P, ")");
    const at::Tensor sl = slots->contiguous();
    for (int64_t p = 0; p < P; ++p) {
      slot[p] = sl.const_data_ptr<int64_t>()[p];
      TORCH_CHECK(slot[p] >= 0 && slot[p] < S, "slot ", slot[p], " of row ", p, " is outside the pool of ", S);
    }
  } else {
    for (int64_t p = 0; p < P; ++p) slot[p] = p;
  }
  TORCH_CHECK(Ct.dim() == 4 && Ct.size(0) == S && Ct.size(1) == k && Ct.size(2) == R && Ct.size(3) == R,
              "Ct must be (rows, k, R, R), or (slots, k, R, R) with slots");
  TORCH_CHECK(Ct.stride(3) == 1 && Ct.stride(2) == R && Ct.stride(1) == R * R, "Ct must be contiguous within a row");
  TORCH_CHECK(Ct.scalar_type() == y.scalar_type(), "Ct must have y's dtype");
  TORCH_CHECK(o.has_value() == d.has_value(), "o and d come together");
  if (o.has_value()) {
    check_rows(*o, "o", S, M, y.scalar_type());
    check_rows(*d, "d", S, k * R, y.scalar_type());
  }
  if (out.has_value()) {
    TORCH_CHECK(k == 2 && offsets[1] * 2 == M, "out (the gated activation) needs a group of two equal members");
    check_rows(*out, "out", T, M / 2, y.scalar_type());
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
    acc_t* g = scratch<acc_t>(0, T * k * R);
    acc_t* e = o.has_value() && L == 1 ? scratch<acc_t>(1, T * k * R) : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const acc_t* Up = U.const_data_ptr<acc_t>();
    const int64_t sy = y.stride(0), sh = h.stride(0);
    // Each row's core, scale and d, where its slot (or its own row) keeps them: no division in the inner loops.
    std::vector<const scalar_t*> Crow(P), orow_p(P), drow(P);
    for (int64_t p = 0; p < P; ++p) {
      Crow[p] = Ct.const_data_ptr<scalar_t>() + slot[p] * Ct.stride(0);
      if (o.has_value()) {
        orow_p[p] = o->const_data_ptr<scalar_t>() + slot[p] * o->stride(0);
        drow[p] = d->const_data_ptr<scalar_t>() + slot[p] * d->stride(0);
      }
    }
    // With `out`: out = silu(gate) · up of the final y (see gated_silu_rows for when it runs).
    Epilogue gated;
    if (out.has_value()) {
      scalar_t* outp = out->data_ptr<scalar_t>();
      const int64_t so = out->stride(0), m = M / 2;
      gated = [=](int64_t t0, int64_t t1) { gated_silu_rows<scalar_t>(yp, sy, outp, so, m, t0, t1); };
    }
    const Epilogue* epilogue = out.has_value() ? &gated : nullptr;
    // Passes split across threads: every token's cores (tiny; for folded rows, h itself in acc_t), then the
    // output tiles (folded rows fold their projection per tile there).
    if (o.has_value() && L > 1) {  // scaled rows of several tokens: fold in each tile (sweep_folded)
      svdserve::parallel_for(0, T, 64, [&](int64_t b, int64_t en) {  // the "cores" are h itself, in acc_t
        for (int64_t t = b; t < en; ++t)
          for (int64_t j = 0; j < k * R; ++j) g[t * k * R + j] = static_cast<acc_t>(hp[t * sh + j]);
      });
      sweep_folded<scalar_t, acc_t>(yp, sy, g, Crow.data(), orow_p.data(), drow.data(), Up, M, R, k, off, tiles, P, L);
    } else if (o.has_value()) {
      std::vector<const scalar_t*> orow(T);  // token t's row of o
      for (int64_t t = 0; t < T; ++t) orow[t] = orow_p[t / L];
      svdserve::parallel_for(0, T, 8, [&](int64_t b, int64_t en) {
        token_cores<scalar_t, acc_t, true>(hp, sh, Crow.data(), drow.data(), k, R, L, g, e, b, en);
      });
      sweep<scalar_t, acc_t, true>(yp, sy, orow.data(), g, e, Up, M, R, k, off, tiles, T, kChunk, nullptr);
    } else {
      svdserve::parallel_for(0, T, 8, [&](int64_t b, int64_t en) {
        token_cores<scalar_t, acc_t, false>(hp, sh, Crow.data(), nullptr, k, R, L, g, nullptr, b, en);
      });
      sweep<scalar_t, acc_t, false>(yp, sy, nullptr, g, nullptr, Up, M, R, k, off, tiles, T, kChunk, epilogue);
      return;
    }
    // Scaled rows: the epilogue as a pass of its own. Run per row right after the folded sweep's tiles it
    // measured ~2× slower in the model (gate/up at 2048 tokens: 4.4 against 2.0 + 1.4 ms).
    if (epilogue) svdserve::parallel_for(0, T, 16, [&](int64_t b, int64_t en) { (*epilogue)(b, en); });
  });
}

// silu(gate) · up for y = [gate | up] (T, 2m): the activation of a gate/up group without adapters, in one pass
// (torch's silu and multiply are two passes and a temporary), so base rows get the same activation as
// `core_delta`'s `out`.
at::Tensor gated_silu(const at::Tensor& y) {
  TORCH_CHECK(y.device().is_cpu(), "gated_silu runs on the CPU");
  TORCH_CHECK(y.dim() == 2 && y.size(1) % 2 == 0 && y.stride(1) == 1,
              "y must be (T, 2m) [gate | up], contiguous within a row, got ", y.sizes());
  const int64_t T = y.size(0), m = y.size(1) / 2;
  at::Tensor out = at::empty({T, m}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "gated_silu", [&] {
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    svdserve::parallel_for(0, T, 16, [&](int64_t b, int64_t en) { gated_silu_rows<scalar_t>(yp, y.stride(0), op, m, m, b, en); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(svdserve, m) {
  m.def("core_delta(Tensor(a!) y, Tensor h, Tensor Ct, Tensor? o, Tensor? d, Tensor U, int[] offsets, "
        "int tokens_per_row, Tensor(b!)? out=None, Tensor? slots=None) -> ()");
  m.def("gated_silu(Tensor y) -> Tensor");
}

TORCH_LIBRARY_IMPL(svdserve, CPU, m) {
  m.impl("core_delta", &core_delta);
  m.impl("gated_silu", &gated_silu);
}
