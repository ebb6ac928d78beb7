// The element loops shared by the scalar paths and the SIMD paths' tails (Adam and AGD: the
// same buffers, a different element function).
//
// Everything here (and in float16_convert.h) has internal linkage: each *_core_*.cpp gets
// its own copy, so the linker can never pick a copy built for AVX-512 to serve the scalar
// path on a CPU without it. The SIMD files include this before switching their target on.
#pragma once

#include "../common/agd_math.h"
#include "adam_core.h"
#include "float16_convert.h"

namespace heteromem::cpu {
namespace {  // internal linkage: see the note at the top

inline float load_grad_element(const void* grad, ElemType type, int64_t i) {
  switch (type) {
    case ElemType::kBFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(grad)[i]);
    case ElemType::kFloat16:
      return fp16_to_float(static_cast<const uint16_t*>(grad)[i]);
    default:
      return static_cast<const float*>(grad)[i];
  }
}

inline void store_lowp_element(void* lowp, ElemType type, int64_t i, float value) {
  if (type == ElemType::kBFloat16) {
    static_cast<uint16_t*>(lowp)[i] = float_to_bf16(value);
  } else if (type == ElemType::kFloat16) {
    static_cast<uint16_t*>(lowp)[i] = float_to_fp16(value);
  }
}

template <class Scalars, float (*Element)(float, float, float&, float&, const Scalars&)>
inline void fused_elements(const AdamBuffers& b, const Scalars& s, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float g = load_grad_element(b.grad, b.grad_type, i);
    const float p = Element(b.param[i], g, b.exp_avg[i], b.exp_avg_sq[i], s);
    b.param[i] = p;
    store_lowp_element(b.param_lowp, b.lowp_type, i, p);
  }
}

inline void adam_elements(const AdamBuffers& b, const AdamScalars& s, int64_t begin,
                          int64_t end) {
  fused_elements<AdamScalars, adam_element>(b, s, begin, end);
}

inline void agd_elements(const AdamBuffers& b, const AgdScalars& s, int64_t begin, int64_t end) {
  fused_elements<AgdScalars, agd_element>(b, s, begin, end);
}

}  // namespace
}  // namespace heteromem::cpu
