// Small SIMD helpers shared by the CPU kernels: fixed-width vectors through GCC's vector extensions, as wide as
// the build's target has registers for (64 bytes with AVX-512, else 32: AVX2, or split by GCC where the build
// has no AVX), and bfloat16 ⇄ float conversion a vector at a time.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <cstdint>

// Fully unrolls a loop over a register block's rows or vectors, so its accumulator arrays live in registers: GCC
// otherwise kept them on the stack, storing and reloading every accumulator around each tile (core_delta's sweep
// ran ~20 % slower in cache: 153 against 194 GFLOP/s for gate/up at 2048 tokens). Measure before using it
// elsewhere: skinny_linear's tile ran ~2× slower with it.
#define UNROLL _Pragma("GCC unroll 16")

namespace svdserve {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kVecRegs = 32;  // vector registers the compiler can keep accumulators in
#else
constexpr int kVecBytes = 32;
constexpr int kVecRegs = 16;
#endif
constexpr int kFloatLanes = kVecBytes / 4;

template <typename T> struct Vec;
template <> struct Vec<float> { typedef float type __attribute__((vector_size(kVecBytes))); };
template <> struct Vec<double> { typedef double type __attribute__((vector_size(kVecBytes))); };

template <typename T>
inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, typename Vec<T>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// Sum of a float vector's lanes, halving the width each step (pairs added in a fixed order).
inline float hsum(Vec<float>::type v) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 s8;
#if defined(__AVX512F__)
  v8 lo8, hi8;
  __builtin_memcpy(&lo8, &v, sizeof(lo8));
  __builtin_memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof(lo8), sizeof(hi8));
  s8 = lo8 + hi8;
#else
  s8 = v;
#endif
  v4 lo, hi;
  __builtin_memcpy(&lo, &s8, sizeof(lo));
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&s8) + sizeof(lo), sizeof(hi));
  const v4 s = lo + hi;
  return (s[0] + s[2]) + (s[1] + s[3]);
}

// e^x for a float vector: x = n·ln2 + r with |r| ≤ ln2/2, e^r by its degree-6 Taylor polynomial (relative
// error < 2e-7 on that range), 2^n put into the exponent bits. Inputs are clamped to [-87, 88], where e^x stays a
// normal float: silu only needs it there (below, x·σ(x) is 0 to float precision; above, σ(x) is 1).
inline Vec<float>::type exp_approx(Vec<float>::type x) {
  typedef Vec<float>::type V;
  typedef int32_t i32v __attribute__((vector_size(kVecBytes)));
  const V lo = V{} - 87.0f, hi = V{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V shifter = V{} + 12582912.0f;  // 1.5·2^23: adding and subtracting it rounds to the nearest integer
  const V n = (x * 1.44269504088896341f + shifter) - shifter;
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts, so r keeps its low bits
  V p = V{} + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const i32v bits = (__builtin_convertvector(n, i32v) + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// silu(x) = x / (1 + e^-x), a vector at a time.
inline Vec<float>::type silu(Vec<float>::type x) {
  return x / (1.0f + exp_approx(-x));
}

// bfloat16 rows in float registers: widening is a shift; narrowing rounds to nearest even (as c10::BFloat16
// does), NaN kept NaN.
typedef uint16_t u16v __attribute__((vector_size(kVecBytes / 2)));
typedef uint32_t u32v __attribute__((vector_size(kVecBytes)));

inline Vec<float>::type load(const c10::BFloat16* p) {
  u16v raw;
  __builtin_memcpy(&raw, p, sizeof(raw));
  const u32v bits = __builtin_convertvector(raw, u32v) << 16;
  Vec<float>::type v;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
}

inline void store(c10::BFloat16* p, Vec<float>::type v) {
  u32v bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  const u32v rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const u32v nan = (u32v)(v != v);  // all ones where NaN
  const u16v out = __builtin_convertvector((rounded & ~nan) | (0x7FC0u & nan), u16v);
  __builtin_memcpy(p, &out, sizeof(out));
}

// Calls f with a value of the element type for float32 or bfloat16, the dtypes the float-vector kernels are built
// for (`using scalar_t = decltype(value)` inside f); any other dtype is refused with the op's name.
template <typename F>
void dispatch_float_bf16(c10::ScalarType dt, const char* op, const F& f) {
  if (dt == c10::kFloat) {
    f(float{});
  } else if (dt == c10::kBFloat16) {
    f(c10::BFloat16{});
  } else {
    TORCH_CHECK(false, op, " takes float32 or bfloat16, got ", dt);
  }
}

}  // namespace svdserve
