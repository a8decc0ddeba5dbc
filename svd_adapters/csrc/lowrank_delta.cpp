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
// vector loops read A and Bᵀ once. Prefill: bound by arithmetic, a chunk of the row's tokens at a time: their
// t = A_i x by the register-blocked GEMM tile (csrc/skinny_gemm.h) into a float32 buffer with e = d ⊙ h beside
// it, then [t | e] · [B_iᵀ; U] added into y by tiles of tokens × columns held in registers. (This was two BLAS
// calls per task, a temporary and an add, ~15 ATen ops each: twice the time on SmolLM2's shapes in float32, 2.7×
// in bfloat16, a row's products being too small for BLAS to reach speed; float64 still goes that way.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "skinny_gemm.h"
#include "vec.h"

namespace {

using svdserve::Vec;
using svdserve::load;
using svdserve::store;

constexpr int kRowsA = 4;  // rows of A per pass over x: each x load feeds 4 dot products
constexpr int kTileB = 4;  // vectors of output columns per tile of Bᵀ (4 accumulators, kr loads each)
constexpr int64_t kTokenChunk = 64;  // prefill: tokens per pass (their x, [t | e] and y rows stay in L2)
// Prefill: tokens per tile of the expansion, kTokTile × kTileB accumulators plus kTileB loaded vectors in registers
constexpr int kTokTile = svdserve::kVecRegs == 32 ? 4 : 2;

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

// y[c] += Σ_{j<kr} t[j] Bt[j, c] + Σ_{j<re} e[j] U[j, c] for c in [0, m): Bt rows of m contiguous numbers, U
// rows (the accumulation dtype) ldu apart, or re = 0; y read, and rounded to its dtype, once.
template <typename scalar_t, typename acc_t>
void expand_rows(const scalar_t* Bt, const acc_t* t, int64_t kr, const acc_t* U, int64_t ldu, const acc_t* e,
                 int64_t re, int64_t m, scalar_t* y) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = sizeof(V) / sizeof(acc_t);
  int64_t c = 0;
  for (; c + kTileB * W <= m; c += kTileB * W) {
    V a[kTileB];
    for (int v = 0; v < kTileB; ++v) a[v] = load(y + c + v * W);
    for (int64_t j = 0; j < kr; ++j) {
      const acc_t tj = t[j];
      for (int v = 0; v < kTileB; ++v) a[v] += tj * load(Bt + j * m + c + v * W);
    }
    for (int64_t j = 0; j < re; ++j) {
      const acc_t ej = e[j];
      for (int v = 0; v < kTileB; ++v) a[v] += ej * load(U + j * ldu + c + v * W);
    }
    for (int v = 0; v < kTileB; ++v) store(y + c + v * W, a[v]);
  }
  for (; c < m; ++c) {
    acc_t a = static_cast<acc_t>(y[c]);
    for (int64_t j = 0; j < kr; ++j) a += t[j] * static_cast<acc_t>(Bt[j * m + c]);
    for (int64_t j = 0; j < re; ++j) a += e[j] * U[j * ldu + c];
    y[c] = static_cast<scalar_t>(a);
  }
}

// t[r, c] = x[r, :] · A[c, :] for rows r < rows, columns c in [c0, c0 + CB_), in float32 rows ldt apart.
template <int CB_, typename scalar_t>
void project_columns(const scalar_t* x, int64_t sx, const scalar_t* A, int64_t n, int64_t rows, float* t,
                     int64_t ldt, int64_t c0) {
  constexpr int RB = svdserve::kGemmRB;
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) svdserve::gemm_tile<RB, CB_, scalar_t, float>(x, sx, A, n, t, ldt, r, c0);
  for (; r < rows; ++r) svdserve::gemm_tile<1, CB_, scalar_t, float>(x, sx, A, n, t, ldt, r, c0);
}

