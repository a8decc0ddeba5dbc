// One LinearGroup's low-rank delta (SORSA, plain LoRA) on the CPU, added into its output in place
// (svd_adapters/cpu_kernels.py).
//
// Request row p (L tokens: 1 at decode, the padded prompt length at prefill) reads low-rank slot s = slots[p] (0: no
// low-rank adapter, skipped). For member i (output columns [off_i, off_{i+1}) of y), with that slot's A_i (its K
// rows of A, each n wide) and B_iᵀ (K, m_i), for each of the row's tokens x:
//   t = A_i x (the first kr = ranks[s] rows only),   y[off_i + c] += Σ_{j<kr} t_j B_iᵀ[j, c]
// and, with h, d and U (SORSA's frozen −U_r σ_r V_rᵀ, through the token's shared projection h_i = V_rᵀx):
//   e = d_{s,i} ⊙ h_i,   y[off_i + c] += Σ_{j<R} e_j U[j, off_i + c]    (U: the members' U_rᵀ side by side, (R, M))
// Only the first kr rows: a rank-16 LoRA in a pool sized for SORSA's 2·16 costs half. Work goes out in (row,
// member) tasks, straight from the slots: in PyTorch this was a gather of every row's A and B (copies), two
// batched products, a concatenation and a scatter back into y, each a pass over memory.
// Decode: each row reads (k·K·n + K·M) numbers per layer for one token, so it is bound by memory bandwidth: two
// vector loops read A and Bᵀ once, a few rows at a time, each row front to back. Prefill: bound by arithmetic, a
// chunk of the row's tokens at a time: their t = A_i x by outer-product tiles from A_i transposed (`project_tile`)
// into a float32 buffer with e = d ⊙ h beside it, then [t | e] · [B_iᵀ; U] added into y by tiles of tokens ×
// columns held in registers (a block of tokens through all of the member's columns), both operands packed per task
// (a few % of its arithmetic) so that the rows a tile reads do not evict each other in L1. (This was two BLAS
// calls per task, a temporary and an add, ~15 ATen ops each: twice the time on SmolLM2's shapes in float32, 2.7×
// in bfloat16, a row's products being too small for BLAS to reach speed.) float64 (the tests' references) runs
// token by token as at decode.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "vec.h"

namespace {

using svdserve::Vec;
using svdserve::load;
using svdserve::store;

constexpr int kRowsA = 4;  // rows of A per pass over x: each x load feeds 4 dot products
constexpr int kRowsB = 4;  // decode: rows of Bᵀ per pass over the outputs
constexpr int kTileB = 4;  // prefill: vectors of output columns per tile of [Bᵀ; U]
constexpr int64_t kTokenChunk = 64;  // prefill: tokens per pass (their x, [t | e] and y rows stay in L2)
// Prefill: tokens per tile of the expansion, kTokTile × kTileB accumulators plus kTileB loaded vectors in registers
// (on AVX2, 4 tokens × 2 vectors, 4 × 3, 3 × 3 and 6 × 2 measured within noise of 2 × 4: y's pass over memory, not
// the tile, sets the time)
constexpr int kTokTile = svdserve::kVecRegs == 32 ? 4 : 2;
constexpr int64_t kSpan = kTileB * svdserve::kFloatLanes;  // columns per tile
// Prefill: tokens whose rows of y one pass of the expansion walks side by side, span by span. AVX2's tile of 2
// tokens reads each span of [B; U] for 8 FMAs a vector, L2's bandwidth when the span comes from there: blocks of 8
// tokens, the span reused from L1, measured ~5 % faster there than tile by tile; AVX-512's tile of 4 measured
// ~5 % slower with blocks of 8 than tile by tile (bench/prefill_kernels.py on Zen 4, each build --against the other).
constexpr int64_t kTokBlock = svdserve::kVecRegs == 32 ? kTokTile : 8;

template <typename acc_t>
inline acc_t lanes_sum(typename Vec<acc_t>::type v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return svdserve::hsum(v);
  } else {
    constexpr int W = sizeof(v) / sizeof(acc_t);
    acc_t s = 0;
    for (int l = 0; l < W; ++l) s += v[l];
    return s;
  }
}

