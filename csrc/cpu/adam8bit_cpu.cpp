// CPU registration of heteromem::adam8bit_step_: validates tensors, then runs the SIMD core
// over the range in tasks of whole 8-bit blocks, shared out across torch's intra-op threads.
#include <torch/library.h>

#include "../common/optim_checks.h"
#include "adam8bit_core.h"
#include "cpu_op_support.h"
#include "parallel_tasks.h"

namespace heteromem {
namespace {

static_assert(kTaskElements % quant8::kBlock == 0, "a task must hold whole 8-bit blocks");

void adam8bit_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                       const at::Tensor& exp_avg_scale, const at::Tensor& exp_avg_sq,
                       const at::Tensor& exp_avg_sq_scale, int64_t step, double lr, double beta1,
                       double beta2, double eps, double weight_decay, bool adamw,
                       double grad_scale, const std::optional<at::Tensor>& param_lowp) {
  const AdamScalars scalars =
      check_adam8bit_args(param, grad, exp_avg, exp_avg_scale, exp_avg_sq, exp_avg_sq_scale,
                          step, lr, beta1, beta2, eps, weight_decay, adamw, grad_scale,
                          param_lowp);
  const cpu::Capability capability = active_capability_or_throw();
  cpu::Adam8bitBuffers buffers;
  buffers.param = param.data_ptr<float>();
  buffers.grad = grad.const_data_ptr();
  buffers.grad_type = elem_type(grad.scalar_type());
  buffers.exp_avg = exp_avg.data_ptr<uint8_t>();
  buffers.exp_avg_scale = exp_avg_scale.data_ptr<float>();
  buffers.exp_avg_sq = exp_avg_sq.data_ptr<uint8_t>();
  buffers.exp_avg_sq_scale = exp_avg_sq_scale.data_ptr<float>();
  if (param_lowp.has_value()) {
    buffers.param_lowp = param_lowp->data_ptr();
    buffers.lowp_type = elem_type(param_lowp->scalar_type());
  }
  parallel_tasks(param.numel(), kTaskElements, [&](int64_t begin, int64_t end) {
    cpu::adam8bit_update(buffers, scalars, begin, end, capability);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(heteromem, CPU, m) { m.impl("adam8bit_step_", &adam8bit_step_cpu); }

}  // namespace heteromem
