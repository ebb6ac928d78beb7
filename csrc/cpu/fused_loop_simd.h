// The vector loop of the fp32-state optimizers (Adam, AGD), written once over a `Vec` traits
// type (vec_avx2.h, vec_avx512.h) and a `Rule` holding one optimizer's per-element maths:
// load param, grad, exp_avg, exp_avg_sq; `rule.apply`; store the three states and the
// optional low-precision copy; the scalar tail is the rule's element function.
//
// Include it *after* switching the target on, as the traits; everything here has internal
// linkage, so each path's copies never mix at link time.
#pragma once

#include "adam_core_tail.h"

namespace heteromem::cpu {
namespace {

template <class Vec, class Rule, ElemType G, ElemType L>
void fused_loop(const AdamBuffers& b, const Rule& rule, int64_t begin, int64_t end) {
  using V = typename Vec::V;
  int64_t i = begin;
  for (; i + Vec::kWidth <= end; i += Vec::kWidth) {
    V m = Vec::loadu(b.exp_avg + i);
    V v = Vec::loadu(b.exp_avg_sq + i);
    const V p = rule.apply(Vec::loadu(b.param + i), Vec::template load_grad<G>(b.grad, i), m, v);
    Vec::storeu(b.exp_avg + i, m);
    Vec::storeu(b.exp_avg_sq + i, v);
    Vec::storeu(b.param + i, p);
    Vec::template store_lowp<L>(b.param_lowp, i, p);
  }
  rule.tail(b, i, end);
}

template <class Vec, class Rule, ElemType G>
void fused_dispatch_lowp(const AdamBuffers& b, const Rule& rule, int64_t begin, int64_t end) {
  switch (b.lowp_type) {
    case ElemType::kBFloat16:
      return fused_loop<Vec, Rule, G, ElemType::kBFloat16>(b, rule, begin, end);
    case ElemType::kFloat16:
      return fused_loop<Vec, Rule, G, ElemType::kFloat16>(b, rule, begin, end);
    default:
      return fused_loop<Vec, Rule, G, ElemType::kNone>(b, rule, begin, end);
  }
}

// Picks the instantiation for the buffers' grad and copy dtypes.
template <class Vec, class Rule>
void fused_dispatch(const AdamBuffers& b, const Rule& rule, int64_t begin, int64_t end) {
  switch (b.grad_type) {
    case ElemType::kBFloat16:
      return fused_dispatch_lowp<Vec, Rule, ElemType::kBFloat16>(b, rule, begin, end);
    case ElemType::kFloat16:
      return fused_dispatch_lowp<Vec, Rule, ElemType::kFloat16>(b, rule, begin, end);
    default:
      return fused_dispatch_lowp<Vec, Rule, ElemType::kFloat32>(b, rule, begin, end);
  }
}

}  // namespace
}  // namespace heteromem::cpu
