// A prefill's rotary embedding and KV cache write in one pass over its queries, keys and values.
//
// q (T, Hq, D), k and v (T, Hkv, D): the qkv group's outputs, each row's heads contiguous (rows may be strided: views
// of the group's output); token t = p·L + l is request row p's position l. q and k are rotated in place (HF's
// rotate_half convention: x·cos + rotate_half(x)·sin), and row p's rotated keys and its values are written into the
// cache k_cache, v_cache (rows, Hkv, S, D) at cache row rows[p], positions [0, L).
//
// Why a kernel: in PyTorch the rotation is ~5 ops per tensor (two multiplies, a negation, a concatenation, an add:
// each a pass over the queries or keys) and the cache write two more scatters; in the model that was ~90 ms of a
// ~1.64 s SmolLM2 prefill of 32 × 64 tokens (Intel Xeon, 2 threads, measured by leaving the rotation out). Here it
// is one pass. The arithmetic is PyTorch's, rounding for rounding: each product rounded to the dtype, then their
// sum (no fused multiply-adds: this file is compiled without contraction), so the results are the same bits.
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <initializer_list>

#include "heads.h"
#include "parallel.h"
#include "vec.h"

namespace {

using V = svdserve::Vec<float>::type;
using svdserve::kFloatLanes;

// v rounded to the element type and widened back: a no-op for float32; for bfloat16, what PyTorch's op would have
// stored between its multiply and its add.
template <typename scalar_t>
inline V rounded(V v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return v;
  } else {
    alignas(64) scalar_t tmp[kFloatLanes];
    svdserve::store(tmp, v);
    return svdserve::load(tmp);
  }
}

template <typename scalar_t>
inline float rounded(float x) {
  return static_cast<float>(static_cast<scalar_t>(x));
}

// One head in place: x[i] = x[i]·c[i] − x[i + h]·s[i], x[i + h] = x[i + h]·c[i + h] + x[i]·s[i + h] (h = D / 2).
template <typename scalar_t>
inline void rotate_head(scalar_t* x, const scalar_t* c, const scalar_t* s, int64_t D) {
  const int64_t half = D / 2;
  int64_t i = 0;
  for (; i + kFloatLanes <= half; i += kFloatLanes) {
    const V a = svdserve::load(x + i), b = svdserve::load(x + half + i);
    const V lo = rounded<scalar_t>(a * svdserve::load(c + i)) - rounded<scalar_t>(b * svdserve::load(s + i));
    const V hi = rounded<scalar_t>(b * svdserve::load(c + half + i)) + rounded<scalar_t>(a * svdserve::load(s + half + i));
    svdserve::store(x + i, lo);
    svdserve::store(x + half + i, hi);
  }
  for (; i < half; ++i) {
    const float a = static_cast<float>(x[i]), b = static_cast<float>(x[half + i]);
    const float lo = rounded<scalar_t>(a * static_cast<float>(c[i])) - rounded<scalar_t>(b * static_cast<float>(s[i]));
    const float hi = rounded<scalar_t>(b * static_cast<float>(c[half + i])) +
                     rounded<scalar_t>(a * static_cast<float>(s[half + i]));
    x[i] = static_cast<scalar_t>(lo);
    x[half + i] = static_cast<scalar_t>(hi);
  }
}

template <typename scalar_t>
void run(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
         at::Tensor& kc, at::Tensor& vc, const int64_t* rows, int64_t L) {
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2), S = kc.size(2);
  const int64_t sq = q.stride(0), sk = k.stride(0), sv = v.stride(0);
  scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *kcp = kc.data_ptr<scalar_t>(),
           *vcp = vc.data_ptr<scalar_t>();
  const scalar_t *vp = v.const_data_ptr<scalar_t>(), *cp = cos.const_data_ptr<scalar_t>(),
                 *snp = sin.const_data_ptr<scalar_t>();
  // A few tokens per task: ~10 KB of queries, keys and values each, so a short prompt still spreads over threads.
  svdserve::parallel_for(0, T, 8, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const scalar_t *c = cp + t * D, *s = snp + t * D;
      for (int64_t h = 0; h < Hq; ++h) rotate_head(qp + t * sq + h * D, c, s, D);
      const int64_t row = rows[t / L], pos = t % L;
      for (int64_t h = 0; h < Hkv; ++h) {
        scalar_t* kt = kp + t * sk + h * D;
        rotate_head(kt, c, s, D);
        const int64_t at = ((row * Hkv + h) * S + pos) * D;
        std::memcpy(kcp + at, kt, D * sizeof(scalar_t));
        std::memcpy(vcp + at, vp + t * sv + h * D, D * sizeof(scalar_t));
      }
    }
  });
}

void prefill_rotary(at::Tensor q, at::Tensor k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                    at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& rows, int64_t L) {
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&q, &k, &v, &cos, &sin, &k_cache, &v_cache, &rows})
    TORCH_CHECK(x->device().is_cpu(), "prefill_rotary runs on the CPU");
  svdserve::check_heads(q, "q");
  svdserve::check_heads(k, "k");
  svdserve::check_heads(v, "v");
  const at::ScalarType dt = q.scalar_type();
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&k, &v, &cos, &sin, &k_cache, &v_cache})
    TORCH_CHECK(x->scalar_type() == dt, "q, k, v, cos, sin and the caches must share one dtype");
  const int64_t T = q.size(0), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(D % 2 == 0, "the head size must be even, got ", D);
  TORCH_CHECK(k.size(0) == T && v.size(0) == T && k.size(2) == D && v.sizes() == k.sizes(),
              "k and v must be (T, Hkv, D) with T = ", T, " and D = ", D, ", got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.size(1) == Hkv && k_cache.size(3) == D,
              "the caches must be contiguous (rows, ", Hkv, ", S, ", D, "), got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  svdserve::check_cos_sin(cos, sin, T, D);
  TORCH_CHECK(L >= 1 && T % L == 0 && L <= k_cache.size(2), "L must divide the ", T, " tokens and fit the cache's ",
              k_cache.size(2), " positions, got ", L);
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.size(0) == T / L && rows.is_contiguous(),
              "rows must be a contiguous (", T / L, ",) int64 vector, got ", rows.sizes(), " ", rows.scalar_type());
  const int64_t* r = rows.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < rows.size(0); ++p)
    TORCH_CHECK(r[p] >= 0 && r[p] < k_cache.size(0), "cache row ", r[p], " is outside the cache's ", k_cache.size(0));
  if (T == 0) return;
  svdserve::dispatch_float_bf16(dt, "prefill_rotary", [&](auto zero) {
    run<decltype(zero)>(q, k, v, cos, sin, k_cache, v_cache, r, L);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(svdserve, m) {
  m.def("prefill_rotary(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor cos, Tensor sin, Tensor(c!) k_cache, "
        "Tensor(d!) v_cache, Tensor rows, int L) -> ()");
}

TORCH_LIBRARY_IMPL(svdserve, CPU, m) {
  m.impl("prefill_rotary", &prefill_rotary);
}
