// Torch-free CPU Adam core: one pass over flat buffers, picked per CPU at run time.
//
// The core knows nothing about tensors or threads: the op wrapper (adam_cpu.cpp) validates
// tensors and splits the range over threads; the C++ unit tests call the core directly.
#pragma once

#include <cstdint>
#include <string>

#include "../common/adam_math.h"

namespace heteromem::cpu {

enum class ElemType { kNone, kFloat32, kBFloat16, kFloat16 };

enum class Capability { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

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

// The per-capability loops (defined in adam_core_<capability>.cpp). Calling one the CPU does
// not support is undefined behaviour; use adam_update, which checks.
void adam_update_scalar(const AdamBuffers&, const AdamScalars&, int64_t begin, int64_t end);
void adam_update_avx2(const AdamBuffers&, const AdamScalars&, int64_t begin, int64_t end);
void adam_update_avx512(const AdamBuffers&, const AdamScalars&, int64_t begin, int64_t end);

// The best capability this CPU supports.
Capability detect_capability();

// The capability in use: detect_capability(), or HETEROMEM_CPU_CAPABILITY (scalar, avx2,
// avx512) when set. Throws std::invalid_argument for an unknown value or one this CPU lacks.
Capability active_capability();

const char* capability_name(Capability capability);

// Parses "scalar" / "avx2" / "avx512"; throws std::invalid_argument naming the variable.
Capability parse_capability(const std::string& name);

}  // namespace heteromem::cpu
