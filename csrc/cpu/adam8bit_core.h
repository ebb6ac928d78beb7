// Torch-free CPU core of Adam/AdamW with 8-bit block-quantised moments (AdamW8bit, Adam8bit):
// one pass reads the fp32 master, the gradient and the two 8-bit states with their block
// scales, and writes them back (16 bytes per parameter with a bf16 gradient and bf16 copy,
// against 28 for fp32 moments). Formats and rounding: common/quant8_math.h.
#pragma once

#include <cstdint>

#include "../common/adam_math.h"
#include "../common/quant8_math.h"
#include "capability.h"

namespace heteromem::cpu {

struct Adam8bitBuffers {
  float* param = nullptr;
  const void* grad = nullptr;
  ElemType grad_type = ElemType::kFloat32;
  uint8_t* exp_avg = nullptr;          // one code per element
  float* exp_avg_scale = nullptr;      // one scale per block of quant8::kBlock elements
  uint8_t* exp_avg_sq = nullptr;
  float* exp_avg_sq_scale = nullptr;
  void* param_lowp = nullptr;          // optional low-precision copy of the updated parameter
  ElemType lowp_type = ElemType::kNone;
};

// Updates elements [begin, end) in place: `begin` must be a multiple of quant8::kBlock and
// `end` one too or the end of the buffers (a last, partial block). Every capability gives
// bit-identical results: Adam's update (adam_element) on the decoded moments, then each
// block re-encoded against its new largest magnitude.
void adam8bit_update(const Adam8bitBuffers& buffers, const AdamScalars& scalars, int64_t begin,
                     int64_t end, Capability capability);

// The per-capability loops (cores_<capability>.cpp); adam8bit_update checks the CPU.
void adam8bit_update_scalar(const Adam8bitBuffers&, const AdamScalars&, int64_t begin,
                            int64_t end);
void adam8bit_update_avx2(const Adam8bitBuffers&, const AdamScalars&, int64_t begin,
                          int64_t end);
void adam8bit_update_avx512(const Adam8bitBuffers&, const AdamScalars&, int64_t begin,
                            int64_t end);

}  // namespace heteromem::cpu
