// Block-wise 8-bit storage of Adam's moments (AdamW8bit / Adam8bit), shared by every
// implementation (scalar, AVX2, AVX-512, CUDA; heteromem/ops/reference.py mirrors it).
//
// A state of n elements is cut into blocks of kBlock = 256; each block stores one byte per
// element and one float32 scale (its largest magnitude divided by the code's largest value),
// as bitsandbytes and torchao do. Unlike their 256-entry "dynamic" code books, which a
// kernel searches, the codes here are tiny floating-point formats with 4 mantissa bits, so
// encoding is a multiply, an add and two integer operations and decoding is two integer
// operations, an add and a multiply, in any SIMD width:
//
//   F_bias(k) = 2^(e - bias) * (1 + f / 16)   for the code k = 16 e + f
//
//   exp_avg    sign bit + 7-bit k, bias 7, value D(k) = F(k) - F(0): zero is exact, steps of
//              2^-11 near zero (like subnormals), 4 significant bits from 2^-7 up to
//              D(127) = 1.9297 (the block's largest magnitude maps there).
//   exp_avg_sq 8-bit k, bias 15, value F(k): 4 significant bits from 2^-15 to F(255) = 1.9375,
//              and never zero: a second moment below 2^-15 of its block's largest is stored
//              as that floor, so an 8-bit denominator can only overstate it (a smaller step),
//              never turn a small one into 0 and the step into m / eps.
//
// Rounding is to nearest (ties away from zero) on the float bit pattern, which the
// pattern's carry turns into the next binade where needed. Relative error of a stored value:
// at most 1/32 of (|x| + F(0) * scale) for exp_avg, 1/32 for exp_avg_sq above its floor.
// The largest magnitude of a block comes back to within an ulp, so a block whose values all
// decay (beta2 shrinks them 0.1% a step, far below a code step) decays through its scale.
//
// Non-finite values make the whole block's scale NaN (codes 0): the NaN reaches every
// parameter of the block at the next step. A block whose largest magnitude is below
// FLT_MIN (all zero, at the start) stores scale 0 and codes 0.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/adam_math.h"

namespace heteromem::quant8 {

constexpr int64_t kBlock = 256;

constexpr uint32_t kExpAvgBias = 7;
constexpr uint32_t kExpAvgSqBias = 15;
// Bit patterns of F(0) = 2^-bias: adding the code shifted into the mantissa gives F(k).
constexpr uint32_t kExpAvgOffset = (127u - kExpAvgBias) << 23;
constexpr uint32_t kExpAvgSqOffset = (127u - kExpAvgSqBias) << 23;
constexpr uint32_t kCodeShift = 19;          // 23 mantissa bits - 4 code mantissa bits
constexpr uint32_t kHalfStep = 1u << 18;     // half a code step on the bit pattern
constexpr float kExpAvgZero = 0.0078125f;    // F(0) = 2^-7
constexpr float kExpAvgMax = 1.9296875f;     // D(127) = F(127) - F(0)
constexpr float kExpAvgSqMax = 1.9375f;      // F(255)
constexpr uint32_t kMagnitudeMask = 0x7fffffffu;
constexpr uint32_t kInfBits = 0x7f800000u;
constexpr uint32_t kMinNormalBits = 0x00800000u;
constexpr uint32_t kQuietNanBits = 0x7fc00000u;

HM_HOST_DEVICE uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

HM_HOST_DEVICE float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// Code -> value before the block scale; exact (a few significant bits).
HM_HOST_DEVICE float decode_exp_avg(uint32_t code) {
  const float magnitude = hm_sub(float_of(((code & 0x7fu) << kCodeShift) + kExpAvgOffset),
                                 kExpAvgZero);
  return float_of(bits_of(magnitude) | ((code & 0x80u) << 24));
}

HM_HOST_DEVICE float decode_exp_avg_sq(uint32_t code) {
  return float_of((code << kCodeShift) + kExpAvgSqOffset);
}

// Value -> code, given inv = kExpAvgMax / (the block's largest magnitude).
HM_HOST_DEVICE uint32_t encode_exp_avg(float x, float inv) {
  const uint32_t xb = bits_of(x);
  const float z = hm_add(hm_mul(float_of(xb & kMagnitudeMask), inv), kExpAvgZero);
  return ((bits_of(z) - kExpAvgOffset + kHalfStep) >> kCodeShift) | ((xb >> 24) & 0x80u);
}

// Value (>= 0) -> code, given inv = kExpAvgSqMax / (the block's largest value).
HM_HOST_DEVICE uint32_t encode_exp_avg_sq(float x, float inv) {
  const int32_t t = static_cast<int32_t>(bits_of(hm_mul(x, inv))) -
                    static_cast<int32_t>(kExpAvgSqOffset - kHalfStep);
  return t < 0 ? 0u : static_cast<uint32_t>(t) >> kCodeShift;
}

struct BlockScale {
  float scale;  // stored: value = decoded code * scale
  float inv;    // max_code_value / largest magnitude, for encoding
  bool encode;  // false: the block's codes are all 0 (scale 0 or NaN)
};

// From the largest magnitude's bit pattern (an integer maximum over the block, so exact and
// independent of the order the elements were visited in).
HM_HOST_DEVICE BlockScale block_scale(uint32_t absmax_bits, float max_code_value) {
  if (absmax_bits >= kInfBits) return {float_of(kQuietNanBits), 0.0f, false};
  if (absmax_bits < kMinNormalBits) return {0.0f, 0.0f, false};
  const float absmax = float_of(absmax_bits);
  return {hm_div(absmax, max_code_value), hm_div(max_code_value, absmax), true};
}

}  // namespace heteromem::quant8
