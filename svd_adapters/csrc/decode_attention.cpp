// A decode step's attention on the CPU: one new token per running row, attending to that row's cached keys; and a
// speculative step's (`verify_attention`): a few new tokens per row (its next token and a draft), each attending to
// the row's keys up to its own position.
//
// q (T, Hq, D): row t's query heads; k, v (rows, Hkv, S, D): the KV cache (row t at index t, positions along S);
// pos (T,) int64: row t's position, so it sees keys [0, pos[t]]. Query head h reads KV head h / (Hq / Hkv)
// (grouped-query attention without expanding the cache). Float32 or bfloat16 in, accumulated in float32.
//
// Why a kernel: PyTorch's CPU SDPA, given the step as (T, Hkv, group, D) queries with a mask, took ~0.42 ms a layer
// for SmolLM2 at 32 rows in the model (12 ms of a ~95 ms step, Intel Xeon, 2 threads) for ~3 MB of keys and values.
// Here each (row, KV head) task reads its keys once for all the query heads that share them, only up to the row's
// own position, its values once for the same heads, and fetches the next task's while it computes: ~0.25 ms a
// layer in the model, 0.19 against SDPA's 0.46 in isolation with the cache out of every CPU cache.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>

#include "heads.h"
#include "parallel.h"
#include "vec.h"

namespace {

using svdserve::kFloatLanes;
using V = svdserve::Vec<float>::type;
constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxVecs = 128;  // a KV head's query heads × vectors per head, held in float vectors

// The next task's keys and values, fetched a few cache lines per key of the current task's first pass, so they
// arrive while it computes (the cache holds every layer's rows: by the next step they have left every cache).
struct Prefetch {
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t bytes = 0, done = 0;
  void upto(int64_t target) {
    for (; done < std::min(target, bytes); done += 64) {
      __builtin_prefetch(k + done);
      __builtin_prefetch(v + done);
    }
  }
};

// Row t, KV head kh: scores (group × n, scaled), softmax, and the weighted values into the group's outputs.
// NV: vectors per head, fixed for the common head sizes so the loops over them unroll into registers (0: any).
template <typename scalar_t, int NV>
void attend(const float* q, const scalar_t* K, const scalar_t* Vv, scalar_t* out, int64_t group, int64_t D,
            int64_t n, float scale, float* s, Prefetch next) {
  const int64_t nv = NV ? NV : D / kFloatLanes;
  V qv[kMaxVecs];  // the group's queries, scaled
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < nv; ++i) qv[g * nv + i] = svdserve::load(q + g * D + i * kFloatLanes) * scale;
  for (int64_t j = 0; j < n; ++j) {  // each key read once for all the query heads that share it
    const scalar_t* kj = K + j * D;
    V kx[NV ? NV : kMaxHeadDim / kFloatLanes];
    for (int64_t i = 0; i < nv; ++i) kx[i] = svdserve::load(kj + i * kFloatLanes);
    for (int64_t g = 0; g < group; ++g) {
      const V* qg = qv + g * nv;
      V acc = qg[0] * kx[0];
      for (int64_t i = 1; i < nv; ++i) acc += qg[i] * kx[i];
      s[g * n + j] = svdserve::hsum(acc);
    }
    next.upto((j + 1) * next.bytes / n);
  }
  next.upto(next.bytes);
  float inv[kMaxVecs];
  for (int64_t g = 0; g < group; ++g) {
    float* sg = s + g * n;
    float m = sg[0];
    for (int64_t j = 1; j < n; ++j) m = std::max(m, sg[j]);
    // exp a vector at a time (exp_approx: relative error < 2e-7), the tail scalar.
    V vsum = V{};
    int64_t j = 0;
    for (; j + kFloatLanes <= n; j += kFloatLanes) {
      const V e = svdserve::exp_approx(svdserve::load(sg + j) - m);
      svdserve::store(sg + j, e);
      vsum += e;
    }
    float sum = svdserve::hsum(vsum);
    for (; j < n; ++j) {
      sg[j] = std::exp(sg[j] - m);
      sum += sg[j];
    }
    inv[g] = 1.0f / sum;
  }
  V acc[kMaxVecs];  // the group's outputs
  for (int64_t i = 0; i < group * nv; ++i) acc[i] = V{};
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* vj = Vv + j * D;
    for (int64_t i = 0; i < nv; ++i) {
      const V x = svdserve::load(vj + i * kFloatLanes);
      for (int64_t g = 0; g < group; ++g) acc[g * nv + i] += s[g * n + j] * x;
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < nv; ++i) svdserve::store(out + g * D + i * kFloatLanes, acc[g * nv + i] * inv[g]);
}

