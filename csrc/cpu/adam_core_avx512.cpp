// AVX-512F path: the vector traits (16 floats) and bf16/fp16 loads and stores; the loop itself
// is adam_core_simd.h, shared with the AVX2 path.
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

#include "adam_core_simd.h"

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

struct Avx512 {
  using V = __m512;
  static constexpr int kWidth = 16;
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, V x) { _mm512_storeu_ps(p, x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V sqrt(V a) { return _mm512_sqrt_ps(a); }
  template <ElemType G>
  static V load_grad(const void* grad, int64_t i) { return load_grad16<G>(grad, i); }
  template <ElemType L>
  static void store_lowp(void* lowp, int64_t i, V p) { store_lowp16<L>(lowp, i, p); }
};

}  // namespace

void adam_update_avx512(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  adam_update_simd<Avx512>(b, s, begin, end);
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
