// AGD arithmetic (Yue et al., "AGD: an Auto-switchable Optimizer using Stepwise Gradient
// Difference for Preconditioning Matrix", NeurIPS 2023) shared by every implementation.
//
// The rule, per element, with t the step count after this update:
//   m_t = beta1 m_{t-1} + (1 - beta1) g_t
//   s_t = m_t / (1 - beta1^t) - m_{t-1} / (1 - beta1^(t-1))    (s_1 = m_1 / (1 - beta1))
//   b_t = beta2 b_{t-1} + (1 - beta2) s_t^2
//   p  -= lr sqrt(1 - beta2^t) / (1 - beta1^t) * m_t / max(sqrt(b_t), delta sqrt(1 - beta2^t))
// with decoupled weight decay (p *= 1 - lr wd) first. The second moment tracks the step-to-step
// difference of the bias-corrected first moment; where its root falls below the floor the
// update is SGD with momentum (the paper's auto-switch).
//
// As for Adam (adam_math.h): every operation is an IEEE-rounded float operation in a fixed
// order with no fused multiply-add, and the scalars are computed in double and rounded once,
// so the CPU paths, the CUDA kernel and the PyTorch reference agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/adam_math.h"

namespace heteromem {

struct AgdScalars {
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float inv_bias_corr1;       // 1 / (1 - beta1^t)
  float inv_bias_corr1_prev;  // 1 / (1 - beta1^(t-1)); 0 at t = 1, where m_0 = 0
  float floor;                // delta * sqrt(1 - beta2^t): the least root of b_t used
  float decay_factor;         // 1 - lr * weight_decay; 1 when unused
  float step_size;            // lr * sqrt(1 - beta2^t) / (1 - beta1^t)
  float inv_grad_scale;       // 1 / grad_scale (loss scaling)
  bool use_decay;
};

inline AgdScalars make_agd_scalars(int64_t step, double lr, double beta1, double beta2,
                                   double delta, double weight_decay, double grad_scale) {
  const double t = static_cast<double>(step);
  const double bias_corr1 = 1.0 - std::pow(beta1, t);
  const double bias_corr2 = 1.0 - std::pow(beta2, t);
  AgdScalars s;
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.inv_bias_corr1 = static_cast<float>(1.0 / bias_corr1);
  s.inv_bias_corr1_prev =
      step > 1 ? static_cast<float>(1.0 / (1.0 - std::pow(beta1, t - 1.0))) : 0.0f;
  s.floor = static_cast<float>(delta * std::sqrt(bias_corr2));
  s.use_decay = weight_decay != 0.0;
  s.decay_factor = s.use_decay ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  s.step_size = static_cast<float>(lr * std::sqrt(bias_corr2) / bias_corr1);
  s.inv_grad_scale = static_cast<float>(1.0 / grad_scale);
  return s;
}

// max(root, floor) that keeps a NaN root (so a NaN gradient poisons its parameter, as in
// PyTorch) and matches the x86 maxps(floor, root) instruction operand for operand.
HM_HOST_DEVICE float agd_floor(float root, float floor) { return floor > root ? floor : root; }

// One element of the update. The SIMD paths replicate this order operation by operation.
HM_HOST_DEVICE float agd_element(float param, float grad, float& exp_avg, float& exp_avg_sq,
                                 const AgdScalars& s) {
  const float g = hm_mul(grad, s.inv_grad_scale);
  if (s.use_decay) param = hm_mul(param, s.decay_factor);
  const float m = hm_add(hm_mul(exp_avg, s.beta1), hm_mul(g, s.one_minus_beta1));
  const float diff = hm_sub(hm_mul(m, s.inv_bias_corr1), hm_mul(exp_avg, s.inv_bias_corr1_prev));
  const float v =
      hm_add(hm_mul(exp_avg_sq, s.beta2), hm_mul(hm_mul(diff, diff), s.one_minus_beta2));
  const float denom = agd_floor(hm_sqrt(v), s.floor);
  exp_avg = m;
  exp_avg_sq = v;
  return hm_sub(param, hm_mul(hm_div(m, denom), s.step_size));
}

}  // namespace heteromem