// x rotated by its position's cos and sin (HF's rotate_half convention: the second half of x, negated, pairs with
// the first), as floats.
template <typename scalar_t>
void rotate(const scalar_t* x, const scalar_t* cos, const scalar_t* sin, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i)
    out[i] = static_cast<float>(x[i]) * static_cast<float>(cos[i]) - static_cast<float>(x[i + half]) * static_cast<float>(sin[i]);
  for (int64_t i = half; i < D; ++i)
    out[i] = static_cast<float>(x[i]) * static_cast<float>(cos[i]) + static_cast<float>(x[i - half]) * static_cast<float>(sin[i]);
}

// Every (row, KV head) pair is one task, split across threads. Row r's new tokens are t = r·L .. r·L + len[r] - 1
// (L = 1 for a decode step; pads after them are left alone), at positions pos[r], pos[r] + 1, ...: the task rotates
// their keys and writes them and their values into the cache first, then rotates each token's query heads and
// attends to the keys up to that token's own position (only this task writes or reads this row and KV head).
template <typename scalar_t>
void run(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k, at::Tensor& v,
         const int64_t* pos, const int64_t* len, int64_t L, const at::Tensor& cos, const at::Tensor& sin,
         at::Tensor& out, int64_t group, float scale) {
  const int64_t R = q.size(0) / L, Hq = q.size(1), D = q.size(2), Hkv = k.size(1), S = k.size(2);
  const int64_t sq = q.stride(0), skn = k_new.stride(0), svn = v_new.stride(0);
  const scalar_t *qp = q.const_data_ptr<scalar_t>(), *knp = k_new.const_data_ptr<scalar_t>(),
                 *vnp = v_new.const_data_ptr<scalar_t>(), *cp = cos.const_data_ptr<scalar_t>(),
                 *snp = sin.const_data_ptr<scalar_t>();
  scalar_t *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>(), *op = out.data_ptr<scalar_t>();
  svdserve::parallel_for(0, R * Hkv, 1, [&](int64_t b, int64_t e) {
    float* s = svdserve::scratch<float>(0, group * S);
    float* qr = svdserve::scratch<float>(1, (group + 1) * D);  // the rotated queries, then the rotated key
    for (int64_t task = b; task < e; ++task) {
      const int64_t r = task / Hkv, h = task % Hkv, kv = (r * Hkv + h) * S * D, n_new = len ? len[r] : 1;
      float* kr = qr + group * D;
      for (int64_t j = 0; j < n_new; ++j) {
        const int64_t t = r * L + j;
        rotate(knp + t * skn + h * D, cp + t * D, snp + t * D, D, kr);
        scalar_t *kdst = kp + kv + (pos[r] + j) * D, *vdst = vp + kv + (pos[r] + j) * D;
        const scalar_t* vsrc = vnp + t * svn + h * D;
        for (int64_t i = 0; i < D; ++i) {
          kdst[i] = static_cast<scalar_t>(kr[i]);
          vdst[i] = vsrc[i];
        }
      }
      for (int64_t j = 0; j < n_new; ++j) {
        const int64_t t = r * L + j;
        for (int64_t g = 0; g < group; ++g)
          rotate(qp + t * sq + (h * group + g) * D, cp + t * D, snp + t * D, D, qr + g * D);
        Prefetch next;
        if (j + 1 == n_new && task + 1 < e) {  // the next task's keys and values, while this one's last query runs
          const int64_t r1 = (task + 1) / Hkv, kv1 = (r1 * Hkv + (task + 1) % Hkv) * S * D;
          next = {reinterpret_cast<const char*>(kp + kv1), reinterpret_cast<const char*>(vp + kv1),
                  static_cast<int64_t>((pos[r1] + 1) * D * sizeof(scalar_t))};
        }
        scalar_t* o = op + (t * Hq + h * group) * D;
        const int64_t n = pos[r] + j + 1;
        if (D == 4 * kFloatLanes) {
          attend<scalar_t, 4>(qr, kp + kv, vp + kv, o, group, D, n, scale, s, next);
        } else if (D == 8 * kFloatLanes) {
          attend<scalar_t, 8>(qr, kp + kv, vp + kv, o, group, D, n, scale, s, next);
        } else {
          attend<scalar_t, 0>(qr, kp + kv, vp + kv, o, group, D, n, scale, s, next);
        }
      }
    }
  });
}

