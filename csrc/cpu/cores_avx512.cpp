// The AVX-512F instantiations of every CPU optimizer core (Adam, AGD, 8-bit Adam): the loops
// are written once over vector traits (fused_loop_simd.h, adam8bit_core_simd.h) and this file
// compiles them for 16-float vectors.
#include "adam_core_tail.h"
#include "adam8bit_core_tail.h"

#if defined(__x86_64__)
// Only the functions below are compiled for AVX-512; the shared helpers included above keep
// the baseline target (see adam_core_tail.h).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#endif

#include "vec_avx512.h"
#include "adam_core_simd.h"
#include "adam8bit_core_simd.h"
#include "agd_core_simd.h"
#include "fused_loop_simd.h"

namespace heteromem::cpu {

void adam_update_avx512(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  fused_dispatch<Avx512>(b, AdamRule<Avx512>(s), begin, end);
}

void agd_update_avx512(const AdamBuffers& b, const AgdScalars& s, int64_t begin, int64_t end) {
  fused_dispatch<Avx512>(b, AgdRule<Avx512>(s), begin, end);
}

void adam8bit_update_avx512(const Adam8bitBuffers& b, const AdamScalars& s, int64_t begin,
                            int64_t end) {
  adam8bit_dispatch<Avx512>(b, s, begin, end);
}

}  // namespace heteromem::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: the dispatchers never select this path (cpu_supports is false).

namespace heteromem::cpu {
void adam_update_avx512(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  adam_update_scalar(b, s, begin, end);
}
void agd_update_avx512(const AdamBuffers& b, const AgdScalars& s, int64_t begin, int64_t end) {
  agd_update_scalar(b, s, begin, end);
}
void adam8bit_update_avx512(const Adam8bitBuffers& b, const AdamScalars& s, int64_t begin,
                            int64_t end) {
  adam8bit_update_scalar(b, s, begin, end);
}
}  // namespace heteromem::cpu

#endif
