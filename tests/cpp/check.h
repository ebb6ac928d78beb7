// The C++ tests' one assertion: count every check, print each failure and keep going, so one
// run lists everything that broke; main returns exit_code() for ctest.
#pragma once

#include <cstdio>
#include <string>

namespace heteromem::testing {

inline int g_failures = 0;
inline int g_checks = 0;

inline void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

inline int exit_code() { return g_failures == 0 ? 0 : 1; }

}  // namespace heteromem::testing