// t[j] = A[j, :] · x for j in [0, kr): A rows of n contiguous numbers.
template <typename scalar_t, typename acc_t>
void project_rows(const scalar_t* A, int64_t n, const scalar_t* x, int64_t kr, acc_t* t) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = sizeof(V) / sizeof(acc_t);
  int64_t j = 0;
  for (; j + kRowsA <= kr; j += kRowsA) {
    V a[kRowsA];
    for (int r = 0; r < kRowsA; ++r) a[r] = V{};
    int64_t c = 0;
    for (; c + W <= n; c += W) {
      const V xv = load(x + c);
      for (int r = 0; r < kRowsA; ++r) a[r] += load(A + (j + r) * n + c) * xv;
    }
    for (int r = 0; r < kRowsA; ++r) {
      acc_t s = lanes_sum<acc_t>(a[r]);
      for (int64_t cc = c; cc < n; ++cc) s += static_cast<acc_t>(A[(j + r) * n + cc]) * static_cast<acc_t>(x[cc]);
      t[j + r] = s;
    }
  }
  for (; j < kr; ++j) {
    V a = V{};
    int64_t c = 0;
    for (; c + W <= n; c += W) a += load(A + j * n + c) * load(x + c);
    acc_t s = lanes_sum<acc_t>(a);
    for (; c < n; ++c) s += static_cast<acc_t>(A[j * n + c]) * static_cast<acc_t>(x[c]);
    t[j] = s;
  }
}

// acc[c] += Σ_{j<rows} w[j] P[j·ld + c] for c in [0, m): kRowsB rows of P per pass over acc (m numbers, in L1),
// each row read front to back. (Tiles of columns across all rows, one pass over y, read gate/up's 16 rows of 1536
// numbers as 16 strided streams that fall into two L1 sets: its decode delta measured 15-35 % slower that way.)
template <typename scalar_t, typename acc_t>
void axpy_rows(const scalar_t* P, int64_t ld, const acc_t* w, int64_t rows, int64_t m, acc_t* acc) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = sizeof(V) / sizeof(acc_t);
  constexpr int NR = kRowsB;
  int64_t j = 0;
  for (; j + NR <= rows; j += NR) {
    int64_t c = 0;
    for (; c + W <= m; c += W) {
      V a = load(acc + c);
      for (int r = 0; r < NR; ++r) a += w[j + r] * load(P + (j + r) * ld + c);
      store(acc + c, a);
    }
    for (; c < m; ++c)
      for (int r = 0; r < NR; ++r) acc[c] += w[j + r] * static_cast<acc_t>(P[(j + r) * ld + c]);
  }
  for (; j < rows; ++j) {
    int64_t c = 0;
    for (; c + W <= m; c += W) store(acc + c, load(acc + c) + w[j] * load(P + j * ld + c));
    for (; c < m; ++c) acc[c] += w[j] * static_cast<acc_t>(P[j * ld + c]);
  }
}

// y[c] += Σ_{j<kr} t[j] Bt[j, c] + Σ_{j<re} e[j] U[j, c] for c in [0, m): Bt rows of m contiguous numbers, U
// rows (the accumulation dtype) ldu apart, or re = 0; summed in `acc` (m numbers), so y is read, and rounded to its
// dtype, once.
template <typename scalar_t, typename acc_t>
void expand_rows(const scalar_t* Bt, const acc_t* t, int64_t kr, const acc_t* U, int64_t ldu, const acc_t* e,
                 int64_t re, int64_t m, scalar_t* y, acc_t* acc) {
  for (int64_t c = 0; c < m; ++c) acc[c] = static_cast<acc_t>(y[c]);
  axpy_rows(Bt, m, t, kr, m, acc);
  axpy_rows(U, ldu, e, re, m, acc);
  for (int64_t c = 0; c < m; ++c) y[c] = static_cast<scalar_t>(acc[c]);
}

