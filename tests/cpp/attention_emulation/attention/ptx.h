// Emulated PTX (ldmatrix, mma.m16n8k16, cp.async with deferred completion, ex2, atomics). It
// shadows csrc/attention/ptx.h: this directory comes first on the test's include path.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>
namespace emu {
struct Pending { uint32_t dst; const void* src; int n, fill; };
void cp_async(uint32_t dst, const void* src, int bytes, int cp_size);
void commit();
void wait(int n);
void ldsm(uint32_t (&r)[4], uint32_t addr, bool trans);
void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
void atomic_add(float* p, float v);
}  // namespace emu
namespace heteromem { namespace attention {
inline uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
template <typename T>
inline uint32_t pack2(float lo, float hi);
template <>
inline uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return emu_f2bf(lo) | (uint32_t(emu_f2bf(hi)) << 16);
}
template <>
inline uint32_t pack2<__half>(float lo, float hi) {
  return emu_f2h(lo) | (uint32_t(emu_f2h(hi)) << 16);
}
template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma(c, a, b0, b1, std::is_same_v<T, __nv_bfloat16>);
}
inline void ldsm_x4(uint32_t (&r)[4], uint32_t addr) { emu::ldsm(r, addr, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) { emu::ldsm(r, addr, true); }
inline void cp_async_16(uint32_t dst, const void* src, bool valid) {
  emu::cp_async(dst, src, valid ? 16 : 0, 16);  // invalid: zero fill, as src-size 0 does
}
inline void cp_async_4(uint32_t dst, const void* src) { emu::cp_async(dst, src, 4, 4); }
inline void cp_async_commit() { emu::commit(); }
template <int N> inline void cp_async_wait() { emu::wait(N); }
inline float fast_exp2(float x) { return exp2f(x); }
inline void atomic_add2(float* addr, float a, float b) {
  emu::atomic_add(addr, a);
  emu::atomic_add(addr + 1, b);
}
}}  // namespace heteromem::attention
