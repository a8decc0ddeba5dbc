// Small SIMD helpers shared by the CPU kernels: fixed-width vectors through GCC's vector extensions, as wide as
// the build's target has registers for (64 bytes with AVX-512, else 32: AVX2, or split by GCC where the build
// has no AVX), and bfloat16 ⇄ float conversion a vector at a time.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

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

}  // namespace svdserve
