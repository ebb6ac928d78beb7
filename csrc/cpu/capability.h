// Which CPU code path runs: chosen at run time from the CPU (the same binary runs on CPUs
// with and without AVX-512), and HETEROMEM_CPU_CAPABILITY can force a lower one (tests,
// benchmarks). Shared by every optimizer core (Adam, AGD, 8-bit Adam).
#pragma once

#include <string>

namespace heteromem::cpu {

// Element types of the buffers a core reads or writes besides its fp32 states.
enum class ElemType { kNone, kFloat32, kBFloat16, kFloat16 };

enum class Capability { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Whether this CPU can run the path (AVX-512F; AVX2 + FMA + F16C; scalar always).
bool cpu_supports(Capability capability);

// The best capability this CPU supports.
Capability detect_capability();

// The capability in use: detect_capability(), or HETEROMEM_CPU_CAPABILITY (scalar, avx2,
// avx512) when set. Throws std::invalid_argument for an unknown value or one this CPU lacks.
Capability active_capability();

const char* capability_name(Capability capability);

// Parses "scalar" / "avx2" / "avx512"; throws std::invalid_argument naming the variable.
Capability parse_capability(const std::string& name);

// Throws std::invalid_argument when the CPU lacks `capability` (the per-path loops must never
// run on a CPU without their instructions).
void require_capability(Capability capability);

}  // namespace heteromem::cpu
