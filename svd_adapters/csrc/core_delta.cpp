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
// (R²·M per row, R·M for a diagonal core, against R·M per token for the two sums above), so its tokens take the
// unscaled path. A gate/up group can take `out`: its activation silu(gate)·up, at prefill fused into the sweep.
// At decode, `core_linear` (core_linear.cpp) runs the group's GEMM and this delta in one call, block by block of
// columns; the pieces both use are in core_tiles.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "core_tiles.h"
#include "parallel.h"
#include "vec.h"

namespace {

using namespace svdserve::core;

constexpr int64_t kChunk = 64;  // tokens per task at prefill

// Whether tokens [t0, t1) all belong to rows (of L tokens) that `zero` flags: rows reading the zero adapter (slot 0
// of the slot pools: C = 0, o = 1, d = 0), whose delta is nothing, so a prefill skips them. Null: none flagged.
inline bool zero_tokens(const char* zero, int64_t L, int64_t t0, int64_t t1) {
  if (zero == nullptr) return false;
  for (int64_t p = t0 / L; p <= (t1 - 1) / L; ++p)
    if (!zero[p]) return false;
  return true;
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
// ldb): U_eff[l, x] = o[x] Σ_j Cᵀ[l, j] U[j, x] + d_l U[l, x], register-blocked like tile_rows. op and Uc point at
// the tile's first column (Uc's row stride ldu).
template <typename scalar_t, typename acc_t, int LB>
inline void fold_tile(const scalar_t* Ci, const scalar_t* op, const scalar_t* di, const acc_t* Uc, int64_t ldu, int64_t R,
                      int64_t l0, acc_t* buf, int64_t ldb) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = sizeof(V) / sizeof(acc_t);
  V a[LB][NV];
  UNROLL for (int r = 0; r < LB; ++r)
    UNROLL for (int v = 0; v < NV; ++v) a[r][v] = V{};
  for (int64_t j = 0; j < R; ++j) {
    V u[NV];
    UNROLL for (int v = 0; v < NV; ++v) u[v] = load(Uc + j * ldu + v * W);
    UNROLL for (int r = 0; r < LB; ++r) {
      const acc_t cj = static_cast<acc_t>(Ci[(l0 + r) * R + j]);
      UNROLL for (int v = 0; v < NV; ++v) a[r][v] += cj * u[v];
    }
  }
  UNROLL for (int r = 0; r < LB; ++r) {
    const acc_t dl = static_cast<acc_t>(di[l0 + r]);
    UNROLL for (int v = 0; v < NV; ++v)
      store(buf + (l0 + r) * ldb + v * W, load(op + v * W) * a[r][v] + dl * load(Uc + (l0 + r) * ldu + v * W));
  }
}

// silu(gate) · up for one pair of numbers, in the accumulation type: the scalar tails of every gated loop below.
template <typename acc_t>
inline acc_t silu_times(acc_t gate, acc_t up) {
  return gate / (acc_t(1) + std::exp(-gate)) * up;
}

// out[t, c] = silu(y[t, c]) · y[t, m + c] for tokens [t0, t1): a gate/up group's activation (its two members'
// outputs side by side), as a pass of its own: for base-only batches (`gated_silu`) and for scaled rows at decode.
// Everywhere else the activation is fused into the delta's sweep (see `sweep_gated`).
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
      ot[c] = static_cast<scalar_t>(silu_times(gate, static_cast<acc_t>(yt[m + c])));
    }
  }
}