// t = x · Aᵀ for a chunk of tokens: A's first kr rows (n numbers each), full-width tiles, then narrower ones for
// the rest (a rank of 16 is 6 + 6 + 4 columns, not 6 + 6 + 1 + 1 + 1 + 1).
template <typename scalar_t>
void project_tokens(const scalar_t* x, int64_t sx, const scalar_t* A, int64_t n, int64_t rows, int64_t kr, float* t,
                    int64_t ldt) {
  constexpr int CB = svdserve::kGemmCB;
  int64_t c = 0;
  for (; c + CB <= kr; c += CB) project_columns<CB>(x, sx, A, n, rows, t, ldt, c);
  if constexpr (CB > 4) {
    if (c + 4 <= kr) project_columns<4>(x, sx, A, n, rows, t, ldt, c), c += 4;
  }
  if (c + 2 <= kr) project_columns<2>(x, sx, A, n, rows, t, ldt, c), c += 2;
  if (c < kr) project_columns<1>(x, sx, A, n, rows, t, ldt, c);
}

// y[r, c0 + c] += Σ_{j<kr} t[r, j] B[j, c0 + c] + Σ_{j<re} t[r, kr + j] U[j, c0 + c] for TB_ rows and kTileB
// vectors of columns, in registers: each loaded vector of B or U feeds TB_ rows.
template <int TB_, typename scalar_t>
inline void expand_tile(const float* t, int64_t ldt, const scalar_t* B, int64_t ldb, int64_t kr, const float* U,
                        int64_t ldu, int64_t re, scalar_t* y, int64_t sy, int64_t c0) {
  using V = Vec<float>::type;
  constexpr int W = svdserve::kFloatLanes;
  V a[TB_][kTileB];
  for (int r = 0; r < TB_; ++r)
    for (int v = 0; v < kTileB; ++v) a[r][v] = load(y + r * sy + c0 + v * W);
  for (int64_t j = 0; j < kr; ++j) {
    V w[kTileB];
    for (int v = 0; v < kTileB; ++v) w[v] = load(B + j * ldb + c0 + v * W);
    for (int r = 0; r < TB_; ++r) {
      const float tj = t[r * ldt + j];
      for (int v = 0; v < kTileB; ++v) a[r][v] += tj * w[v];
    }
  }
  for (int64_t j = 0; j < re; ++j) {
    V w[kTileB];
    for (int v = 0; v < kTileB; ++v) w[v] = load(U + j * ldu + c0 + v * W);
    for (int r = 0; r < TB_; ++r) {
      const float ej = t[r * ldt + kr + j];
      for (int v = 0; v < kTileB; ++v) a[r][v] += ej * w[v];
    }
  }
  for (int r = 0; r < TB_; ++r)
    for (int v = 0; v < kTileB; ++v) store(y + r * sy + c0 + v * W, a[r][v]);
}

// y[r, :m] += [t | e][r] · [B; U] for rows r < rows: whole tiles, then the columns past the last one.
template <typename scalar_t>
void expand_tokens(const float* t, int64_t ldt, const scalar_t* B, int64_t kr, const float* U, int64_t ldu,
                   int64_t re, int64_t m, int64_t rows, scalar_t* y, int64_t sy) {
  constexpr int64_t span = kTileB * svdserve::kFloatLanes;
  int64_t c = 0;
  for (; c + span <= m; c += span) {
    int64_t r = 0;
    for (; r + kTokTile <= rows; r += kTokTile)
      expand_tile<kTokTile>(t + r * ldt, ldt, B, m, kr, U, ldu, re, y + r * sy, sy, c);
    for (; r < rows; ++r) expand_tile<1>(t + r * ldt, ldt, B, m, kr, U, ldu, re, y + r * sy, sy, c);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* tr = t + r * ldt;
    for (int64_t cc = c; cc < m; ++cc) {
      float a = static_cast<float>(y[r * sy + cc]);
      for (int64_t j = 0; j < kr; ++j) a += tr[j] * static_cast<float>(B[j * m + cc]);
      for (int64_t j = 0; j < re; ++j) a += tr[kr + j] * U[j * ldu + cc];
      y[r * sy + cc] = static_cast<scalar_t>(a);
    }
  }
}