// The call's operands as raw pointers and strides (h, d and U null without a d-term), and each (row, member)
// task's share of them: request row p's tokens (L of them) and member i's columns of y, the row's slot's terms.
template <typename scalar_t>
struct Operands {
  using acc_t = at::opmath_type<scalar_t>;
  struct Task {
    const scalar_t *x, *A, *B, *h, *d;  // x and h: the row's first token; A, B, d: the slot's, member i's part
    const acc_t* U;                      // U's column of the member's first output (row stride M)
    scalar_t* y;                         // the row's first token, the member's first column
    int64_t kr, m;                       // the slot's filled rank; the member's width
  };

  Operands(at::Tensor& y_, const at::Tensor& x_, const at::Tensor& A_, at::TensorList Bt, const std::vector<int64_t>& off_,
           const int64_t* slot_, const int64_t* rank_, int64_t L_, int64_t K_, int64_t R_,
           const std::optional<at::Tensor>& h_, const std::optional<at::Tensor>& d_, const std::optional<at::Tensor>& U_)
      : y(y_.data_ptr<scalar_t>()), x(x_.const_data_ptr<scalar_t>()), A(A_.const_data_ptr<scalar_t>()),
        h(h_.has_value() ? h_->const_data_ptr<scalar_t>() : nullptr),
        d(d_.has_value() ? d_->const_data_ptr<scalar_t>() : nullptr),
        U(U_.has_value() ? U_->const_data_ptr<acc_t>() : nullptr), slot(slot_), rank(rank_), off(off_),
        sy(y_.stride(0)), sx(x_.stride(0)), sA(A_.stride(0)), sh(h_.has_value() ? h_->stride(0) : 0),
        sd(d_.has_value() ? d_->stride(0) : 0), n(A_.size(2)), M(y_.size(1)), L(L_), K(K_), R(R_) {
    for (const at::Tensor& B : Bt) Bp.push_back(B.const_data_ptr<scalar_t>()), sB.push_back(B.stride(0));
  }

  // The same task for the row's token l alone.
  Task at_token(Task o, int64_t l) const {
    o.x += l * sx, o.y += l * sy;
    if (o.h != nullptr) o.h += l * sh;
    return o;
  }

  Task task(int64_t p, int64_t i) const {
    const int64_t s = slot[p];
    return {x + p * L * sx, A + s * sA + i * K * n, Bp[i] + s * sB[i], h ? h + p * L * sh + i * R : nullptr,
            d ? d + s * sd + i * R : nullptr, U ? U + off[i] : nullptr, y + p * L * sy + off[i], rank[s],
            off[i + 1] - off[i]};
  }

  scalar_t* y;
  const scalar_t *x, *A, *h, *d;
  const acc_t* U;
  std::vector<const scalar_t*> Bp;
  std::vector<int64_t> sB;
  const int64_t *slot, *rank;
  const std::vector<int64_t>& off;
  int64_t sy, sx, sA, sh, sd, n, M, L, K, R;
};

// d's nonzero length (0 without one; SORSA of rank r < R: d = −σ_r, then zeros): the d-term's rows to apply.
template <typename scalar_t>
int64_t d_length(const scalar_t* d, int64_t R) {
  int64_t re = 0;
  for (int64_t j = 0; d != nullptr && j < R; ++j)
    if (d[j] != scalar_t(0)) re = j + 1;
  return re;
}

// A's first kr rows transposed into At (n rows of krp floats, krp = kr rounded up to whole vectors, zeros past kr):
// the layout project_tile reads, the kr weights of one input element side by side.
// kBlock columns at a time, each of A's kr rows read a line at a time into the block's part of At (kBlock · krp
// floats, in L1). Column by column (one number from each of kr rows n apart; for down's 1536, 6 KB apart, they share
// L1 sets) it held ~20 % of a 64-token task's profile samples; ~10 % this way, most of it A arriving from memory.
template <typename scalar_t>
void pack_projection(const scalar_t* A, int64_t n, int64_t kr, int64_t krp, float* At) {
  constexpr int64_t kBlock = 16;
  for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
    const int64_t cn = std::min(kBlock, n - c0);
    float* block = At + c0 * krp;
    for (int64_t j = 0; j < kr; ++j)
      for (int64_t c = 0; c < cn; ++c) block[c * krp + j] = static_cast<float>(A[j * n + c0 + c]);
    for (int64_t c = 0; c < cn; ++c)
      for (int64_t j = kr; j < krp; ++j) block[c * krp + j] = 0;
  }
}

