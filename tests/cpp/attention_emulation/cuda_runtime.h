// Host stand-in for the CUDA runtime header: the qualifiers, builtins and vector types the
// attention kernels use, so their bodies compile unchanged with g++ (test_attention_emulation).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __CUDA_ARCH__ 900
using std::max;
using std::min;
typedef int cudaError_t;
typedef void* cudaStream_t;
struct dim3e { unsigned x = 0, y = 0, z = 0; };
extern thread_local dim3e threadIdx;
extern dim3e blockIdx, gridDim;
struct uint4 { uint32_t x, y, z, w; };
struct uint2 { uint32_t x, y; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
namespace emu {
extern unsigned char* smem_base;
void syncthreads();
void syncwarp();
float shfl_xor(float v, int mask);
}  // namespace emu
#define __syncthreads() emu::syncthreads()
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
inline float __shfl_xor_sync(unsigned, float v, int m) { return emu::shfl_xor(v, m); }
inline size_t __cvta_generic_to_shared(const void* p) {
  return static_cast<const unsigned char*>(p) - emu::smem_base;
}
