// CPU registration of heteromem::adam_step_: validates tensors, then runs the SIMD core over
// the range, shared out across torch's intra-op (OpenMP) threads.
#include <torch/library.h>

#include <stdexcept>

#include "../common/adam_checks.h"
#include "adam_core.h"
#include "cpu_op_support.h"
#include "parallel_tasks.h"

namespace heteromem {
namespace {

void adam_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, int64_t step, double lr, double beta1,
                   double beta2, double eps, double weight_decay, bool adamw, double grad_scale,
                   const std::optional<at::Tensor>& param_lowp) {
  const AdamScalars scalars = check_adam_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1,
                                              beta2, eps, weight_decay, adamw, grad_scale,
                                              param_lowp);
  const cpu::Capability capability = active_capability_or_throw();
  const cpu::AdamBuffers buffers = fp32_state_buffers(param, grad, exp_avg, exp_avg_sq, param_lowp);
  parallel_tasks(param.numel(), kTaskElements, [&](int64_t begin, int64_t end) {
    cpu::adam_update(buffers, scalars, begin, end, capability);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(heteromem, CPU, m) { m.impl("adam_step_", &adam_step_cpu); }

}  // namespace heteromem