// t[r, j0 + j] = x[r, :] · A[j0 + j, :] for TB_ tokens and NV_ vectors of j, as outer products in registers: for
// each input element, NV_ vectors of At times the TB_ tokens' value of it; no horizontal sums, and x read once per
// TB_ tokens (the dot-product tile reads a chunk's x once per CB columns of A).
template <int TB_, int NV_, typename scalar_t>
inline void project_tile(const scalar_t* x, int64_t sx, const float* At, int64_t krp, int64_t n, int64_t j0,
                         int64_t width, float* t, int64_t ldt) {
  using V = Vec<float>::type;
  constexpr int W = svdserve::kFloatLanes;
  V a[TB_][NV_];
  for (int r = 0; r < TB_; ++r)
    for (int v = 0; v < NV_; ++v) a[r][v] = V{};
  for (int64_t c = 0; c < n; ++c) {
    V w[NV_];
    for (int v = 0; v < NV_; ++v) w[v] = load(At + c * krp + j0 + v * W);
    for (int r = 0; r < TB_; ++r) {
      const float xc = static_cast<float>(x[r * sx + c]);
      for (int v = 0; v < NV_; ++v) a[r][v] += xc * w[v];
    }
  }
  for (int r = 0; r < TB_; ++r) {
    alignas(64) float row[NV_ * W];
    for (int v = 0; v < NV_; ++v) store(row + v * W, a[r][v]);
    for (int64_t j = 0; j < width; ++j) t[r * ldt + j0 + j] = row[j];
  }
}

// Tokens per outer-product tile of NV_ vectors: the accumulators, NV_ loaded vectors and a broadcast in registers.
template <int NV_>
constexpr int kProjTokens = std::min(12, (svdserve::kVecRegs - 1 - NV_) / NV_);

template <int NV_, typename scalar_t>
void project_block(const scalar_t* x, int64_t sx, const float* At, int64_t krp, int64_t n, int64_t rows, int64_t j0,
                   int64_t width, float* t, int64_t ldt) {
  constexpr int TB = kProjTokens<NV_>;
  int64_t r = 0;
  for (; r + TB <= rows; r += TB) project_tile<TB, NV_>(x + r * sx, sx, At, krp, n, j0, width, t + r * ldt, ldt);
  // The tokens left over (4 of a 64-token chunk at TB = 12) in tiles of 4 and 2: one token alone is a single chain
  // of dependent FMAs per vector, latency-bound (one-token tiles took ~20 % of a 64-token projection).
  for (; r + 4 <= rows; r += 4) project_tile<4, NV_>(x + r * sx, sx, At, krp, n, j0, width, t + r * ldt, ldt);
  for (; r + 2 <= rows; r += 2) project_tile<2, NV_>(x + r * sx, sx, At, krp, n, j0, width, t + r * ldt, ldt);
  for (; r < rows; ++r) project_tile<1, NV_>(x + r * sx, sx, At, krp, n, j0, width, t + r * ldt, ldt);
}

// t = x · Aᵀ for a chunk of tokens from the transposed At: blocks of up to 4 vectors of its columns.
template <typename scalar_t>
void project_packed(const scalar_t* x, int64_t sx, const float* At, int64_t n, int64_t rows, int64_t kr, int64_t krp,
                    float* t, int64_t ldt) {
  constexpr int W = svdserve::kFloatLanes;
  for (int64_t j0 = 0; j0 < kr; j0 += 4 * W) {
    const int64_t width = std::min<int64_t>(4 * W, kr - j0);
    switch ((width + W - 1) / W) {
      case 1: project_block<1>(x, sx, At, krp, n, rows, j0, width, t, ldt); break;
      case 2: project_block<2>(x, sx, At, krp, n, rows, j0, width, t, ldt); break;
      case 3: project_block<3>(x, sx, At, krp, n, rows, j0, width, t, ldt); break;
      default: project_block<4>(x, sx, At, krp, n, rows, j0, width, t, ldt); break;
    }
  }
}

