// Adam's per-element maths on a vector of `Vec` lanes, in adam_element's operation order
// (common/adam_math.h), so every path gives bit-identical results. Used by the fp32-state
// loop (fused_loop_simd.h) and the 8-bit-state loop (adam8bit_core_simd.h). Include after
// switching the target on.
#pragma once

#include "adam_core_tail.h"

namespace heteromem::cpu {
namespace {

template <class Vec>
struct AdamRule {
  using V = typename Vec::V;
  // The flags are copied: a member read through a float* store's alias could not be
  // hoisted out of the loop.
  const AdamScalars& s;
  const bool scale_grad, use_l2, use_decay;
  const V inv_grad_scale, l2, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc2,
      eps, step_size;

  explicit AdamRule(const AdamScalars& scalars)
      : s(scalars),
        // NOTE: g * 1 == g (NaN payloads aside), so skipping the multiply changes no result.
        scale_grad(scalars.inv_grad_scale != 1.0f),
        use_l2(scalars.use_l2),
        use_decay(scalars.use_decay),
        inv_grad_scale(Vec::set1(scalars.inv_grad_scale)),
        l2(Vec::set1(scalars.l2_weight_decay)),
        decay(Vec::set1(scalars.decay_factor)),
        beta1(Vec::set1(scalars.beta1)),
        one_minus_beta1(Vec::set1(scalars.one_minus_beta1)),
        beta2(Vec::set1(scalars.beta2)),
        one_minus_beta2(Vec::set1(scalars.one_minus_beta2)),
        inv_bc2(Vec::set1(scalars.inv_bias_corr2_sqrt)),
        eps(Vec::set1(scalars.eps)),
        step_size(Vec::set1(scalars.step_size)) {}

  // Updates m and v in place; returns the new parameter.
  V apply(V p, V g, V& m, V& v) const {
    if (scale_grad) g = Vec::mul(g, inv_grad_scale);
    if (use_l2) g = Vec::add(g, Vec::mul(p, l2));
    if (use_decay) p = Vec::mul(p, decay);
    m = Vec::add(Vec::mul(m, beta1), Vec::mul(g, one_minus_beta1));
    v = Vec::add(Vec::mul(v, beta2), Vec::mul(Vec::mul(g, g), one_minus_beta2));
    const V denom = Vec::add(Vec::mul(Vec::sqrt(v), inv_bc2), eps);
    return Vec::sub(p, Vec::mul(Vec::div(m, denom), step_size));
  }

  void tail(const AdamBuffers& b, int64_t begin, int64_t end) const {
    adam_elements(b, s, begin, end);
  }
};

}  // namespace
}  // namespace heteromem::cpu
