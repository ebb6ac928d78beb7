// The element-by-element 8-bit Adam block: the scalar path, and the SIMD paths' elements past
// their last full vector (a partial last block). Internal linkage, as adam_core_tail.h.
#pragma once

#include <algorithm>

#include "adam8bit_core.h"
#include "adam_core_tail.h"

namespace heteromem::cpu {
namespace {

// Decodes, updates and stashes elements [from, to) of the block at `start` (from, to relative
// to start); returns the largest |exp_avg| and |exp_avg_sq| bit patterns seen.
inline void adam8bit_elements(const Adam8bitBuffers& b, const AdamScalars& s, int64_t start,
                              int64_t from, int64_t to, float* m_out, float* v_out,
                              uint32_t& m_max, uint32_t& v_max) {
  const int64_t q = start / quant8::kBlock;
  const float m_scale = b.exp_avg_scale[q];
  const float v_scale = b.exp_avg_sq_scale[q];
  for (int64_t j = from; j < to; ++j) {
    const int64_t i = start + j;
    float m = hm_mul(quant8::decode_exp_avg(b.exp_avg[i]), m_scale);
    float v = hm_mul(quant8::decode_exp_avg_sq(b.exp_avg_sq[i]), v_scale);
    const float p = adam_element(b.param[i], load_grad_element(b.grad, b.grad_type, i), m, v, s);
    b.param[i] = p;
    store_lowp_element(b.param_lowp, b.lowp_type, i, p);
    m_out[j] = m;
    v_out[j] = v;
    m_max = std::max(m_max, quant8::bits_of(m) & quant8::kMagnitudeMask);
    v_max = std::max(v_max, quant8::bits_of(v) & quant8::kMagnitudeMask);
  }
}

// Writes the block's new scales, then codes [from, to) from the stashed values (all codes
// when called by the scalar path; the SIMD paths encode their full vectors themselves).
inline void adam8bit_encode_elements(const Adam8bitBuffers& b, int64_t start, int64_t from,
                                     int64_t to, const float* m_in, const float* v_in,
                                     const quant8::BlockScale& ms,
                                     const quant8::BlockScale& vs) {
  for (int64_t j = from; j < to; ++j) {
    const int64_t i = start + j;
    b.exp_avg[i] = static_cast<uint8_t>(ms.encode ? quant8::encode_exp_avg(m_in[j], ms.inv) : 0);
    b.exp_avg_sq[i] =
        static_cast<uint8_t>(vs.encode ? quant8::encode_exp_avg_sq(v_in[j], vs.inv) : 0);
  }
}

inline void adam8bit_block_scalar(const Adam8bitBuffers& b, const AdamScalars& s, int64_t start,
                                  int64_t end) {
  float m[quant8::kBlock], v[quant8::kBlock];
  uint32_t m_max = 0, v_max = 0;
  const int64_t count = end - start;
  adam8bit_elements(b, s, start, 0, count, m, v, m_max, v_max);
  const quant8::BlockScale ms = quant8::block_scale(m_max, quant8::kExpAvgMax);
  const quant8::BlockScale vs = quant8::block_scale(v_max, quant8::kExpAvgSqMax);
  const int64_t q = start / quant8::kBlock;
  b.exp_avg_scale[q] = ms.scale;
  b.exp_avg_sq_scale[q] = vs.scale;
  adam8bit_encode_elements(b, start, 0, count, m, v, ms, vs);
}

}  // namespace
}  // namespace heteromem::cpu