// [B; U] (kr rows of B, m numbers apart, then re rows of U, ldu apart) in float32, packed span by span: the rows
// of span-wide column tile c / span contiguous at P + (c / span)·(kr + re)·span; columns past the last whole
// span are left out. As given, the rows of a tile lie m (or M) numbers apart: for gate/up's 1536 (and U's 3072)
// that is a multiple of 2 KB, so a tile's 32 rows fall into two L1 sets and evict each other on every pass of
// tokens (the same aliasing the core sweep's `pack_tiles` avoids).
template <typename scalar_t>
void pack_expansion(const scalar_t* B, int64_t kr, const float* U, int64_t ldu, int64_t re, int64_t m, float* P) {
  constexpr int64_t span = kSpan;
  const int64_t rows = kr + re;
  for (int64_t c = 0; c + span <= m; c += span) {
    float* tile = P + (c / span) * rows * span;
    for (int64_t j = 0; j < kr; ++j)
      for (int64_t x = 0; x < span; ++x) tile[j * span + x] = static_cast<float>(B[j * m + c + x]);
    for (int64_t j = 0; j < re; ++j)
      for (int64_t x = 0; x < span; ++x) tile[(kr + j) * span + x] = U[j * ldu + c + x];
  }
}

// y[r, c0 + c] += Σ_{j<rows} t[r, j] P[j, c] for TB_ tokens and kTileB vectors of columns, in registers: `tile` is
// one packed span of [B; U] (`pack_expansion`), t the tokens' [t | e]; each loaded vector of it feeds TB_ tokens.
template <int TB_, typename scalar_t>
inline void expand_tile(const float* t, int64_t ldt, const float* tile, int64_t rows, scalar_t* y, int64_t sy,
                        int64_t c0) {
  using V = Vec<float>::type;
  constexpr int W = svdserve::kFloatLanes;
  constexpr int64_t span = kSpan;
  V a[TB_][kTileB];
  for (int r = 0; r < TB_; ++r)
    for (int v = 0; v < kTileB; ++v) a[r][v] = load(y + r * sy + c0 + v * W);
  for (int64_t j = 0; j < rows; ++j) {
    V w[kTileB];
    for (int v = 0; v < kTileB; ++v) w[v] = load(tile + j * span + v * W);
    for (int r = 0; r < TB_; ++r) {
      const float tj = t[r * ldt + j];
      for (int v = 0; v < kTileB; ++v) a[r][v] += tj * w[v];
    }
  }
  for (int r = 0; r < TB_; ++r)
    for (int v = 0; v < kTileB; ++v) store(y + r * sy + c0 + v * W, a[r][v]);
}

