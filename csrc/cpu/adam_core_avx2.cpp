// AVX2 + FMA + F16C path: the vector traits (8 floats) and bf16/fp16 loads and stores; the
// loop itself is adam_core_simd.h, shared with the AVX-512 path.
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

#include "adam_core_simd.h"

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

struct Avx2 {
  using V = __m256;
  static constexpr int kWidth = 8;
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, V x) { _mm256_storeu_ps(p, x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V sqrt(V a) { return _mm256_sqrt_ps(a); }
  template <ElemType G>
  static V load_grad(const void* grad, int64_t i) { return load_grad8<G>(grad, i); }
  template <ElemType L>
  static void store_lowp(void* lowp, int64_t i, V p) { store_lowp8<L>(lowp, i, p); }
};

}  // namespace

void adam_update_avx2(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  adam_update_simd<Avx2>(b, s, begin, end);
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
