// AVX2 + FMA + F16C path: 8 floats per iteration, the scalar element loop for the tail.
// Operation order is adam_element's (common/adam_math.h), so results are bit-identical.
#include "adam_core_tail.h"

#if defined(__x86_64__)
#include <immintrin.h>

// Only the functions below are compiled for AVX2; the shared helpers included above keep
// the baseline target (see adam_core_tail.h).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace heteromem::cpu {
namespace {

template <ElemType G>
inline __m256 load_grad8(const void* grad, int64_t i) {
  if constexpr (G == ElemType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(grad) + i);
  } else {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(grad) + i));
    if constexpr (G == ElemType::kBFloat16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      return _mm256_cvtph_ps(h);
    }
  }
}

template <ElemType L>
inline void store_lowp8(void* lowp, int64_t i, __m256 p) {
  if constexpr (L == ElemType::kNone) {
    return;
  } else {
    auto* dst = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(lowp) + i);
    if constexpr (L == ElemType::kBFloat16) {
      // Round to nearest even on the bit pattern; NaN becomes the canonical 0x7fc0.
      const __m256i u = _mm256_castps_si256(p);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(p, p, _CMP_UNORD_Q));
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
      // packus interleaves the two 128-bit lanes; the permute puts the 8 halves in order.
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
      _mm_storeu_si128(dst, _mm256_castsi256_si128(packed));
    } else {
      _mm_storeu_si128(dst, _mm256_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
}

template <ElemType G, ElemType L>
void update(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  const __m256 inv_grad_scale = _mm256_set1_ps(s.inv_grad_scale);
  const __m256 l2 = _mm256_set1_ps(s.l2_weight_decay);
  const __m256 decay = _mm256_set1_ps(s.decay_factor);
  const __m256 beta1 = _mm256_set1_ps(s.beta1);
  const __m256 one_minus_beta1 = _mm256_set1_ps(s.one_minus_beta1);
  const __m256 beta2 = _mm256_set1_ps(s.beta2);
  const __m256 one_minus_beta2 = _mm256_set1_ps(s.one_minus_beta2);
  const __m256 inv_bc2 = _mm256_set1_ps(s.inv_bias_corr2_sqrt);
  const __m256 eps = _mm256_set1_ps(s.eps);
  const __m256 step_size = _mm256_set1_ps(s.step_size);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    __m256 p = _mm256_loadu_ps(b.param + i);
    __m256 g = _mm256_mul_ps(load_grad8<G>(b.grad, i), inv_grad_scale);
    if (s.use_l2) g = _mm256_add_ps(g, _mm256_mul_ps(p, l2));
    if (s.use_decay) p = _mm256_mul_ps(p, decay);
    const __m256 m = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(b.exp_avg + i), beta1),
                                   _mm256_mul_ps(g, one_minus_beta1));
    const __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(b.exp_avg_sq + i), beta2),
                                   _mm256_mul_ps(_mm256_mul_ps(g, g), one_minus_beta2));
    const __m256 denom = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(v), inv_bc2), eps);
    p = _mm256_sub_ps(p, _mm256_mul_ps(_mm256_div_ps(m, denom), step_size));
    _mm256_storeu_ps(b.exp_avg + i, m);
    _mm256_storeu_ps(b.exp_avg_sq + i, v);
    _mm256_storeu_ps(b.param + i, p);
    store_lowp8<L>(b.param_lowp, i, p);
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

void adam_update_avx2(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
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
void adam_update_avx2(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  adam_update_scalar(b, s, begin, end);
}
}  // namespace heteromem::cpu

#endif