// y[r, :m] += [t | e][r] · [B; U] for rows r < rows: whole spans from the packed copy P, then the columns past the
// last one from B and U as given. A block of kTokBlock tokens goes through every span before the next: each token's
// row of y is read front to back, a stream the hardware prefetchers follow, and P (≤ (K + R) · m floats) stays in L2.
// (Span by span through all tokens read 256 bytes of each row, rows a page or more apart: gate/up's expansion ~25 %
// slower from memory, bench/prefill_kernels.py.)
template <typename scalar_t>
void expand_tokens(const float* t, int64_t ldt, const float* P, const scalar_t* B, int64_t kr, const float* U,
                   int64_t ldu, int64_t re, int64_t m, int64_t rows, scalar_t* y, int64_t sy) {
  constexpr int64_t span = kSpan;
  const int64_t spans = m / span, tail = spans * span, rows_p = kr + re;
  int64_t r = 0;
  for (; r + kTokBlock <= rows; r += kTokBlock)
    for (int64_t s = 0; s < spans; ++s)
      for (int64_t q = r; q < r + kTokBlock; q += kTokTile)
        expand_tile<kTokTile>(t + q * ldt, ldt, P + s * rows_p * span, rows_p, y + q * sy, sy, s * span);
  for (; r + kTokTile <= rows; r += kTokTile)
    for (int64_t s = 0; s < spans; ++s)
      expand_tile<kTokTile>(t + r * ldt, ldt, P + s * rows_p * span, rows_p, y + r * sy, sy, s * span);
  for (; r < rows; ++r)
    for (int64_t s = 0; s < spans; ++s)
      expand_tile<1>(t + r * ldt, ldt, P + s * rows_p * span, rows_p, y + r * sy, sy, s * span);
  for (int64_t q = 0; q < rows; ++q) {
    const float* tq = t + q * ldt;
    for (int64_t cc = tail; cc < m; ++cc) {
      float a = static_cast<float>(y[q * sy + cc]);
      for (int64_t j = 0; j < kr; ++j) a += tq[j] * static_cast<float>(B[j * m + cc]);
      for (int64_t j = 0; j < re; ++j) a += tq[kr + j] * U[j * ldu + cc];
      y[q * sy + cc] = static_cast<scalar_t>(a);
    }
  }
}

// One (row, member) task of a prefill: its L tokens' delta, kTokenChunk tokens at a time, with `buf` room for
// kTokenChunk · (K + R) floats and `packed` for (K + R) · m.
template <typename scalar_t>
void prefill_task(const Operands<scalar_t>& ops, const typename Operands<scalar_t>::Task& o, float* buf, float* packed,
                  float* At) {
  constexpr int64_t W = svdserve::kFloatLanes;
  const int64_t re = d_length(o.d, ops.R), ldt = o.kr + re, krp = (o.kr + W - 1) / W * W;
  pack_expansion(o.B, o.kr, o.U, ops.M, re, o.m, packed);
  pack_projection(o.A, ops.n, o.kr, krp, At);
  for (int64_t t0 = 0; t0 < ops.L; t0 += kTokenChunk) {
    const int64_t rows = std::min(kTokenChunk, ops.L - t0);
    project_packed(o.x + t0 * ops.sx, ops.sx, At, ops.n, rows, o.kr, krp, buf, ldt);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < re; ++j)
        buf[r * ldt + o.kr + j] = static_cast<float>(o.d[j]) * static_cast<float>(o.h[(t0 + r) * ops.sh + j]);
    expand_tokens(buf, ldt, packed, o.B, o.kr, o.U, ops.M, re, o.m, rows, o.y + t0 * ops.sy, ops.sy);
  }
}

// A decode step's (row, member) task: the row's one token, t = A x and e = d ⊙ h in `t` and `e` (K and R long),
// then y += t · B + e · U, each read once.
template <typename scalar_t>
void decode_task(const Operands<scalar_t>& ops, const typename Operands<scalar_t>::Task& o,
                 typename Operands<scalar_t>::acc_t* t, typename Operands<scalar_t>::acc_t* e,
                 typename Operands<scalar_t>::acc_t* acc) {
  using acc_t = typename Operands<scalar_t>::acc_t;
  project_rows<scalar_t, acc_t>(o.A, ops.n, o.x, o.kr, t);
  const int64_t re = d_length(o.d, ops.R);
  for (int64_t j = 0; j < re; ++j) e[j] = static_cast<acc_t>(o.d[j]) * static_cast<acc_t>(o.h[j]);
  expand_rows<scalar_t, acc_t>(o.B, t, o.kr, o.U, ops.M, e, re, o.m, o.y, acc);
}