// Row p's folded projection for one tile (see the top), its slice of U_eff (R × `width` columns, width ≤ NV·W) into
// bufp (row stride ldb). Ci: the row's member core Cᵀ; op, Uc: its scale and U at the tile's first column (Uc's
// row stride ldu); di: its d.
template <typename scalar_t, typename acc_t>
void fold_row_tile(const scalar_t* Ci, const scalar_t* op, const scalar_t* di, const acc_t* Uc, int64_t ldu, int64_t R,
                   int64_t width, bool diagonal, acc_t* bufp, int64_t ldb) {
  constexpr int W = sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
  constexpr int64_t TW = NV * W;
  constexpr int LB = kRB;
  if (diagonal) {  // U_eff[l, x] = U[l, x] (o[x] S_l + d_l)
    for (int64_t l = 0; l < R; ++l) {
      const acc_t sl = static_cast<acc_t>(Ci[l * R + l]), dl = static_cast<acc_t>(di[l]);
      int64_t x = 0;
      for (; x + W <= width; x += W) store(bufp + l * ldb + x, load(Uc + l * ldu + x) * (load(op + x) * sl + dl));
      for (; x < width; ++x) bufp[l * ldb + x] = Uc[l * ldu + x] * (static_cast<acc_t>(op[x]) * sl + dl);
    }
  } else if (width == TW) {
    int64_t l = 0;
    for (; l + LB <= R; l += LB) fold_tile<scalar_t, acc_t, LB>(Ci, op, di, Uc, ldu, R, l, bufp, ldb);
    for (; l < R; ++l) fold_tile<scalar_t, acc_t, 1>(Ci, op, di, Uc, ldu, R, l, bufp, ldb);
  } else {  // the member's last, partial tile
    for (int64_t l = 0; l < R; ++l) {
      for (int64_t x = 0; x < width; ++x) {
        acc_t a = 0;
        for (int64_t j = 0; j < R; ++j) a += static_cast<acc_t>(Ci[l * R + j]) * Uc[j * ldu + x];
        bufp[l * ldb + x] = static_cast<acc_t>(op[x]) * a + static_cast<acc_t>(di[l]) * Uc[l * ldu + x];
      }
    }
  }
}

// Which (row, member) cores have nothing off their diagonal (OSoRA's), so their fold is R·NV·W, not R²·NV·W.
template <typename scalar_t>
std::vector<char> diagonal_cores(const scalar_t* const* Crow, int64_t P, int64_t k, int64_t R) {
  std::vector<char> diagonal(P * k);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = 0; i < k; ++i) diagonal[p * k + i] = is_diagonal(Crow[p] + i * R * R, R);
  return diagonal;
}

// Row p's whole folded projection U_eff into buf, packed tile by tile (see TileSource), read back through
// TileSource{buf, M, R·TW}. U's tiles come from src.
template <typename scalar_t, typename acc_t>
void fold_row(int64_t p, const scalar_t* const* Crow, const scalar_t* const* orow, const scalar_t* const* drow,
              const TileSource<acc_t>& src, int64_t R, int64_t k, const std::vector<int64_t>& off,
              const std::vector<int64_t>& tiles, const std::vector<char>& diagonal, acc_t* buf) {
  constexpr int64_t TW = NV * sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
  for (size_t ti = 0; ti < tiles.size() / 2; ++ti) {
    const int64_t i = tiles[2 * ti], c = tiles[2 * ti + 1];
    fold_row_tile<scalar_t, acc_t>(Crow[p] + i * R * R, orow[p] + c, drow[p] + i * R, src.at(ti, c), src.ld(), R,
                                   std::min(TW, off[i + 1] - c), diagonal[p * k + i], buf + ti * R * TW, TW);
  }
}

// Scaled rows of several tokens each (OSoRA at prefill) in (row, chunk of its tokens) tasks: fold the row's scale,
// core and d into its own projection (R × M: in L2, R²·M multiply-adds, or R·M for a diagonal core; again only
// where the thread's previous task was another row's), then `apply(&folded, t0, t1)` streams tokens [t0, t1) through
// it (packed tile by tile) as unscaled ones, with their h as the cores. Nothing of size rows × R × M is ever
// written out (folding every row's projection first cost ~10 MB of memory traffic per layer). Rows that `zero`
// flags (the zero adapter's: no delta) are not folded: apply(nullptr, t0, t1).
template <typename scalar_t, typename acc_t, typename Apply>
void folded_chunks(const scalar_t* const* Crow, const scalar_t* const* orow, const scalar_t* const* drow,
                   const TileSource<acc_t>& src, int64_t R, int64_t k, const std::vector<int64_t>& off,
                   const std::vector<int64_t>& tiles, int64_t P, int64_t L, int64_t chunk, const char* zero,
                   const Apply& apply) {
  constexpr int64_t TW = NV * sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
  const int64_t per_row = (L + chunk - 1) / chunk, n_tiles = static_cast<int64_t>(tiles.size()) / 2;
  const std::vector<char> diagonal = diagonal_cores(Crow, P, k, R);
  svdserve::parallel_for(0, P * per_row, 1, [&](int64_t b, int64_t en) {
    acc_t* buf = scratch<acc_t>(2, n_tiles * R * TW);  // this thread's
    const TileSource<acc_t> folded_src{buf, src.M, R * TW, TW};
    int64_t folded = -1;
    for (int64_t item = b; item < en; ++item) {
      const int64_t p = item / per_row, t0 = p * L + (item % per_row) * chunk, t1 = std::min((p + 1) * L, t0 + chunk);
      if (zero != nullptr && zero[p]) {
        apply(static_cast<const TileSource<acc_t>*>(nullptr), t0, t1);
        continue;
      }
      if (p != folded) fold_row<scalar_t, acc_t>(p, Crow, orow, drow, src, R, k, off, tiles, diagonal, buf), folded = p;
      apply(&folded_src, t0, t1);
    }
  });
}

