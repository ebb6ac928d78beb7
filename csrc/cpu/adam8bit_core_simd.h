// The vector loop of the 8-bit Adam core, written once over a `Vec` traits type: per block of
// quant8::kBlock elements, decode both moments, apply Adam (AdamRule, adam_element's order),
// store the parameter and stash the new moments in a block-sized buffer while keeping their
// largest magnitudes, then encode the block against its new scales. One pass over memory;
// the stash stays in L1. Include after switching the target on.
#pragma once

#include <cstring>

#include "adam8bit_core_tail.h"
#include "adam_core_simd.h"

namespace heteromem::cpu {
namespace {

template <class Vec, ElemType G, ElemType L>
void adam8bit_loop(const Adam8bitBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  using V = typename Vec::V;
  using I = typename Vec::I;
  namespace q8 = quant8;
  constexpr int W = Vec::kWidth;
  const AdamRule<Vec> rule(s);
  const I magnitude = Vec::iset1(q8::kMagnitudeMask);
  const I low7 = Vec::iset1(0x7f);
  const I sign_code = Vec::iset1(0x80);
  const I m_offset = Vec::iset1(q8::kExpAvgOffset);
  const I v_offset = Vec::iset1(q8::kExpAvgSqOffset);
  const V m_zero = Vec::set1(q8::kExpAvgZero);
  // (bits - offset + half) in one add, modulo 2^32 as the scalar code's arithmetic.
  const I m_round = Vec::iset1(q8::kHalfStep - q8::kExpAvgOffset);
  const I v_round = Vec::iset1(q8::kHalfStep - q8::kExpAvgSqOffset);
  alignas(64) float m_buf[q8::kBlock];
  alignas(64) float v_buf[q8::kBlock];
  for (int64_t start = begin; start < end; start += q8::kBlock) {
    const int64_t count = std::min<int64_t>(q8::kBlock, end - start);
    const int64_t full = count / W * W;
    const int64_t block = start / q8::kBlock;
    const V m_scale = Vec::set1(b.exp_avg_scale[block]);
    const V v_scale = Vec::set1(b.exp_avg_sq_scale[block]);
    I m_max = Vec::izero();
    I v_max = Vec::izero();
    for (int64_t j = 0; j < full; j += W) {
      const int64_t i = start + j;
      const I mc = Vec::load_codes(b.exp_avg + i);
      V m = Vec::sub(Vec::from_bits(Vec::iadd(Vec::template slli<19>(Vec::iand(mc, low7)), m_offset)),
                     m_zero);
      m = Vec::from_bits(Vec::ior(Vec::bits(m), Vec::template slli<24>(Vec::iand(mc, sign_code))));
      m = Vec::mul(m, m_scale);
      V v = Vec::from_bits(Vec::iadd(Vec::template slli<19>(Vec::load_codes(b.exp_avg_sq + i)),
                                     v_offset));
      v = Vec::mul(v, v_scale);
      const V p = rule.apply(Vec::loadu(b.param + i), Vec::template load_grad<G>(b.grad, i), m, v);
      Vec::storeu(b.param + i, p);
      Vec::template store_lowp<L>(b.param_lowp, i, p);
      Vec::store(m_buf + j, m);
      Vec::store(v_buf + j, v);
      m_max = Vec::imax_s(m_max, Vec::iand(Vec::bits(m), magnitude));
      v_max = Vec::imax_s(v_max, Vec::iand(Vec::bits(v), magnitude));
    }
    uint32_t m_top = Vec::reduce_max(m_max);
    uint32_t v_top = Vec::reduce_max(v_max);
    adam8bit_elements(b, s, start, full, count, m_buf, v_buf, m_top, v_top);
    const q8::BlockScale ms = q8::block_scale(m_top, q8::kExpAvgMax);
    const q8::BlockScale vs = q8::block_scale(v_top, q8::kExpAvgSqMax);
    b.exp_avg_scale[block] = ms.scale;
    b.exp_avg_sq_scale[block] = vs.scale;
    if (ms.encode) {
      const V inv = Vec::set1(ms.inv);
      for (int64_t j = 0; j < full; j += W) {
        const I mb = Vec::bits(Vec::load(m_buf + j));
        const V z = Vec::add(Vec::mul(Vec::from_bits(Vec::iand(mb, magnitude)), inv), m_zero);
        I k = Vec::template srli<19>(Vec::iadd(Vec::bits(z), m_round));
        k = Vec::ior(k, Vec::iand(Vec::template srli<24>(mb), sign_code));
        Vec::store_codes(b.exp_avg + start + j, k);
      }
    } else {
      std::memset(b.exp_avg + start, 0, static_cast<size_t>(full));
    }
    if (vs.encode) {
      const V inv = Vec::set1(vs.inv);
      for (int64_t j = 0; j < full; j += W) {
        const I t = Vec::iadd(Vec::bits(Vec::mul(Vec::load(v_buf + j), inv)), v_round);
        Vec::store_codes(b.exp_avg_sq + start + j,
                         Vec::template srli<19>(Vec::imax_s(t, Vec::izero())));
      }
    } else {
      std::memset(b.exp_avg_sq + start, 0, static_cast<size_t>(full));
    }
    adam8bit_encode_elements(b, start, full, count, m_buf, v_buf, ms, vs);
  }
}

template <class Vec, ElemType G>
void adam8bit_dispatch_lowp(const Adam8bitBuffers& b, const AdamScalars& s, int64_t begin,
                            int64_t end) {
  switch (b.lowp_type) {
    case ElemType::kBFloat16:
      return adam8bit_loop<Vec, G, ElemType::kBFloat16>(b, s, begin, end);
    case ElemType::kFloat16:
      return adam8bit_loop<Vec, G, ElemType::kFloat16>(b, s, begin, end);
    default:
      return adam8bit_loop<Vec, G, ElemType::kNone>(b, s, begin, end);
  }
}

template <class Vec>
void adam8bit_dispatch(const Adam8bitBuffers& b, const AdamScalars& s, int64_t begin,
                       int64_t end) {
  switch (b.grad_type) {
    case ElemType::kBFloat16:
      return adam8bit_dispatch_lowp<Vec, ElemType::kBFloat16>(b, s, begin, end);
    case ElemType::kFloat16:
      return adam8bit_dispatch_lowp<Vec, ElemType::kFloat16>(b, s, begin, end);
    default:
      return adam8bit_dispatch_lowp<Vec, ElemType::kFloat32>(b, s, begin, end);
  }
}

}  // namespace
}  // namespace heteromem::cpu