// One (row, member) task of a prefill: its L tokens' delta, kTokenChunk tokens at a time, with `buf` room for
// kTokenChunk · (kr + R) floats.
template <typename scalar_t>
void prefill_task(const scalar_t* x, int64_t sx, const scalar_t* A, int64_t n, const scalar_t* B, int64_t kr,
                  const scalar_t* h, int64_t sh, const scalar_t* d, const float* U, int64_t ldu, int64_t R, int64_t m,
                  int64_t L, scalar_t* y, int64_t sy, float* buf) {
  int64_t re = 0;  // d's nonzero length (0 without one; SORSA of rank r < R: d = −σ_r, then zeros)
  for (int64_t j = 0; d != nullptr && j < R; ++j)
    if (d[j] != scalar_t(0)) re = j + 1;
  const int64_t ldt = kr + re;
  for (int64_t t0 = 0; t0 < L; t0 += kTokenChunk) {
    const int64_t rows = std::min(kTokenChunk, L - t0);
    project_tokens(x + t0 * sx, sx, A, n, rows, kr, buf, ldt);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < re; ++j)
        buf[r * ldt + kr + j] = static_cast<float>(d[j]) * static_cast<float>(h[(t0 + r) * sh + j]);
    expand_tokens(buf, ldt, B, kr, U, ldu, re, m, rows, y + t0 * sy, sy);
  }
}

