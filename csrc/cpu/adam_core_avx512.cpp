// AVX-512F path: 16 floats per iteration, the scalar element loop for the tail.
// Operation order is adam_element's (common/adam_math.h), so results are bit-identical.
#include "adam_core_tail.h"

#if defined(__x86_64__)
#include <immintrin.h>

// Only the functions below are compiled for AVX-512; the shared helpers included above keep
// the baseline target (see adam_core_tail.h).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#endif

namespace heteromem::cpu {
namespace {

template <ElemType G>
inline __m512 load_grad16(const void* grad, int64_t i) {
  if constexpr (G == ElemType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(grad) + i);
  } else {
    const __m256i h =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(grad) + i));
    if constexpr (G == ElemType::kBFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

template <ElemType L>
inline void store_lowp16(void* lowp, int64_t i, __m512 p) {
  if constexpr (L == ElemType::kNone) {
    return;
  } else {
    auto* dst = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(lowp) + i);
    if constexpr (L == ElemType::kBFloat16) {
      // Round to nearest even on the bit pattern; NaN becomes the canonical 0x7fc0.
      const __m512i u = _mm512_castps_si512(p);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(p, p, _CMP_UNORD_Q);
      r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7fc0));
      _mm256_storeu_si256(dst, _mm512_cvtepi32_epi16(r));
    } else {
      _mm256_storeu_si256(dst, _mm512_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
}

template <ElemType G, ElemType L>
void update(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  const __m512 inv_grad_scale = _mm512_set1_ps(s.inv_grad_scale);
  const __m512 l2 = _mm512_set1_ps(s.l2_weight_decay);
  const __m512 decay = _mm512_set1_ps(s.decay_factor);
  const __m512 beta1 = _mm512_set1_ps(s.beta1);
  const __m512 one_minus_beta1 = _mm512_set1_ps(s.one_minus_beta1);
  const __m512 beta2 = _mm512_set1_ps(s.beta2);
  const __m512 one_minus_beta2 = _mm512_set1_ps(s.one_minus_beta2);
  const __m512 inv_bc2 = _mm512_set1_ps(s.inv_bias_corr2_sqrt);
  const __m512 eps = _mm512_set1_ps(s.eps);
  const __m512 step_size = _mm512_set1_ps(s.step_size);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __m512 p = _mm512_loadu_ps(b.param + i);
    __m512 g = _mm512_mul_ps(load_grad16<G>(b.grad, i), inv_grad_scale);
    if (s.use_l2) g = _mm512_add_ps(g, _mm512_mul_ps(p, l2));
    if (s.use_decay) p = _mm512_mul_ps(p, decay);
    const __m512 m = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(b.exp_avg + i), beta1),
                                   _mm512_mul_ps(g, one_minus_beta1));
    const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(b.exp_avg_sq + i), beta2),
                                   _mm512_mul_ps(_mm512_mul_ps(g, g), one_minus_beta2));
    const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(v), inv_bc2), eps);
    p = _mm512_sub_ps(p, _mm512_mul_ps(_mm512_div_ps(m, denom), step_size));
    _mm512_storeu_ps(b.exp_avg + i, m);
    _mm512_storeu_ps(b.exp_avg_sq + i, v);
    _mm512_storeu_ps(b.param + i, p);
    store_lowp16<L>(b.param_lowp, i, p);
  }
  adam_elements(b, s, i, end);
}

template <ElemType G>
void dispatch_lowp(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  switch (b.lowp_type) {
    case ElemType::kBFloat16:
      return update<G, ElemType::kBFloat16>(b, s, begin, end);
    case ElemType::kFloat16:
      return update<G, ElemType::kFloat16>(b, s, begin, end);
    default:
      return update<G, ElemType::kNone>(b, s, begin, end);
  }
}

}  // namespace

void adam_update_avx512(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  switch (b.grad_type) {
    case ElemType::kBFloat16:
      return dispatch_lowp<ElemType::kBFloat16>(b, s, begin, end);
    case ElemType::kFloat16:
      return dispatch_lowp<ElemType::kFloat16>(b, s, begin, end);
    default:
      return dispatch_lowp<ElemType::kFloat32>(b, s, begin, end);
  }
}

}  // namespace heteromem::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: adam_update never selects this path (cpu_supports is false).

namespace heteromem::cpu {
void adam_update_avx512(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  adam_update_scalar(b, s, begin, end);
}
}  // namespace heteromem::cpu

#endif
