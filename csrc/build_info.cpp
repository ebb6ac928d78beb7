// What heteromem._C was compiled with and what it will use on this machine, for
// heteromem.build_info(). HETEROMEM_WITH_CUDA / HETEROMEM_CUDA_ARCHS come from the
// heteromem_build_config.h that setup.py (or CMake) writes into its build folder.
#include "build_info.h"

#include <ATen/Parallel.h>

#include <sstream>
#include <stdexcept>

#include "cpu/adam_core.h"

// Written per build by setup.py or CMake into their build folder.
#include <heteromem_build_config.h>

namespace heteromem {

std::string build_info_text() {
  std::ostringstream out;
  out << "cuda=" << HETEROMEM_WITH_CUDA << "\n";
  out << "cuda_archs=" << HETEROMEM_CUDA_ARCHS << "\n";
  out << "cpu_capability_detected=" << cpu::capability_name(cpu::detect_capability()) << "\n";
  try {
    out << "cpu_capability=" << cpu::capability_name(cpu::active_capability()) << "\n";
  } catch (const std::invalid_argument& e) {
    out << "cpu_capability_error=" << e.what() << "\n";
  }
  out << "threads=" << at::get_num_threads() << "\n";
  return out.str();
}

}  // namespace heteromem