// A prefill's tasks ((row, member) pairs, as listed by lowrank_delta), float32 or bfloat16.
template <typename scalar_t>
void prefill(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, at::TensorList Bt, const std::vector<int64_t>& off,
             const int64_t* slot, const int64_t* rank, const std::vector<int64_t>& tasks, int64_t L, int64_t K,
             int64_t R, const std::optional<at::Tensor>& h, const std::optional<at::Tensor>& d,
             const std::optional<at::Tensor>& U) {
  const int64_t n = A.size(2), M = y.size(1), n_tasks = static_cast<int64_t>(tasks.size()) / 2;
  scalar_t* yp = y.data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* Ap = A.const_data_ptr<scalar_t>();
  const scalar_t* hp = h.has_value() ? h->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* dp = d.has_value() ? d->const_data_ptr<scalar_t>() : nullptr;
  const float* Up = U.has_value() ? U->const_data_ptr<float>() : nullptr;
  const int64_t sx = x.stride(0), sy = y.stride(0), sh = hp ? h->stride(0) : 0;
  svdserve::parallel_for(0, n_tasks, 1, [&](int64_t b, int64_t e) {
    std::vector<float> buf(kTokenChunk * (K + R));
    for (int64_t task = b; task < e; ++task) {
      const int64_t p = tasks[2 * task], i = tasks[2 * task + 1], s = slot[p], m = off[i + 1] - off[i];
      prefill_task<scalar_t>(xp + p * L * sx, sx, Ap + s * A.stride(0) + i * K * n, n,
                             Bt[i].const_data_ptr<scalar_t>() + s * Bt[i].stride(0), rank[s],
                             hp ? hp + p * L * sh + i * R : nullptr, sh, dp ? dp + s * d->stride(0) + i * R : nullptr,
                             Up ? Up + off[i] : nullptr, M, R, m, L, yp + p * L * sy + off[i], sy, buf.data());
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
  const int64_t n_tasks = static_cast<int64_t>(tasks.size()) / 2;
  if (n_tasks == 0) return;
  const std::vector<int64_t> off(offsets.begin(), offsets.end());
  if (L > 1 && y.scalar_type() == at::kDouble) {  // a float64 prefill (tests' references): ATen's GEMMs per task
    const at::ThreadLocalState caller;  // worker threads run ATen ops in the caller's modes (inference mode)
    const at::ScalarType acc = at::toOpMathType(y.scalar_type());
    svdserve::parallel_for(0, n_tasks, 1, [&](int64_t b, int64_t e) {
      const at::ThreadLocalStateGuard modes(caller);
      for (int64_t task = b; task < e; ++task) {
        const int64_t p = tasks[2 * task], i = tasks[2 * task + 1];
        const int64_t s = sl.const_data_ptr<int64_t>()[p], kr = rk.const_data_ptr<int64_t>()[s];
        const int64_t m = off[i + 1] - off[i];
        const at::Tensor t = at::mm(x.narrow(0, p * L, L), A[s].narrow(0, i * K, kr).t());  // (L, kr)
        // The delta in the accumulation dtype, added to y (and rounded to its dtype) once.
        at::Tensor delta = at::mm(t.to(acc), Bt[i][s].narrow(0, 0, kr).to(acc));
        if (U.has_value()) {  // e = d ⊙ h, then e · U_rᵀ
          const at::Tensor e = h->narrow(0, p * L, L).narrow(1, i * R, R).to(acc) * (*d)[s].narrow(0, i * R, R).to(acc);
          delta.addmm_(e, U->narrow(1, off[i], m));
        }
        y.narrow(0, p * L, L).narrow(1, off[i], m).add_(delta);
      }
    });
    return;
  }
  if (L > 1) {  // float32 and bfloat16 (float64 above)
    const int64_t* slot = sl.const_data_ptr<int64_t>();
    const int64_t* rank = rk.const_data_ptr<int64_t>();
    if (y.scalar_type() == at::kFloat) {
      prefill<float>(y, x, A, Bt, off, slot, rank, tasks, L, K, R, h, d, U);
    } else {
      TORCH_CHECK(y.scalar_type() == at::kBFloat16, "lowrank_delta takes float32, bfloat16 or float64, got ",
                  y.scalar_type());
      prefill<c10::BFloat16>(y, x, A, Bt, off, slot, rank, tasks, L, K, R, h, d, U);
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "lowrank_delta", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* Ap = A.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.has_value() ? h->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* dp = d.has_value() ? d->const_data_ptr<scalar_t>() : nullptr;
    const acc_t* Up = U.has_value() ? U->const_data_ptr<acc_t>() : nullptr;
    std::vector<const scalar_t*> Bp(k);
    std::vector<int64_t> Bs(k);
    for (int64_t i = 0; i < k; ++i) Bp[i] = Bt[i].const_data_ptr<scalar_t>(), Bs[i] = Bt[i].stride(0);
    const int64_t* slot = sl.const_data_ptr<int64_t>();
    const int64_t* rank = rk.const_data_ptr<int64_t>();
    svdserve::parallel_for(0, n_tasks, 1, [&](int64_t b, int64_t e) {
      std::vector<acc_t> t(K), ed(std::max<int64_t>(R, 1));
      for (int64_t task = b; task < e; ++task) {
        const int64_t p = tasks[2 * task], i = tasks[2 * task + 1], s = slot[p], kr = rank[s], m = off[i + 1] - off[i];
        project_rows<scalar_t, acc_t>(Ap + s * A.stride(0) + i * K * n, n, xp + p * x.stride(0), kr, t.data());
        int64_t rd = 0;  // d's nonzero length (0 without one; SORSA of rank r < R: d = −σ_r, then zeros)
        if (Up != nullptr) {
          const scalar_t* hr = hp + p * h->stride(0) + i * R;
          const scalar_t* dr = dp + s * d->stride(0) + i * R;
          for (int64_t j = 0; j < R; ++j) {
            ed[j] = static_cast<acc_t>(dr[j]) * static_cast<acc_t>(hr[j]);
            if (dr[j] != scalar_t(0)) rd = j + 1;
          }
        }
        expand_rows<scalar_t, acc_t>(Bp[i] + s * Bs[i], t.data(), kr, Up ? Up + off[i] : nullptr, M, ed.data(), rd, m,
                                     yp + p * y.stride(0) + off[i]);
      }
    });
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
