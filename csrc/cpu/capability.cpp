#include "capability.h"

#include <cstdlib>
#include <stdexcept>

namespace heteromem::cpu {

bool cpu_supports(Capability capability) {
#if defined(__x86_64__) || defined(__i386__)
  switch (capability) {
    case Capability::kAvx512:
      return __builtin_cpu_supports("avx512f");
    case Capability::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Capability::kScalar:
      return true;
  }
  return false;
#else
  return capability == Capability::kScalar;
#endif
}

const char* capability_name(Capability capability) {
  switch (capability) {
    case Capability::kAvx512:
      return "avx512";
    case Capability::kAvx2:
      return "avx2";
    case Capability::kScalar:
      return "scalar";
  }
  return "unknown";
}

Capability parse_capability(const std::string& name) {
  if (name == "avx512") return Capability::kAvx512;
  if (name == "avx2") return Capability::kAvx2;
  if (name == "scalar") return Capability::kScalar;
  throw std::invalid_argument("HETEROMEM_CPU_CAPABILITY='" + name +
                              "' is not a CPU path; use one of: avx512, avx2, scalar");
}

Capability detect_capability() {
  if (cpu_supports(Capability::kAvx512)) return Capability::kAvx512;
  if (cpu_supports(Capability::kAvx2)) return Capability::kAvx2;
  return Capability::kScalar;
}

Capability active_capability() {
  const char* forced = std::getenv("HETEROMEM_CPU_CAPABILITY");
  if (forced == nullptr || forced[0] == '\0') return detect_capability();
  const Capability capability = parse_capability(forced);
  if (!cpu_supports(capability)) {
    throw std::invalid_argument(std::string("HETEROMEM_CPU_CAPABILITY=") + forced +
                                " but this CPU does not support it (best available: " +
                                capability_name(detect_capability()) +
                                "); unset it or pick a lower path");
  }
  return capability;
}

void require_capability(Capability capability) {
  if (!cpu_supports(capability)) {
    throw std::invalid_argument(std::string("CPU path ") + capability_name(capability) +
                                " is not supported by this CPU");
  }
}

}  // namespace heteromem::cpu
