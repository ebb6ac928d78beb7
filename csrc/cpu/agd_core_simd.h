// AGD's per-element maths on a vector of `Vec` lanes, in agd_element's operation order
// (common/agd_math.h), so every path gives bit-identical results. Include after switching
// the target on.
#pragma once

#include "adam_core_tail.h"

namespace heteromem::cpu {
namespace {

template <class Vec>
struct AgdRule {
  using V = typename Vec::V;
  const AgdScalars& s;
  const bool scale_grad, use_decay;
  const V inv_grad_scale, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc1,
      inv_bc1_prev, floor, step_size;

  explicit AgdRule(const AgdScalars& scalars)
      : s(scalars),
        // NOTE: g * 1 == g (NaN payloads aside), so skipping the multiply changes no result.
        scale_grad(scalars.inv_grad_scale != 1.0f),
        use_decay(scalars.use_decay),
        inv_grad_scale(Vec::set1(scalars.inv_grad_scale)),
        decay(Vec::set1(scalars.decay_factor)),
        beta1(Vec::set1(scalars.beta1)),
        one_minus_beta1(Vec::set1(scalars.one_minus_beta1)),
        beta2(Vec::set1(scalars.beta2)),
        one_minus_beta2(Vec::set1(scalars.one_minus_beta2)),
        inv_bc1(Vec::set1(scalars.inv_bias_corr1)),
        inv_bc1_prev(Vec::set1(scalars.inv_bias_corr1_prev)),
        floor(Vec::set1(scalars.floor)),
        step_size(Vec::set1(scalars.step_size)) {}

  // Updates m and v in place; returns the new parameter.
  V apply(V p, V g, V& m, V& v) const {
    if (scale_grad) g = Vec::mul(g, inv_grad_scale);
    if (use_decay) p = Vec::mul(p, decay);
    const V m_new = Vec::add(Vec::mul(m, beta1), Vec::mul(g, one_minus_beta1));
    const V diff = Vec::sub(Vec::mul(m_new, inv_bc1), Vec::mul(m, inv_bc1_prev));
    v = Vec::add(Vec::mul(v, beta2), Vec::mul(Vec::mul(diff, diff), one_minus_beta2));
    // maxps(floor, root) == agd_floor(root, floor), NaN root included.
    const V denom = Vec::max(floor, Vec::sqrt(v));
    m = m_new;
    return Vec::sub(p, Vec::mul(Vec::div(m_new, denom), step_size));
  }

  void tail(const AdamBuffers& b, int64_t begin, int64_t end) const {
    agd_elements(b, s, begin, end);
  }
};

}  // namespace
}  // namespace heteromem::cpu