// apply_tiles as a call of its own: inlined into folded_chunks' task loop (with the fold beside it), GCC's code for
// its tiles ran ~20 % slower (OSoRA's prefill delta of the o and down groups, measured).
template <typename scalar_t, typename acc_t, bool kScaled>
__attribute__((noinline)) void apply_tiles_call(scalar_t* y, int64_t sy, const scalar_t* const* o, const acc_t* g,
                                                const acc_t* e, const TileSource<acc_t>& src, int64_t R, int64_t k,
                                                const std::vector<int64_t>& off, const std::vector<int64_t>& tiles,
                                                int64_t tb, int64_t te, int64_t t0, int64_t t1) {
  apply_tiles<scalar_t, acc_t, kScaled>(y, sy, o, g, e, src, R, k, off, tiles, tb, te, t0, t1);
}

// Folded rows (see folded_chunks) through every tile of y, a register block of tokens at a time.
template <typename scalar_t, typename acc_t>
void sweep_folded(scalar_t* y, int64_t sy, const acc_t* g, const scalar_t* const* Crow, const scalar_t* const* orow,
                  const scalar_t* const* drow, const TileSource<acc_t>& src, int64_t R, int64_t k,
                  const std::vector<int64_t>& off, const std::vector<int64_t>& tiles, int64_t P, int64_t L,
                  int64_t chunk, const char* zero) {
  const int64_t n_tiles = static_cast<int64_t>(tiles.size()) / 2;
  folded_chunks<scalar_t, acc_t>(Crow, orow, drow, src, R, k, off, tiles, P, L, chunk, zero,
                                 [&](const TileSource<acc_t>* folded, int64_t t0, int64_t t1) {
    if (folded == nullptr) return;  // a zero row: y stays as it is
    for (int64_t t = t0; t < t1; t += kRB)
      apply_tiles_call<scalar_t, acc_t, false>(y, sy, nullptr, g, nullptr, *folded, R, k, off, tiles, 0, n_tiles, t,
                                               std::min(t1, t + kRB));
  });
}

// silu(x) for one vector (acc_t double: lane by lane, in double).
template <typename acc_t>
inline typename Vec<acc_t>::type silu_vec(typename Vec<acc_t>::type x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return svdserve::silu(x);
  } else {
    constexpr int W = sizeof(x) / sizeof(acc_t);
    for (int l = 0; l < W; ++l) x[l] = x[l] / (acc_t(1) + std::exp(-x[l]));
    return x;
  }
}

// Tokens per register block of the gated tile at prefill: one member's RB × NV accumulators in 12 of AVX2's 16
// vector registers, 16 of AVX-512's 32. (The other sweeps keep kRB: 6 tokens measured slower there.)
constexpr int kGatedRB = svdserve::kVecRegs == 16 ? 6 : 8;

// One member's delta for a register block: a[r][v] = Σ_j g[(t + r)·gstride + j] · Uc[j·ldu + v·W], RB tokens × NV
// vectors in registers, each load of U shared by the block's tokens.
template <typename acc_t, int RB>
inline void member_block(typename Vec<acc_t>::type (&a)[RB][NV], const acc_t* g, const acc_t* Uc, int64_t ldu,
                         int64_t R, int64_t gstride, int64_t t) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = sizeof(V) / sizeof(acc_t);
  UNROLL for (int r = 0; r < RB; ++r)
    UNROLL for (int v = 0; v < NV; ++v) a[r][v] = V{};
  for (int64_t j = 0; j < R; ++j) {
    V u[NV];
    UNROLL for (int v = 0; v < NV; ++v) u[v] = load(Uc + j * ldu + v * W);
    UNROLL for (int r = 0; r < RB; ++r) {
      const acc_t x = g[(t + r) * gstride + j];
      UNROLL for (int v = 0; v < NV; ++v) a[r][v] += x * u[v];
    }
  }
}

