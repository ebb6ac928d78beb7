// Torch-free CPU cores of the fp32-state optimizers, Adam/AdamW and AGD: one pass over flat
// buffers, the path picked per CPU at run time (capability.h).
//
// The cores know nothing about tensors or threads: the op wrappers (adam_cpu.cpp,
// agd_cpu.cpp) validate tensors and split the range over threads; the C++ unit tests call the
// cores directly.
#pragma once

#include <cstdint>

#include "../common/adam_math.h"
#include "../common/agd_math.h"
#include "capability.h"

namespace heteromem::cpu {

// The buffers of one update, shared by the Adam and AGD cores (same state, same traffic).
struct AdamBuffers {
  float* param = nullptr;
  const void* grad = nullptr;
  ElemType grad_type = ElemType::kFloat32;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  void* param_lowp = nullptr;  // optional low-precision copy of the updated parameter
  ElemType lowp_type = ElemType::kNone;
};

// Updates elements [begin, end) in place. Every capability gives bit-identical results.
void adam_update(const AdamBuffers& buffers, const AdamScalars& scalars, int64_t begin,
                 int64_t end, Capability capability);

// The same for AGD (common/agd_math.h).
void agd_update(const AdamBuffers& buffers, const AgdScalars& scalars, int64_t begin,
                int64_t end, Capability capability);

// The per-capability loops (defined in cores_<capability>.cpp). Calling one the CPU does not
// support is undefined behaviour; use adam_update / agd_update, which check.
void adam_update_scalar(const AdamBuffers&, const AdamScalars&, int64_t begin, int64_t end);
void adam_update_avx2(const AdamBuffers&, const AdamScalars&, int64_t begin, int64_t end);
void adam_update_avx512(const AdamBuffers&, const AdamScalars&, int64_t begin, int64_t end);
void agd_update_scalar(const AdamBuffers&, const AgdScalars&, int64_t begin, int64_t end);
void agd_update_avx2(const AdamBuffers&, const AgdScalars&, int64_t begin, int64_t end);
void agd_update_avx512(const AdamBuffers&, const AgdScalars&, int64_t begin, int64_t end);

}  // namespace heteromem::cpu