// The first lines of each of a decode task's A and Bᵀ rows, requested before the task before it runs: every task
// starts its streams afresh (a slot's terms sit anywhere in the pools), and the hardware prefetchers only pick a
// stream up after its first misses. bench/lowrank_decode.py --against (a real mix's step from memory, Zen 5): 8-10 %
// less time on one thread, 1-4 % on two; 8 lines a row measured the same as 4, 16 slower.
constexpr int64_t kHeadLines = 4;
template <typename scalar_t>
void prefetch_heads(const Operands<scalar_t>& ops, const typename Operands<scalar_t>::Task& o) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t j = 0; j < o.kr; ++j)
    for (int64_t l = 0; l < kHeadLines; ++l)
      __builtin_prefetch(o.A + j * ops.n + l * kLine, 0, 3), __builtin_prefetch(o.B + j * o.m + l * kLine, 0, 3);
}

// Every (row, member) task, as listed by lowrank_delta, split across threads.
template <typename scalar_t>
void run_tasks(const Operands<scalar_t>& ops, const std::vector<int64_t>& tasks) {
  using acc_t = typename Operands<scalar_t>::acc_t;
  svdserve::parallel_for(0, static_cast<int64_t>(tasks.size()) / 2, 1, [&](int64_t b, int64_t en) {
    float *buf = nullptr, *packed = nullptr, *At = nullptr;
    acc_t* acc = svdserve::scratch<acc_t>(3, ops.M);  // a decode task's sums of one member's outputs
    // a prefill's: this thread's [t | e] of a chunk, packed [B; U] and transposed A
    if (ops.L > 1) {
      int64_t widest = 0;
      for (size_t i = 0; i + 1 < ops.off.size(); ++i) widest = std::max(widest, ops.off[i + 1] - ops.off[i]);
      buf = svdserve::scratch<float>(0, kTokenChunk * (ops.K + ops.R));
      packed = svdserve::scratch<float>(1, (ops.K + ops.R) * widest);
      At = svdserve::scratch<float>(2, ops.n * ((ops.K + svdserve::kFloatLanes - 1) / svdserve::kFloatLanes * svdserve::kFloatLanes));
    }
    std::vector<acc_t> t(ops.K), e(std::max<int64_t>(ops.R, 1));
    for (int64_t task = b; task < en; ++task) {
      const auto o = ops.task(tasks[2 * task], tasks[2 * task + 1]);
      if constexpr (std::is_same_v<scalar_t, double>) {  // float64 (tests' references): token by token
        for (int64_t l = 0; l < ops.L; ++l) decode_task(ops, ops.at_token(o, l), t.data(), e.data(), acc);
      } else {
        if (ops.L > 1) {
          prefill_task(ops, o, buf, packed, At);
        } else {
          if (task + 1 < en) prefetch_heads(ops, ops.task(tasks[2 * task + 2], tasks[2 * task + 3]));
          decode_task(ops, o, t.data(), e.data(), acc);
        }
      }
    }
  });
}