// A gate/up group's final activation for one tile pair and tokens t..t+RB-1, without writing y back:
// out[t, c + x] = silu(y[t, c + x] + Δgate) · (y[t, m + c + x] + Δup), Δ = Σ_j g_j U[j, ·] with each member's g
// (gg, gu: token t's at + t·gstride) and U slice (Ug, Uu: the tile's first column, row stride ldu). Gate and up
// each take a pass over the block with one member's RB × NV accumulators (RB = kGatedRB): the gate
// pass leaves silu(gate) in `act` (on the stack, in L1), the up pass multiplies it in. Keeping both members'
// accumulators at once (as this tile did before) halved the tokens sharing each load of U: on AVX2, 2 tokens, and
// the sweep's U reads from L2 were as many as its multiply-adds.
template <typename scalar_t, typename acc_t, int RB>
inline void gated_tile_rows(const scalar_t* y, int64_t sy, scalar_t* out, int64_t so, const acc_t* gg, const acc_t* gu,
                            const acc_t* Ug, const acc_t* Uu, int64_t ldu, int64_t R, int64_t gstride, int64_t c,
                            int64_t m, int64_t t) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = sizeof(V) / sizeof(acc_t);
  alignas(64) acc_t act[RB][NV * W];  // in L1, not registers: the up pass needs all of them
  V a[RB][NV];
  member_block<acc_t, RB>(a, gg, Ug, ldu, R, gstride, t);
  UNROLL for (int r = 0; r < RB; ++r)
    UNROLL for (int v = 0; v < NV; ++v) store(act[r] + v * W, silu_vec<acc_t>(load(y + (t + r) * sy + c + v * W) + a[r][v]));
  member_block<acc_t, RB>(a, gu, Uu, ldu, R, gstride, t);
  UNROLL for (int r = 0; r < RB; ++r) {
    const scalar_t* yr = y + (t + r) * sy + m + c;
    scalar_t* orow = out + (t + r) * so + c;
    UNROLL for (int v = 0; v < NV; ++v) store(orow + v * W, load(act[r] + v * W) * (load(yr + v * W) + a[r][v]));
  }
}

// Tokens [t0, t1) of one gate/up tile pair `width` columns wide (see gated_tile_rows): register blocks of
// kGatedRB tokens, the rest in smaller ones (a folded row's chunk of 64 tokens ends in a block of 4).
template <typename scalar_t, typename acc_t>
void gated_rows(const scalar_t* y, int64_t sy, scalar_t* out, int64_t so, const acc_t* gg, const acc_t* gu,
                const acc_t* Ug, const acc_t* Uu, int64_t ldu, int64_t R, int64_t gstride, int64_t c, int64_t m,
                int64_t width, int64_t t0, int64_t t1) {
  constexpr int64_t TW = NV * sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
  if (width == TW) {
    int64_t t = t0;
    for (; t + kGatedRB <= t1; t += kGatedRB)
      gated_tile_rows<scalar_t, acc_t, kGatedRB>(y, sy, out, so, gg, gu, Ug, Uu, ldu, R, gstride, c, m, t);
    if (t + 4 <= t1) gated_tile_rows<scalar_t, acc_t, 4>(y, sy, out, so, gg, gu, Ug, Uu, ldu, R, gstride, c, m, t), t += 4;
    if (t + 2 <= t1) gated_tile_rows<scalar_t, acc_t, 2>(y, sy, out, so, gg, gu, Ug, Uu, ldu, R, gstride, c, m, t), t += 2;
    if (t < t1) gated_tile_rows<scalar_t, acc_t, 1>(y, sy, out, so, gg, gu, Ug, Uu, ldu, R, gstride, c, m, t);
    return;
  }
  // The members' last, partial tiles. Each column's activation is computed as gated_silu_rows computes it (a
  // vector's silu where the column lies in a whole vector of the row, else the scalar one), so a token of a zero
  // row in a register block with other rows' tokens gets exactly the bare activation.
  constexpr int W = sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
  alignas(64) acc_t gate[TW], up[TW];
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t x = 0; x < width; ++x) {
      acc_t a = 0, b = 0;
      for (int64_t j = 0; j < R; ++j) a += gg[t * gstride + j] * Ug[j * ldu + x], b += gu[t * gstride + j] * Uu[j * ldu + x];
      gate[x] = static_cast<acc_t>(y[t * sy + c + x]) + a, up[x] = static_cast<acc_t>(y[t * sy + m + c + x]) + b;
    }
    int64_t x = 0;
    if constexpr (std::is_same_v<acc_t, float>) {
      for (; x + W <= width; x += W) store(out + t * so + c + x, svdserve::silu(load(gate + x)) * load(up + x));
    }
    for (; x < width; ++x) out[t * so + c + x] = static_cast<scalar_t>(silu_times(gate[x], up[x]));
  }
}

