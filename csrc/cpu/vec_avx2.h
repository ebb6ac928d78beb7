// AVX2 + FMA + F16C vector traits (8 floats) for the optimizer loops: float arithmetic,
// bf16/fp16 gradient loads and parameter-copy stores, and the integer operations of the
// 8-bit codes. Same rules as vec_avx512.h: include after switching the target on.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "capability.h"

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
  using I = __m256i;
  static constexpr int kWidth = 8;
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const float* p) { return _mm256_load_ps(p); }
  static void storeu(float* p, V x) { _mm256_storeu_ps(p, x); }
  static void store(float* p, V x) { _mm256_store_ps(p, x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V sqrt(V a) { return _mm256_sqrt_ps(a); }
  // a > b ? a : b per lane, with b where either is NaN (x86 maxps).
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  template <ElemType G>
  static V load_grad(const void* grad, int64_t i) { return load_grad8<G>(grad, i); }
  template <ElemType L>
  static void store_lowp(void* lowp, int64_t i, V p) { store_lowp8<L>(lowp, i, p); }

  // Integer lanes (the 8-bit codes and float bit patterns).
  static I iset1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static I izero() { return _mm256_setzero_si256(); }
  static I bits(V x) { return _mm256_castps_si256(x); }
  static V from_bits(I x) { return _mm256_castsi256_ps(x); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I iand(I a, I b) { return _mm256_and_si256(a, b); }
  static I ior(I a, I b) { return _mm256_or_si256(a, b); }
  static I imax_s(I a, I b) { return _mm256_max_epi32(a, b); }  // signed
  // a | (b & mask)
  static I or_and(I a, I b, I mask) { return _mm256_or_si256(a, _mm256_and_si256(b, mask)); }
  template <int N>
  static I slli(I a) { return _mm256_slli_epi32(a, N); }
  template <int N>
  static I srli(I a) { return _mm256_srli_epi32(a, N); }
  static I load_codes(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  // Lanes hold values < 256: two packs leave bytes 0-3 in the low lane and 4-7 in the high.
  static void store_codes(uint8_t* p, I codes) {
    const __m256i words = _mm256_packus_epi32(codes, codes);
    const __m256i bytes = _mm256_packus_epi16(words, words);
    const __m128i both = _mm_unpacklo_epi32(_mm256_castsi256_si128(bytes),
                                            _mm256_extracti128_si256(bytes, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), both);
  }
  static uint32_t reduce_max(I a) {
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xB1));
    return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
  }
};

}  // namespace
}  // namespace heteromem::cpu
