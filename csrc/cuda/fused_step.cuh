// The elementwise kernel of the fp32-state optimizers (Adam, AGD) and its launcher, written once
// over a `Rule` whose device function is the optimizer's element maths (adam_element,
// agd_element from csrc/common), so every CUDA result equals the CPU paths' bit for bit.
//
// Each thread updates 4 consecutive elements with 16-byte loads of the fp32 buffers (8-byte
// loads of 16-bit ones) in a grid-stride loop; a 1-wide instantiation serves buffers that are
// not aligned for that (chunk views at odd offsets).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <optional>
#include <type_traits>

namespace heteromem {

struct NoLowp {};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else {
    return __half2float(x);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return __float2half_rn(x);
  }
}

// A pack of N elements moved with one load/store instruction (two for 32 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

inline bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Enough resident blocks to saturate memory bandwidth; grid-stride loops do the rest.
inline int grid_for(int64_t work_items, int threads) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (work_items + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, sms * 8)));
}

template <class Rule, typename GradT, typename LowpT, int N>
// NOTE: `grad` and `lowp` may be the same buffer (the runtime keeps a parameter's gradient in
// its own slot and writes the updated value back there); each element is read before it is
// written, by the same thread, so neither pointer is __restrict__.
__global__ void fused_step_kernel(float* __restrict__ param, const GradT* grad,
                                  float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq,
                                  LowpT* lowp, int64_t n, typename Rule::Scalars s) {
  const int64_t packs = n / N;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = tid; k < packs; k += stride) {
    const int64_t i = k * N;
    auto p = *reinterpret_cast<const Pack<float, N>*>(param + i);
    auto m = *reinterpret_cast<const Pack<float, N>*>(exp_avg + i);
    auto v = *reinterpret_cast<const Pack<float, N>*>(exp_avg_sq + i);
    const auto g = *reinterpret_cast<const Pack<GradT, N>*>(grad + i);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      p.v[j] = Rule::element(p.v[j], to_float(g.v[j]), m.v[j], v.v[j], s);
    }
    *reinterpret_cast<Pack<float, N>*>(param + i) = p;
    *reinterpret_cast<Pack<float, N>*>(exp_avg + i) = m;
    *reinterpret_cast<Pack<float, N>*>(exp_avg_sq + i) = v;
    if constexpr (!std::is_same_v<LowpT, NoLowp>) {
      Pack<LowpT, N> out;
#pragma unroll
      for (int j = 0; j < N; ++j) out.v[j] = from_float<LowpT>(p.v[j]);
      *reinterpret_cast<Pack<LowpT, N>*>(lowp + i) = out;
    }
  }
  // The last n % N elements, one per thread of the first warp.
  const int64_t i = packs * N + tid;
  if (i < n) {
    const float p = Rule::element(param[i], to_float(grad[i]), exp_avg[i], exp_avg_sq[i], s);
    param[i] = p;
    if constexpr (!std::is_same_v<LowpT, NoLowp>) lowp[i] = from_float<LowpT>(p);
  }
}

template <class Rule, typename GradT, typename LowpT>
void launch_fused_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                       const at::Tensor& exp_avg_sq, void* lowp_ptr,
                       const typename Rule::Scalars& s) {
  constexpr int kVec = 4;
  constexpr int kThreads = 256;
  const int64_t n = param.numel();  // > 0: the op returns early for empty buffers
  float* p = param.data_ptr<float>();
  const auto* g = static_cast<const GradT*>(grad.const_data_ptr());
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  auto* lowp = static_cast<LowpT*>(lowp_ptr);
  const bool vec_ok = aligned(p, 16) && aligned(m, 16) && aligned(v, 16) &&
                      aligned(g, sizeof(GradT) * kVec) &&
                      (lowp == nullptr || aligned(lowp, sizeof(LowpT) * kVec));
  const int blocks = grid_for(n / (vec_ok ? kVec : 1), kThreads);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto kernel = vec_ok ? fused_step_kernel<Rule, GradT, LowpT, kVec>
                             : fused_step_kernel<Rule, GradT, LowpT, 1>;
  kernel<<<blocks, kThreads, 0, stream>>>(p, g, m, v, lowp, n, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Picks the instantiation for the gradient's and the copy's dtypes.
template <class Rule>
void dispatch_fused_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                         const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& param_lowp,
                         const typename Rule::Scalars& s) {
  auto with_grad = [&](auto grad_tag) {
    using GradT = decltype(grad_tag);
    if (!param_lowp.has_value()) {
      launch_fused_step<Rule, GradT, NoLowp>(param, grad, exp_avg, exp_avg_sq, nullptr, s);
    } else if (param_lowp->scalar_type() == at::kBFloat16) {
      launch_fused_step<Rule, GradT, __nv_bfloat16>(param, grad, exp_avg, exp_avg_sq,
                                                    param_lowp->data_ptr(), s);
    } else {
      launch_fused_step<Rule, GradT, __half>(param, grad, exp_avg, exp_avg_sq,
                                             param_lowp->data_ptr(), s);
    }
  };
  switch (grad.scalar_type()) {
    case at::kBFloat16:
      return with_grad(__nv_bfloat16{});
    case at::kHalf:
      return with_grad(__half{});
    default:
      return with_grad(float{});
  }
}

}  // namespace heteromem