// Tokens [t0, t1) of a gate/up group through every tile pair, a register block of tokens at a time: each token's
// rows of y are read front to back, streams the hardware prefetchers follow (in (tokens, tile) tasks each task
// read a 128-byte piece of every token's row, a page apart: ~2× slower from memory). src holds the members' U_rᵀ
// (packed tile by tile at prefill), or a row's folded projection, and stays in L2.
// With `zero` (rows of L tokens): a register block whose tokens all belong to flagged rows takes the bare activation.
template <typename scalar_t, typename acc_t>
void stream_gated(const scalar_t* y, int64_t sy, scalar_t* out, int64_t so, const acc_t* g, const TileSource<acc_t>& src,
                  int64_t R, const std::vector<int64_t>& tiles, int64_t n_pairs, int64_t m, int64_t t0, int64_t t1,
                  const char* zero = nullptr, int64_t L = 1) {
  constexpr int64_t TW = NV * sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
  constexpr int64_t RB = kGatedRB;
  for (int64_t t = t0; t < t1; t += RB) {
    if (zero_tokens(zero, L, t, std::min(t1, t + RB))) {
      gated_silu_rows<scalar_t>(y, sy, out, so, m, t, std::min(t1, t + RB));
      continue;
    }
    for (int64_t pi = 0; pi < n_pairs; ++pi) {
      const int64_t c = tiles[2 * pi + 1];
      gated_rows<scalar_t, acc_t>(y, sy, out, so, g, g + R, src.at(pi, c), src.at(n_pairs + pi, m + c), src.ld(), R,
                                  2 * R, c, m, std::min(TW, m - c), t, std::min(t1, t + RB));
    }
  }
}

// A gate/up group's delta fused with its activation (`out`): each task reads a gate tile and the matching up tile
// of y once, adds both deltas in registers and writes only out. y is never written back: a separate sweep, even
// one chunk at a time with the activation right after it, wrote all of y back and read it a second time (the
// group's y is 25 MB at a 2048-token prefill of SmolLM2; measured ~3.2 ms a layer over the bare activation's
// 1.5). Unscaled rows: register blocks of tokens through every tile pair (stream_gated), with the tokens' cores g;
// scaled rows (OSoRA at prefill, `orow` given): (row, chunk of its tokens) tasks that first fold the row's whole
// projection (folded_chunks), with g holding the tokens' h.
template <typename scalar_t, typename acc_t>
void sweep_gated(const scalar_t* y, int64_t sy, scalar_t* out, int64_t so, const acc_t* g, const scalar_t* const* Crow,
                 const scalar_t* const* orow, const scalar_t* const* drow, const TileSource<acc_t>& src, int64_t M,
                 int64_t R, const std::vector<int64_t>& off, const std::vector<int64_t>& tiles, int64_t T, int64_t L,
                 int64_t chunk, const char* zero) {
  const int64_t m = M / 2;
  int64_t n_pairs = 0;  // the gate member's tiles come first in `tiles`; each pairs with the up tile m columns on
  while (2 * n_pairs < static_cast<int64_t>(tiles.size()) && tiles[2 * n_pairs] == 0) ++n_pairs;
  if (orow == nullptr) {
    constexpr int64_t RB = kGatedRB;
    svdserve::parallel_for(0, (T + RB - 1) / RB, 4, [&](int64_t b, int64_t en) {
      stream_gated<scalar_t, acc_t>(y, sy, out, so, g, src, R, tiles, n_pairs, m, b * RB, std::min(T, en * RB), zero, L);
    });
    return;
  }
  // Scaled rows: folded as in sweep_folded, then through the gated tile pairs.
  folded_chunks<scalar_t, acc_t>(Crow, orow, drow, src, R, 2, off, tiles, T / L, L, chunk, zero,
                                 [&](const TileSource<acc_t>* folded, int64_t t0, int64_t t1) {
    if (folded == nullptr) gated_silu_rows<scalar_t>(y, sy, out, so, m, t0, t1);  // a zero row: the bare activation
    else stream_gated<scalar_t, acc_t>(y, sy, out, so, g, *folded, R, tiles, n_pairs, m, t0, t1);
  });
}

