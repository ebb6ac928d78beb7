// HM_HOST_DEVICE: a function compiled for both the host and the device under nvcc, plain
// inline in host-only builds (the CPU kernels and the C++ unit tests include the same maths).
#pragma once

#if defined(__CUDACC__)
#define HM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HM_HOST_DEVICE inline
#endif
