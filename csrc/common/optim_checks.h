// Argument checks shared by the CPU and CUDA registrations of heteromem::agd_step_ and
// heteromem::adam8bit_step_ (adam_checks.h does the same for adam_step_). Errors name the op
// and the argument and say what to pass instead; TORCH_CHECK_TYPE / _VALUE surface in Python
// as TypeError / ValueError.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "agd_math.h"
#include "quant8_math.h"

namespace heteromem {

// `t` lives beside `param`, is contiguous, has `dtype` and `numel` elements.
inline void check_buffer(const char* op, const at::Tensor& t, const char* name,
                         const at::Tensor& param, at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == param.device(), op, ": ", name, " is on ", t.device(),
                    " but param is on ", param.device(), "; move all tensors to one device");
  TORCH_CHECK_VALUE(t.numel() == numel, op, ": ", name, " has ", t.numel(), " elements but ",
                    numel, " are needed for param's ", param.numel(), "; pass buffers sized ",
                    "for it");
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name,
                    " must be contiguous; call .contiguous() or pass a flat chunk view");
}

// param (fp32), grad (fp32/bf16/fp16) and the optional low-precision copy (bf16/fp16).
inline void check_param_grad(const char* op, const at::Tensor& param, const at::Tensor& grad,
                             const std::optional<at::Tensor>& param_lowp) {
  TORCH_CHECK_TYPE(param.scalar_type() == at::kFloat, op, ": param must be float32, got ",
                   param.scalar_type());
  TORCH_CHECK_VALUE(param.is_contiguous(), op, ": param must be contiguous");
  const auto gt = grad.scalar_type();
  TORCH_CHECK_TYPE(gt == at::kFloat || gt == at::kBFloat16 || gt == at::kHalf, op,
                   ": grad must be float32, bfloat16 or float16, got ", gt);
  check_buffer(op, grad, "grad", param, gt, param.numel());
  if (param_lowp.has_value()) {
    const auto lt = param_lowp->scalar_type();
    TORCH_CHECK_TYPE(lt == at::kBFloat16 || lt == at::kHalf, op,
                     ": param_lowp must be bfloat16 or float16, got ", lt);
    check_buffer(op, *param_lowp, "param_lowp", param, lt, param.numel());
  }
}

inline void check_step_lr_betas(const char* op, int64_t step, double lr, double beta1,
                                double beta2, double weight_decay, double grad_scale) {
  TORCH_CHECK_VALUE(step >= 1, op, ": step must be >= 1 (the count after this update), got ",
                    step);
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0, op, ": lr must be finite and >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1, op, ": betas[0] must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0 && beta2 < 1, op, ": betas[1] must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(std::isfinite(weight_decay) && weight_decay >= 0, op,
                    ": weight_decay must be finite and >= 0, got ", weight_decay);
  TORCH_CHECK_VALUE(std::isfinite(grad_scale) && grad_scale > 0, op,
                    ": grad_scale must be finite and > 0, got ", grad_scale);
}

inline AgdScalars check_agd_args(const at::Tensor& param, const at::Tensor& grad,
                                 const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                 int64_t step, double lr, double beta1, double beta2,
                                 double delta, double weight_decay, double grad_scale,
                                 const std::optional<at::Tensor>& param_lowp) {
  constexpr const char* op = "agd_step_";
  check_param_grad(op, param, grad, param_lowp);
  check_buffer(op, exp_avg, "exp_avg", param, at::kFloat, param.numel());
  check_buffer(op, exp_avg_sq, "exp_avg_sq", param, at::kFloat, param.numel());
  check_step_lr_betas(op, step, lr, beta1, beta2, weight_decay, grad_scale);
  TORCH_CHECK_VALUE(std::isfinite(delta) && delta >= 0, op,
                    ": delta must be finite and >= 0, got ", delta);
  return make_agd_scalars(step, lr, beta1, beta2, delta, weight_decay, grad_scale);
}

// Number of block scales for n elements.
inline int64_t quant8_blocks(int64_t n) { return (n + quant8::kBlock - 1) / quant8::kBlock; }

inline AdamScalars check_adam8bit_args(const at::Tensor& param, const at::Tensor& grad,
                                       const at::Tensor& exp_avg, const at::Tensor& exp_avg_scale,
                                       const at::Tensor& exp_avg_sq,
                                       const at::Tensor& exp_avg_sq_scale, int64_t step,
                                       double lr, double beta1, double beta2, double eps,
                                       double weight_decay, bool adamw, double grad_scale,
                                       const std::optional<at::Tensor>& param_lowp) {
  constexpr const char* op = "adam8bit_step_";
  check_param_grad(op, param, grad, param_lowp);
  const int64_t n = param.numel();
  check_buffer(op, exp_avg, "exp_avg", param, at::kByte, n);
  check_buffer(op, exp_avg_scale, "exp_avg_scale", param, at::kFloat, quant8_blocks(n));
  check_buffer(op, exp_avg_sq, "exp_avg_sq", param, at::kByte, n);
  check_buffer(op, exp_avg_sq_scale, "exp_avg_sq_scale", param, at::kFloat, quant8_blocks(n));
  check_step_lr_betas(op, step, lr, beta1, beta2, weight_decay, grad_scale);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ",
                    eps);
  return make_adam_scalars(step, lr, beta1, beta2, eps, weight_decay, adamw, grad_scale);
}

}  // namespace heteromem
