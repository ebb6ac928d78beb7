#pragma once

#include <string>

namespace heteromem {

// "key=value" lines: cuda (0/1), cuda_archs, cpu_capability, cpu_capability_detected, threads.
std::string build_info_text();

}  // namespace heteromem