void lowrank_delta(at::Tensor y, const at::Tensor& x, const at::Tensor& A, at::TensorList Bt, at::IntArrayRef offsets,
                   const at::Tensor& slots, const at::Tensor& ranks, int64_t L, const std::optional<at::Tensor>& h,
                   const std::optional<at::Tensor>& d, const std::optional<at::Tensor>& U) {
  TORCH_CHECK(y.device().is_cpu(), "lowrank_delta runs on the CPU");
  const int64_t k = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK(y.dim() == 2 && y.stride(1) == 1, "y must be (tokens, M), contiguous within a row");
  TORCH_CHECK(L >= 1 && y.size(0) % L == 0, "tokens_per_row must divide y's rows");
  const int64_t T = y.size(0), P = T / L, M = y.size(1);
  TORCH_CHECK(k >= 1 && offsets[0] == 0 && offsets[k] == M, "offsets must run from 0 to y's width");
  TORCH_CHECK(static_cast<int64_t>(Bt.size()) == k, "one Bt per member (", k, "), got ", Bt.size());
  TORCH_CHECK(A.dim() == 3 && A.size(1) % k == 0 && A.stride(2) == 1 && A.stride(1) == A.size(2),
              "A must be a (slots, k·K, n) pool, contiguous within a slot");
  const int64_t S = A.size(0), K = A.size(1) / k, n = A.size(2);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == T && x.size(1) == n && x.stride(1) == 1,
              "x must be (", T, ", ", n, "), contiguous within a row, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && A.scalar_type() == y.scalar_type(), "x and A must have y's dtype");
  for (int64_t i = 0; i < k; ++i) {
    const at::Tensor& B = Bt[i];
    TORCH_CHECK(B.dim() == 3 && B.size(0) == S && B.size(1) == K && B.size(2) == offsets[i + 1] - offsets[i] &&
                    B.stride(2) == 1 && B.stride(1) == B.size(2),
                "Bt[", i, "] must be a (", S, ", ", K, ", ", offsets[i + 1] - offsets[i], ") pool, contiguous within a slot, got ",
                B.sizes());
    TORCH_CHECK(B.scalar_type() == y.scalar_type(), "Bt must have y's dtype");
  }
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == P && slots.scalar_type() == at::kLong && slots.device().is_cpu(),
              "slots must be a CPU int64 vector with one entry per row (", P, ")");
  TORCH_CHECK(ranks.dim() == 1 && ranks.size(0) == S && ranks.scalar_type() == at::kLong && ranks.device().is_cpu(),
              "ranks must be a CPU int64 vector with one entry per slot (", S, ")");
  TORCH_CHECK(h.has_value() == d.has_value() && d.has_value() == U.has_value(), "h, d and U come together");
  int64_t R = 0;
  if (U.has_value()) {
    R = U->size(0);
    TORCH_CHECK(U->dim() == 2 && U->size(1) == M && U->is_contiguous(), "U must be a contiguous (R, M) matrix");
    TORCH_CHECK(U->scalar_type() == at::toOpMathType(y.scalar_type()), "U must be in the accumulation dtype");
    TORCH_CHECK(h->dim() == 2 && h->size(0) == T && h->size(1) == k * R && h->stride(1) == 1 &&
                    h->scalar_type() == y.scalar_type(),
                "h must be (", T, ", ", k * R, ") in y's dtype, contiguous within a row, got ", h->sizes());
    TORCH_CHECK(d->dim() == 2 && d->size(0) == S && d->size(1) == k * R && d->stride(1) == 1 &&
                    d->scalar_type() == y.scalar_type(),
                "d must be a (", S, ", ", k * R, ") pool in y's dtype, got ", d->sizes());
  }
  const at::Tensor sl = slots.contiguous(), rk = ranks.contiguous();
  std::vector<int64_t> tasks;  // (row, member) pairs of rows that carry a low-rank adapter
  for (int64_t p = 0; p < P; ++p) {
    const int64_t s = sl.const_data_ptr<int64_t>()[p];
    TORCH_CHECK(s >= 0 && s < S, "slot ", s, " of row ", p, " is outside the pool of ", S);
    const int64_t kr = rk.const_data_ptr<int64_t>()[s];
    TORCH_CHECK(kr >= 0 && kr <= K, "rank ", kr, " of slot ", s, " is outside [0, ", K, "]");
    if (s == 0 || kr == 0) continue;
    for (int64_t i = 0; i < k; ++i) tasks.insert(tasks.end(), {p, i});
  }
  if (tasks.empty()) return;
  const std::vector<int64_t> off(offsets.begin(), offsets.end());
  const int64_t* slot = sl.const_data_ptr<int64_t>();
  const int64_t* rank = rk.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "lowrank_delta", [&] {
    run_tasks<scalar_t>(Operands<scalar_t>(y, x, A, Bt, off, slot, rank, L, K, R, h, d, U), tasks);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(svdserve, m) {
  m.def("lowrank_delta(Tensor(a!) y, Tensor x, Tensor A, Tensor[] Bt, int[] offsets, Tensor slots, Tensor ranks, "
        "int tokens_per_row=1, Tensor? h=None, Tensor? d=None, Tensor? U=None) -> ()");
}

TORCH_LIBRARY_IMPL(svdserve, CPU, m) {
  m.impl("lowrank_delta", &lowrank_delta);
}