// The checks both entry points share; returns the query heads per KV head.
int64_t check_inputs(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin, int64_t rows) {
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&q, &k_new, &v_new, &k, &v, &cos, &sin})
    TORCH_CHECK(x->device().is_cpu(), "decode_attention runs on the CPU");
  svdserve::check_heads(q, "q");
  svdserve::check_heads(k_new, "k_new");
  svdserve::check_heads(v_new, "v_new");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.is_contiguous() && v.is_contiguous(),
              "the caches k and v must be contiguous (rows, Hkv, S, D), got ", k.sizes(), " and ", v.sizes());
  const at::ScalarType dt = q.scalar_type();
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&k_new, &v_new, &k, &v, &cos, &sin})
    TORCH_CHECK(x->scalar_type() == dt, "q, k_new, v_new, the caches, cos and sin must share one dtype");
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(k.size(3) == D && k.size(0) >= rows, "the cache must hold ", rows, " rows of head size ", D, ", got ",
              k.sizes());
  TORCH_CHECK(k_new.size(0) == T && v_new.size(0) == T && k_new.size(1) == Hkv && v_new.size(1) == Hkv &&
                  k_new.size(2) == D && v_new.size(2) == D,
              "k_new and v_new must be (T, Hkv, D) = (", T, ", ", Hkv, ", ", D, "), got ", k_new.sizes(), " and ",
              v_new.sizes());
  svdserve::check_cos_sin(cos, sin, T, D);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "query heads (", Hq, ") must be a multiple of KV heads (", Hkv, ")");
  const int64_t group = Hq / Hkv;
  TORCH_CHECK(D % kFloatLanes == 0 && D <= kMaxHeadDim && group * (D / kFloatLanes) <= kMaxVecs,
              "decode_attention takes head sizes that are multiples of ", kFloatLanes, " up to ", kMaxHeadDim,
              " and at most ", kMaxVecs * kFloatLanes, " query numbers per KV head, got D=", D, ", group=", group);
  return group;
}

void check_vector(const at::Tensor& x, const char* name, int64_t n) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kLong && x.dim() == 1 && x.size(0) == n &&
                  x.is_contiguous(),
              name, " must be a contiguous (", n, ",) int64 vector on the CPU, got ", x.sizes(), " ", x.scalar_type());
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor k,
                            at::Tensor v, const at::Tensor& pos, const at::Tensor& cos, const at::Tensor& sin,
                            double scale) {
  const int64_t T = q.size(0), S = k.size(2);
  const int64_t group = check_inputs(q, k_new, v_new, k, v, cos, sin, T);
  check_vector(pos, "pos", T);
  const int64_t* p = pos.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(p[t] >= 0 && p[t] < S, "row ", t, "'s position ", p[t], " is outside the cache's ", S);
  at::Tensor out = at::empty({T, q.size(1), q.size(2)}, q.options());
  if (T == 0) return out;
  svdserve::dispatch_float_bf16(q.scalar_type(), "decode_attention", [&](auto zero) {
    run<decltype(zero)>(q, k_new, v_new, k, v, p, nullptr, 1, cos, sin, out, group, static_cast<float>(scale));
  });
  return out;
}

// A speculative step's attention: R rows of L new tokens each (row r's first len[r] real, at positions starts[r]
// onwards; the rest padding, whose outputs are zeros), row r at cache row r.
at::Tensor verify_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor k,
                            at::Tensor v, const at::Tensor& starts, const at::Tensor& lengths, const at::Tensor& cos,
                            const at::Tensor& sin, double scale) {
  const int64_t R = starts.size(0), T = q.size(0), S = k.size(2);
  TORCH_CHECK(R > 0 && T % R == 0, "q must hold L tokens for each of the ", R, " rows, got ", T);
  const int64_t L = T / R, group = check_inputs(q, k_new, v_new, k, v, cos, sin, R);
  check_vector(starts, "starts", R);
  check_vector(lengths, "lengths", R);
  const int64_t *p = starts.const_data_ptr<int64_t>(), *n = lengths.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(p[r] >= 0 && n[r] >= 1 && n[r] <= L && p[r] + n[r] <= S, "row ", r, "'s ", n[r],
                " tokens from position ", p[r], " do not fit its ", L, " tokens and the cache's ", S, " positions");
  at::Tensor out = at::zeros({T, q.size(1), q.size(2)}, q.options());
  svdserve::dispatch_float_bf16(q.scalar_type(), "verify_attention", [&](auto zero) {
    run<decltype(zero)>(q, k_new, v_new, k, v, p, n, L, cos, sin, out, group, static_cast<float>(scale));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(svdserve, m) {
  m.def("decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k, Tensor(b!) v, Tensor pos, Tensor cos, "
        "Tensor sin, float scale) -> Tensor");
  m.def("verify_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k, Tensor(b!) v, Tensor starts, "
        "Tensor lengths, Tensor cos, Tensor sin, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(svdserve, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("verify_attention", &verify_attention);
}
