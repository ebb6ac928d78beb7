// AVX-512F vector traits (16 floats) for the optimizer loops: float arithmetic, bf16/fp16
// gradient loads and parameter-copy stores, and the integer operations of the 8-bit codes.
//
// Include only after switching the target on (#pragma GCC target / clang attribute push) and
// after the scalar helpers (adam_core_tail.h): everything here has internal linkage, so the
// AVX-512 copies never serve a CPU without AVX-512.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "capability.h"

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
  using I = __m512i;
  static constexpr int kWidth = 16;
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const float* p) { return _mm512_load_ps(p); }
  static void storeu(float* p, V x) { _mm512_storeu_ps(p, x); }
  static void store(float* p, V x) { _mm512_store_ps(p, x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V sqrt(V a) { return _mm512_sqrt_ps(a); }
  // a > b ? a : b per lane, with b where either is NaN (x86 maxps).
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  template <ElemType G>
  static V load_grad(const void* grad, int64_t i) { return load_grad16<G>(grad, i); }
  template <ElemType L>
  static void store_lowp(void* lowp, int64_t i, V p) { store_lowp16<L>(lowp, i, p); }

  // Integer lanes (the 8-bit codes and float bit patterns).
  static I iset1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static I izero() { return _mm512_setzero_si512(); }
  static I bits(V x) { return _mm512_castps_si512(x); }
  static V from_bits(I x) { return _mm512_castsi512_ps(x); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I iand(I a, I b) { return _mm512_and_si512(a, b); }
  static I ior(I a, I b) { return _mm512_or_si512(a, b); }
  static I imax_s(I a, I b) { return _mm512_max_epi32(a, b); }  // signed
  // a | (b & mask) in one ternary-logic instruction.
  static I or_and(I a, I b, I mask) { return _mm512_ternarylogic_epi32(a, b, mask, 0xF8); }
  template <int N>
  static I slli(I a) { return _mm512_slli_epi32(a, N); }
  template <int N>
  static I srli(I a) { return _mm512_srli_epi32(a, N); }
  static I load_codes(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // Lanes hold values < 256.
  static void store_codes(uint8_t* p, I codes) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(codes));
  }
  static uint32_t reduce_max(I a) { return static_cast<uint32_t>(_mm512_reduce_max_epi32(a)); }
};

}  // namespace
}  // namespace heteromem::cpu
