// CUDA registration of heteromem::adam8bit_step_: one launch per call on the current stream.
//
// One warp per block of quant8::kBlock = 256 elements, 8 consecutive elements per lane: decode
// both moments, adam_element, then the block's largest magnitudes by a warp-wide integer max
// (exact, order-free), and encode against the new scales. The element maths and the codes are
// csrc/common's (FMA contraction disabled), so results equal the CPU op bit for bit. Loads are
// 16-byte packs where every pointer is aligned for them, element by element otherwise and in
// a partial last block.
#include <torch/library.h>

#include "../common/optim_checks.h"
#include "fused_step.cuh"

namespace heteromem {
namespace {

constexpr int kPerLane = 8;
static_assert(quant8::kBlock == 32 * kPerLane, "a warp covers one 8-bit block");

__device__ __forceinline__ uint32_t warp_max(uint32_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

template <typename GradT, typename LowpT, bool kVec>
// NOTE: `grad` and `lowp` may be the same buffer (see fused_step.cuh); each lane reads its
// elements' gradients before it writes their copies.
__global__ void adam8bit_kernel(float* __restrict__ param, const GradT* grad,
                                uint8_t* __restrict__ m_codes, float* __restrict__ m_scales,
                                uint8_t* __restrict__ v_codes, float* __restrict__ v_scales,
                                LowpT* lowp, int64_t n, AdamScalars s) {
  namespace q8 = quant8;
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t blocks = (n + q8::kBlock - 1) / q8::kBlock;
  for (int64_t q = warp; q < blocks; q += warps) {  // uniform per warp: every lane shuffles
    const int64_t base = q * q8::kBlock + lane * kPerLane;
    const float m_scale = m_scales[q];
    const float v_scale = v_scales[q];
    float m[kPerLane], v[kPerLane];
    uint32_t m_max = 0, v_max = 0;
    const bool whole = kVec && base + kPerLane <= n;
    if (whole) {
      auto p = *reinterpret_cast<const Pack<float, kPerLane>*>(param + base);
      const auto g = *reinterpret_cast<const Pack<GradT, kPerLane>*>(grad + base);
      const auto mc = *reinterpret_cast<const Pack<uint8_t, kPerLane>*>(m_codes + base);
      const auto vc = *reinterpret_cast<const Pack<uint8_t, kPerLane>*>(v_codes + base);
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        m[j] = hm_mul(q8::decode_exp_avg(mc.v[j]), m_scale);
        v[j] = hm_mul(q8::decode_exp_avg_sq(vc.v[j]), v_scale);
        p.v[j] = adam_element(p.v[j], to_float(g.v[j]), m[j], v[j], s);
      }
      *reinterpret_cast<Pack<float, kPerLane>*>(param + base) = p;
      if constexpr (!std::is_same_v<LowpT, NoLowp>) {
        Pack<LowpT, kPerLane> out;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) out.v[j] = from_float<LowpT>(p.v[j]);
        *reinterpret_cast<Pack<LowpT, kPerLane>*>(lowp + base) = out;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int64_t i = base + j;
        m[j] = 0.0f;
        v[j] = 0.0f;
        if (i < n) {
          m[j] = hm_mul(q8::decode_exp_avg(m_codes[i]), m_scale);
          v[j] = hm_mul(q8::decode_exp_avg_sq(v_codes[i]), v_scale);
          const float p = adam_element(param[i], to_float(grad[i]), m[j], v[j], s);
          param[i] = p;
          if constexpr (!std::is_same_v<LowpT, NoLowp>) lowp[i] = from_float<LowpT>(p);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {  // elements past n hold 0, which changes no maximum
      m_max = max(m_max, q8::bits_of(m[j]) & q8::kMagnitudeMask);
      v_max = max(v_max, q8::bits_of(v[j]) & q8::kMagnitudeMask);
    }
    const q8::BlockScale ms = q8::block_scale(warp_max(m_max), q8::kExpAvgMax);
    const q8::BlockScale vs = q8::block_scale(warp_max(v_max), q8::kExpAvgSqMax);
    if (lane == 0) {
      m_scales[q] = ms.scale;
      v_scales[q] = vs.scale;
    }
    Pack<uint8_t, kPerLane> mc, vc;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      mc.v[j] = static_cast<uint8_t>(ms.encode ? q8::encode_exp_avg(m[j], ms.inv) : 0u);
      vc.v[j] = static_cast<uint8_t>(vs.encode ? q8::encode_exp_avg_sq(v[j], vs.inv) : 0u);
    }
    if (whole) {
      *reinterpret_cast<Pack<uint8_t, kPerLane>*>(m_codes + base) = mc;
      *reinterpret_cast<Pack<uint8_t, kPerLane>*>(v_codes + base) = vc;
    } else {
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        if (base + j < n) {
          m_codes[base + j] = mc.v[j];
          v_codes[base + j] = vc.v[j];
        }
      }
    }
  }
}

template <typename GradT, typename LowpT>
void launch_adam8bit(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_scale, const at::Tensor& exp_avg_sq,
                     const at::Tensor& exp_avg_sq_scale, void* lowp_ptr, const AdamScalars& s) {
  constexpr int kThreads = 256;
  const int64_t n = param.numel();  // > 0: the op returns early for empty buffers
  float* p = param.data_ptr<float>();
  const auto* g = static_cast<const GradT*>(grad.const_data_ptr());
  uint8_t* mc = exp_avg.data_ptr<uint8_t>();
  uint8_t* vc = exp_avg_sq.data_ptr<uint8_t>();
  float* ms = exp_avg_scale.data_ptr<float>();
  float* vs = exp_avg_sq_scale.data_ptr<float>();
  auto* lowp = static_cast<LowpT*>(lowp_ptr);
  const bool vec_ok = aligned(p, sizeof(float) * kPerLane) &&
                      aligned(g, sizeof(GradT) * kPerLane) && aligned(mc, kPerLane) &&
                      aligned(vc, kPerLane) &&
                      (lowp == nullptr || aligned(lowp, sizeof(LowpT) * kPerLane));
  const int64_t warps = (n + quant8::kBlock - 1) / quant8::kBlock;
  const int grid = grid_for(warps * 32, kThreads);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto kernel = vec_ok ? adam8bit_kernel<GradT, LowpT, true>
                             : adam8bit_kernel<GradT, LowpT, false>;
  kernel<<<grid, kThreads, 0, stream>>>(p, g, mc, ms, vc, vs, lowp, n, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adam8bit_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_scale, const at::Tensor& exp_avg_sq,
                        const at::Tensor& exp_avg_sq_scale, int64_t step, double lr, double beta1,
                        double beta2, double eps, double weight_decay, bool adamw,
                        double grad_scale, const std::optional<at::Tensor>& param_lowp) {
  const AdamScalars s =
      check_adam8bit_args(param, grad, exp_avg, exp_avg_scale, exp_avg_sq, exp_avg_sq_scale,
                          step, lr, beta1, beta2, eps, weight_decay, adamw, grad_scale,
                          param_lowp);
  if (param.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  auto with_grad = [&](auto grad_tag) {
    using GradT = decltype(grad_tag);
    if (!param_lowp.has_value()) {
      launch_adam8bit<GradT, NoLowp>(param, grad, exp_avg, exp_avg_scale, exp_avg_sq,
                                     exp_avg_sq_scale, nullptr, s);
    } else if (param_lowp->scalar_type() == at::kBFloat16) {
      launch_adam8bit<GradT, __nv_bfloat16>(param, grad, exp_avg, exp_avg_scale, exp_avg_sq,
                                            exp_avg_sq_scale, param_lowp->data_ptr(), s);
    } else {
      launch_adam8bit<GradT, __half>(param, grad, exp_avg, exp_avg_scale, exp_avg_sq,
                                     exp_avg_sq_scale, param_lowp->data_ptr(), s);
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

}  // namespace

TORCH_LIBRARY_IMPL(heteromem, CUDA, m) { m.impl("adam8bit_step_", &adam8bit_step_cuda); }

}  // namespace heteromem