// Every tile for every token, split across threads. Unscaled, at prefill: in tasks of a register block of tokens,
// each through every tile, so each token's row of y is read front to back (see stream_gated: in (chunk, tile) tasks
// the qkv delta of a 2048-token prefill took 1.1 ms, in these 0.65); a decode step's few rows split the tiles.
// Scaled (OSoRA rows at decode): each thread takes a range of tiles and walks it a few tokens at a time
// (`decode_tiles`).
template <typename scalar_t, typename acc_t, bool kScaled>
void sweep(scalar_t* y, int64_t sy, const scalar_t* const* o, const acc_t* g, const acc_t* e,
           const TileSource<acc_t>& src, int64_t R, int64_t k, const std::vector<int64_t>& off,
           const std::vector<int64_t>& tiles, int64_t T, int64_t chunk, const char* zero = nullptr, int64_t L = 1) {
  const int64_t n_tiles = static_cast<int64_t>(tiles.size()) / 2;
  if (kScaled || T <= chunk) {  // a decode step's few rows: threads split the tiles (y is small and in cache)
    svdserve::parallel_for(0, n_tiles, 4, [&](int64_t tb, int64_t te) {
      decode_tiles<scalar_t, acc_t, kScaled>(y, sy, o, g, e, src, R, k, off, tiles, tb, te, T);
    });
    return;
  }
  svdserve::parallel_for(0, (T + kRB - 1) / kRB, 4, [&](int64_t b, int64_t en) {
    for (int64_t t = b * kRB; t < std::min(T, en * kRB); t += kRB)
      if (!zero_tokens(zero, L, t, std::min(T, t + kRB)))
        apply_tiles<scalar_t, acc_t, kScaled>(y, sy, o, g, e, src, R, k, off, tiles, 0, n_tiles, t, std::min(T, t + kRB));
  });
}

