// CUDA registration of heteromem::agd_step_: one launch per call on the current stream. The
// kernel is fused_step.cuh's elementwise loop with agd_element from common/agd_math.h (FMA
// contraction disabled), so results equal the CPU op bit for bit.
#include <torch/library.h>

#include "../common/optim_checks.h"
#include "fused_step.cuh"

namespace heteromem {
namespace {

struct AgdRule {
  using Scalars = AgdScalars;
  static __device__ __forceinline__ float element(float p, float g, float& m, float& v,
                                                  const AgdScalars& s) {
    return agd_element(p, g, m, v, s);
  }
};

void agd_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, int64_t step, double lr, double beta1,
                   double beta2, double delta, double weight_decay, double grad_scale,
                   const std::optional<at::Tensor>& param_lowp) {
  const AgdScalars s = check_agd_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2,
                                      delta, weight_decay, grad_scale, param_lowp);
  if (param.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  dispatch_fused_step<AgdRule>(param, grad, exp_avg, exp_avg_sq, param_lowp, s);
}

}  // namespace

TORCH_LIBRARY_IMPL(heteromem, CUDA, m) { m.impl("agd_step_", &agd_step_cuda); }

}  // namespace heteromem
