// The vector loop shared by the AVX2 and AVX-512 paths, written once over a `Vec` traits type
// (width, set1/loadu/storeu, add/sub/mul/div/sqrt, load_grad<G>, store_lowp<L>).
//
// Include it *after* switching the target on (#pragma GCC target / clang attribute push) so
// the instantiations are compiled for that target; everything here has internal linkage, so
// the two paths' copies never mix at link time. Operation order is adam_element's
// (common/adam_math.h), so every path gives bit-identical results.
#pragma once

#include "adam_core_tail.h"

namespace heteromem::cpu {
namespace {

template <class Vec, ElemType G, ElemType L>
void update_simd(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  using V = typename Vec::V;
  const V inv_grad_scale = Vec::set1(s.inv_grad_scale);
  const V l2 = Vec::set1(s.l2_weight_decay);
  const V decay = Vec::set1(s.decay_factor);
  const V beta1 = Vec::set1(s.beta1);
  const V one_minus_beta1 = Vec::set1(s.one_minus_beta1);
  const V beta2 = Vec::set1(s.beta2);
  const V one_minus_beta2 = Vec::set1(s.one_minus_beta2);
  const V inv_bc2 = Vec::set1(s.inv_bias_corr2_sqrt);
  const V eps = Vec::set1(s.eps);
  const V step_size = Vec::set1(s.step_size);
  int64_t i = begin;
  for (; i + Vec::kWidth <= end; i += Vec::kWidth) {
    V p = Vec::loadu(b.param + i);
    V g = Vec::mul(Vec::template load_grad<G>(b.grad, i), inv_grad_scale);
    if (s.use_l2) g = Vec::add(g, Vec::mul(p, l2));
    if (s.use_decay) p = Vec::mul(p, decay);
    const V m = Vec::add(Vec::mul(Vec::loadu(b.exp_avg + i), beta1), Vec::mul(g, one_minus_beta1));
    const V v = Vec::add(Vec::mul(Vec::loadu(b.exp_avg_sq + i), beta2),
                         Vec::mul(Vec::mul(g, g), one_minus_beta2));
    const V denom = Vec::add(Vec::mul(Vec::sqrt(v), inv_bc2), eps);
    p = Vec::sub(p, Vec::mul(Vec::div(m, denom), step_size));
    Vec::storeu(b.exp_avg + i, m);
    Vec::storeu(b.exp_avg_sq + i, v);
    Vec::storeu(b.param + i, p);
    Vec::template store_lowp<L>(b.param_lowp, i, p);
  }
  adam_elements(b, s, i, end);
}

template <class Vec, ElemType G>
void dispatch_lowp(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  switch (b.lowp_type) {
    case ElemType::kBFloat16:
      return update_simd<Vec, G, ElemType::kBFloat16>(b, s, begin, end);
    case ElemType::kFloat16:
      return update_simd<Vec, G, ElemType::kFloat16>(b, s, begin, end);
    default:
      return update_simd<Vec, G, ElemType::kNone>(b, s, begin, end);
  }
}

template <class Vec>
void adam_update_simd(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  switch (b.grad_type) {
    case ElemType::kBFloat16:
      return dispatch_lowp<Vec, ElemType::kBFloat16>(b, s, begin, end);
    case ElemType::kFloat16:
      return dispatch_lowp<Vec, ElemType::kFloat16>(b, s, begin, end);
    default:
      return dispatch_lowp<Vec, ElemType::kFloat32>(b, s, begin, end);
  }
}

}  // namespace
}  // namespace heteromem::cpu