void core_delta(at::Tensor y, const at::Tensor& h, const at::Tensor& Ct, const std::optional<at::Tensor>& o,
                const std::optional<at::Tensor>& d, const at::Tensor& U, at::IntArrayRef offsets, int64_t L,
                const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& slots) {
  TORCH_CHECK(y.device().is_cpu(), "core_delta runs on the CPU");
  const int64_t T = y.size(0), M = y.size(1), R = U.size(0), k = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK(k >= 1 && offsets[0] == 0 && offsets[k] == M, "offsets must run from 0 to y's width");
  TORCH_CHECK(L >= 1 && T % L == 0, "tokens_per_row must divide y's rows");
  const int64_t P = T / L;
  check_rows(h, "h", T, k * R, y.scalar_type());
  TORCH_CHECK(y.stride(1) == 1, "y must be contiguous within a row");
  // With `slots`, Ct, o and d are slot pools (S, ...) and row p reads slot slots[p]; else row p reads its own.
  const int64_t S = slots.has_value() ? Ct.size(0) : P;
  const std::vector<int64_t> slot = row_slots(P, slots, S);
  check_terms(Ct, o, d, U, S, k, M, y.scalar_type());
  if (out.has_value()) {
    TORCH_CHECK(k == 2 && offsets[1] * 2 == M, "out (the gated activation) needs a group of two equal members");
    check_rows(*out, "out", T, M / 2, y.scalar_type());
  }
  if (T == 0) return;
  const std::vector<int64_t> off(offsets.begin(), offsets.end());
  // At prefill, rows reading slot 0 of the pools (the zero adapter: base rows, low-rank rows) add nothing: skipped.
  std::vector<char> zero_rows;
  if (slots.has_value() && L > 1)
    for (int64_t p = 0; p < P; ++p) zero_rows.push_back(slot[p] == 0);
  const char* zero = zero_rows.empty() ? nullptr : zero_rows.data();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "core_delta", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(U.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "U must be in the accumulation dtype");
    constexpr int64_t TW = NV * sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
    const std::vector<int64_t> tiles = member_tiles(off, TW);
    acc_t* g = scratch<acc_t>(0, T * k * R);
    acc_t* e = o.has_value() && L == 1 ? scratch<acc_t>(1, T * k * R) : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const acc_t* Up = U.const_data_ptr<acc_t>();
    const int64_t sy = y.stride(0), sh = h.stride(0);
    const RowTerms<scalar_t> rows(slot, Ct, o, d);
    // With `out` (a gate/up group): out = silu(gate) · up of the final outputs, fused into the sweep where it can be
    // (sweep_gated; y is then left as the base outputs), else a pass of its own after it (y then holds them).
    scalar_t* outp = out.has_value() ? out->data_ptr<scalar_t>() : nullptr;
    const int64_t so = out.has_value() ? out->stride(0) : 0;
    // A call of many tokens (a prefill) reads U from a copy packed tile by tile (see TileSource; R × M numbers,
    // microseconds against milliseconds of sweep) where U's rows alias in L1 (a row stride of whole 4 KB pages) and
    // for a gate/up group (with kGatedRB, SmolLM2's 2048-token prefill on AVX2: ~8.5 → ~5.5 ms a layer).
    // Elsewhere the copy measured no faster, and a decode step's few tokens read each tile once.
    const int64_t n_tiles = static_cast<int64_t>(tiles.size()) / 2;
    const bool pack = T > kChunk && (outp != nullptr || (M * static_cast<int64_t>(sizeof(acc_t))) % 4096 == 0);
    acc_t* packed = pack ? scratch<acc_t>(3, n_tiles * R * TW) : nullptr;
    if (packed) pack_tiles<acc_t>(Up, M, R, off, tiles, TW, packed);
    const TileSource<acc_t> src = packed ? TileSource<acc_t>{packed, M, R * TW, TW} : TileSource<acc_t>{Up, M, 0, TW};
    // Passes split across threads: every token's cores (tiny; for folded rows, h itself in acc_t), then the
    // output tiles (folded rows fold their projection first: folded_chunks).
    if (o.has_value() && L > 1) {  // scaled rows of several tokens: each row's projection folded
      svdserve::parallel_for(0, T, 64, [&](int64_t b, int64_t en) {  // the "cores" are h itself, in acc_t
        for (int64_t t = b; t < en; ++t)
          for (int64_t j = 0; j < k * R; ++j) g[t * k * R + j] = static_cast<acc_t>(hp[t * sh + j]);
      });
      if (outp) {
        sweep_gated<scalar_t, acc_t>(yp, sy, outp, so, g, rows.C.data(), rows.o.data(), rows.d.data(), src, M, R, off,
                                     tiles, T, L, kChunk, zero);
        return;
      }
      sweep_folded<scalar_t, acc_t>(yp, sy, g, rows.C.data(), rows.o.data(), rows.d.data(), src, R, k, off, tiles, P,
                                    L, kChunk, zero);
      return;
    }
    if (o.has_value()) {
      std::vector<const scalar_t*> orow(T);  // token t's row of o
      for (int64_t t = 0; t < T; ++t) orow[t] = rows.o[t / L];
      svdserve::parallel_for(0, T, 8, [&](int64_t b, int64_t en) {
        token_cores<scalar_t, acc_t, true>(hp, sh, rows.C.data(), rows.d.data(), k, R, L, g, e, b, en);
      });
      sweep<scalar_t, acc_t, true>(yp, sy, orow.data(), g, e, src, R, k, off, tiles, T, kChunk);
      // The activation as a pass of its own (decode-shaped batches: the layer's scaled GEMV-sized rows).
      if (outp) {
        const int64_t m = M / 2;
        svdserve::parallel_for(0, T, 16, [&](int64_t b, int64_t en) { gated_silu_rows<scalar_t>(yp, sy, outp, so, m, b, en); });
      }
      return;
    }
    svdserve::parallel_for(0, T, 8, [&](int64_t b, int64_t en) {
      token_cores<scalar_t, acc_t, false>(hp, sh, rows.C.data(), nullptr, k, R, L, g, nullptr, b, en, nullptr, zero);
    });
    if (outp) {
      sweep_gated<scalar_t, acc_t>(yp, sy, outp, so, g, rows.C.data(), nullptr, nullptr, src, M, R, off, tiles, T, L, kChunk,
                                   zero);
      return;
    }
    sweep<scalar_t, acc_t, false>(yp, sy, nullptr, g, nullptr, src, R, k, off, tiles, T, kChunk, zero, L);
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
