// Argument checks shared by the CPU and CUDA registrations of heteromem::adam_step_.
// Errors name the argument and say what to pass instead; TORCH_CHECK_TYPE / _VALUE surface in
// Python as TypeError / ValueError.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "adam_math.h"

namespace heteromem {

inline void check_adam_tensor(const at::Tensor& t, const char* name, const at::Tensor& param) {
  TORCH_CHECK_VALUE(t.device() == param.device(), "adam_step_: ", name, " is on ", t.device(),
                    " but param is on ", param.device(), "; move all tensors to one device");
  TORCH_CHECK_VALUE(t.numel() == param.numel(), "adam_step_: ", name, " has ", t.numel(),
                    " elements but param has ", param.numel(), "; pass buffers of equal size");
  TORCH_CHECK_VALUE(t.is_contiguous(), "adam_step_: ", name,
                    " must be contiguous; call .contiguous() or pass a flat chunk view");
}

inline AdamScalars check_adam_args(const at::Tensor& param, const at::Tensor& grad,
                                   const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                   int64_t step, double lr, double beta1, double beta2,
                                   double eps, double weight_decay, bool adamw,
                                   double grad_scale,
                                   const std::optional<at::Tensor>& param_lowp) {
  TORCH_CHECK_TYPE(param.scalar_type() == at::kFloat, "adam_step_: param must be float32, got ",
                   param.scalar_type());
  TORCH_CHECK_VALUE(param.is_contiguous(), "adam_step_: param must be contiguous");
  TORCH_CHECK_TYPE(exp_avg.scalar_type() == at::kFloat,
                   "adam_step_: exp_avg must be float32, got ", exp_avg.scalar_type());
  TORCH_CHECK_TYPE(exp_avg_sq.scalar_type() == at::kFloat,
                   "adam_step_: exp_avg_sq must be float32, got ", exp_avg_sq.scalar_type());
  const auto gt = grad.scalar_type();
  TORCH_CHECK_TYPE(gt == at::kFloat || gt == at::kBFloat16 || gt == at::kHalf,
                   "adam_step_: grad must be float32, bfloat16 or float16, got ", gt);
  check_adam_tensor(grad, "grad", param);
  check_adam_tensor(exp_avg, "exp_avg", param);
  check_adam_tensor(exp_avg_sq, "exp_avg_sq", param);
  if (param_lowp.has_value()) {
    const auto lt = param_lowp->scalar_type();
    TORCH_CHECK_TYPE(lt == at::kBFloat16 || lt == at::kHalf,
                     "adam_step_: param_lowp must be bfloat16 or float16, got ", lt);
    check_adam_tensor(*param_lowp, "param_lowp", param);
  }
  TORCH_CHECK_VALUE(step >= 1, "adam_step_: step must be >= 1 (the count after this update), got ",
                    step);
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0, "adam_step_: lr must be finite and >= 0, got ",
                    lr);
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1, "adam_step_: betas[0] must be in [0, 1), got ",
                    beta1);
  TORCH_CHECK_VALUE(beta2 >= 0 && beta2 < 1, "adam_step_: betas[1] must be in [0, 1), got ",
                    beta2);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "adam_step_: eps must be finite and >= 0, got ",
                    eps);
  TORCH_CHECK_VALUE(std::isfinite(weight_decay) && weight_decay >= 0,
                    "adam_step_: weight_decay must be finite and >= 0, got ", weight_decay);
  TORCH_CHECK_VALUE(std::isfinite(grad_scale) && grad_scale > 0,
                    "adam_step_: grad_scale must be finite and > 0, got ", grad_scale);
  return make_adam_scalars(step, lr, beta1, beta2, eps, weight_decay, adamw, grad_scale);
}

}  // namespace heteromem
