// Input checks of the kernels that take a layer's query, key and value heads (decode_attention.cpp,
// prefill_rotary.cpp).
#pragma once

#include <ATen/ATen.h>

namespace svdserve {

// Rows' heads as (T, H, D) views with each head's D numbers contiguous and heads back to back (the rows may be
// strided: q, k and v are column slices of one GEMM output).
inline void check_heads(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), name,
              " must be (T, heads, D) with each row's heads contiguous, got sizes ", x.sizes(), " strides ", x.strides());
}

// The rotary terms of T tokens, D numbers each, contiguous.
inline void check_cos_sin(const at::Tensor& cos, const at::Tensor& sin, int64_t T, int64_t D) {
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * D && sin.numel() == T * D,
              "cos and sin must be contiguous, T·D = ", T * D, " numbers each");
}

}  // namespace svdserve
