// CUDA registration of heteromem::adam_step_: one launch per call on the current stream. The
// kernel is fused_step.cuh's elementwise loop with adam_element from common/adam_math.h (FMA
// contraction disabled), so results equal the CPU op bit for bit.
#include <torch/library.h>

#include "../common/adam_checks.h"
#include "fused_step.cuh"

namespace heteromem {
namespace {

struct AdamRule {
  using Scalars = AdamScalars;
  static __device__ __forceinline__ float element(float p, float g, float& m, float& v,
                                                  const AdamScalars& s) {
    return adam_element(p, g, m, v, s);
  }
};

void adam_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                    const at::Tensor& exp_avg_sq, int64_t step, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool adamw, double grad_scale,
                    const std::optional<at::Tensor>& param_lowp) {
  const AdamScalars s = check_adam_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2,
                                        eps, weight_decay, adamw, grad_scale, param_lowp);
  if (param.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  dispatch_fused_step<AdamRule>(param, grad, exp_avg, exp_avg_sq, param_lowp, s);
}

}  // namespace

TORCH_LIBRARY_IMPL(heteromem, CUDA, m) { m.impl("adam_step_", &adam_step_cuda); }

}  // namespace heteromem
