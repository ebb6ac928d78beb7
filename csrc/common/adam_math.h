// Adam/AdamW arithmetic shared by every implementation (scalar, AVX2, AVX-512, CUDA).
//
// Why one header: the CPU paths, the CUDA kernel and the pure-PyTorch reference in
// heteromem/ops/reference.py all perform the *same* sequence of IEEE-rounded operations
// (no fused multiply-add, sqrt and division correctly rounded), so they agree bit for bit.
// That lets the chunk runtime update a chunk on the host or on the device and get the same
// numbers, and lets tests compare implementations exactly instead of with a tolerance.
//
// The hyper-parameter scalars are computed in double and rounded to float once, exactly as
// PyTorch rounds a Python float scalar when it multiplies a float32 tensor by it.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace heteromem {

struct AdamScalars {
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float l2_weight_decay;     // Adam (adamw=false): grad += wd * param; 0 when unused
  float decay_factor;        // AdamW: param *= 1 - lr * wd; 1 when unused
  float step_size;           // lr / (1 - beta1^step)
  float inv_bias_corr2_sqrt; // 1 / sqrt(1 - beta2^step)
  float inv_grad_scale;      // 1 / grad_scale (loss scaling), as torch's GradScaler
  bool use_l2;
  bool use_decay;
};

// Precomputes the per-call scalars. `step` is the 1-based step count after increment, as
// torch.optim.AdamW uses it for bias correction.
inline AdamScalars make_adam_scalars(int64_t step, double lr, double beta1, double beta2,
                                     double eps, double weight_decay, bool adamw,
                                     double grad_scale) {
  AdamScalars s;
  const double bias_corr1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_corr2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.use_l2 = !adamw && weight_decay != 0.0;
  s.use_decay = adamw && weight_decay != 0.0;
  s.l2_weight_decay = s.use_l2 ? static_cast<float>(weight_decay) : 0.0f;
  s.decay_factor = s.use_decay ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  s.step_size = static_cast<float>(lr / bias_corr1);
  s.inv_bias_corr2_sqrt = static_cast<float>(1.0 / std::sqrt(bias_corr2));
  s.inv_grad_scale = static_cast<float>(1.0 / grad_scale);
  return s;
}

// Rounded float operations that the compiler may not contract into FMAs on the device
// (the host sources are compiled with -ffp-contract=off for the same reason).
HM_HOST_DEVICE float hm_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
HM_HOST_DEVICE float hm_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
HM_HOST_DEVICE float hm_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
HM_HOST_DEVICE float hm_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
HM_HOST_DEVICE float hm_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// One element of the update. The SIMD paths replicate this order operation by operation.
HM_HOST_DEVICE float adam_element(float param, float grad, float& exp_avg, float& exp_avg_sq,
                                  const AdamScalars& s) {
  float g = hm_mul(grad, s.inv_grad_scale);
  if (s.use_l2) g = hm_add(g, hm_mul(param, s.l2_weight_decay));
  if (s.use_decay) param = hm_mul(param, s.decay_factor);
  const float m = hm_add(hm_mul(exp_avg, s.beta1), hm_mul(g, s.one_minus_beta1));
  const float v = hm_add(hm_mul(exp_avg_sq, s.beta2), hm_mul(hm_mul(g, g), s.one_minus_beta2));
  const float denom = hm_add(hm_mul(hm_sqrt(v), s.inv_bias_corr2_sqrt), s.eps);
  exp_avg = m;
  exp_avg_sq = v;
  return hm_sub(param, hm_mul(hm_div(m, denom), s.step_size));
}

}  // namespace heteromem
