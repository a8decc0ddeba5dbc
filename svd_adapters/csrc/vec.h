// Small SIMD helpers shared by the CPU kernels: 32-byte vectors through GCC's vector extensions (AVX2
// registers; GCC splits them where the build has no AVX), and bfloat16 ⇄ float conversion 8 lanes at a time.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace svdserve {

template <typename T> struct Vec;
template <> struct Vec<float> { typedef float type __attribute__((vector_size(32))); };
template <> struct Vec<double> { typedef double type __attribute__((vector_size(32))); };

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

// bfloat16 rows in float registers: widening is a shift; narrowing rounds to nearest even (as c10::BFloat16
// does), NaN kept NaN.
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

inline Vec<float>::type load(const c10::BFloat16* p) {
  u16x8 raw;
  __builtin_memcpy(&raw, p, sizeof(raw));
  const u32x8 bits = __builtin_convertvector(raw, u32x8) << 16;
  Vec<float>::type v;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
}

inline void store(c10::BFloat16* p, Vec<float>::type v) {
  u32x8 bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  const u32x8 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const u32x8 nan = (u32x8)(v != v);  // all ones where NaN
  const u16x8 out = __builtin_convertvector((rounded & ~nan) | (0x7FC0u & nan), u16x8);
  __builtin_memcpy(p, &out, sizeof(out));
}

}  // namespace svdserve
