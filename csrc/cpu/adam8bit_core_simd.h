// The vector loop of the 8-bit Adam core, written once over a `Vec` traits type. Per block of
// quant8::kBlock elements: decode both moments, apply Adam (AdamRule: adam_element's order),
// store the parameter, stash the new moments in a block-sized buffer and keep their largest
// magnitudes; then encode the block against its new scales. One pass over memory; the stash
// stays in L1. Include after switching the target on.
//
// NOTE: block k is encoded after block k+1 has been updated. A block's scales wait on a
// reduction and two divisions; encoding right away would stall on that chain every block
// (7% of the step on a Zen 4 core), while the next block's update does not depend on it.
#pragma once

#include <algorithm>

#include "adam8bit_core_tail.h"
#include "adam_core_simd.h"

namespace heteromem::cpu {
namespace {

// A block updated and waiting for its codes.
struct PendingBlock {
  int64_t start = -1;
  int64_t count = 0;
  int64_t full = 0;  // elements in whole vectors; the rest are encoded by the scalar tail
  quant8::BlockScale m_scale{}, v_scale{};
  const float* m = nullptr;
  const float* v = nullptr;
};

template <class Vec>
inline void adam8bit_encode_block(const Adam8bitBuffers& b, const PendingBlock& block) {
  using V = typename Vec::V;
  using I = typename Vec::I;
  namespace q8 = quant8;
  constexpr int W = Vec::kWidth;
  uint8_t* m_codes = b.exp_avg + block.start;
  uint8_t* v_codes = b.exp_avg_sq + block.start;
  if (block.m_scale.encode) {
    const I magnitude = Vec::iset1(q8::kMagnitudeMask);
    const I sign_code = Vec::iset1(0x80);
    const I round = Vec::iset1(q8::kHalfStep - q8::kExpAvgOffset);  // modulo 2^32, as the scalar
    const V zero = Vec::set1(q8::kExpAvgZero);
    const V inv = Vec::set1(block.m_scale.inv);
    for (int64_t j = 0; j < block.full; j += W) {
      const I bits = Vec::bits(Vec::load(block.m + j));
      const V z = Vec::add(Vec::mul(Vec::from_bits(Vec::iand(bits, magnitude)), inv), zero);
      const I k = Vec::template srli<q8::kCodeShift>(Vec::iadd(Vec::bits(z), round));
      Vec::store_codes(m_codes + j, Vec::or_and(k, Vec::template srli<24>(bits), sign_code));
    }
  } else {
    std::fill_n(m_codes, block.full, uint8_t{0});
  }
  if (block.v_scale.encode) {
    const I round = Vec::iset1(q8::kHalfStep - q8::kExpAvgSqOffset);
    const V inv = Vec::set1(block.v_scale.inv);
    for (int64_t j = 0; j < block.full; j += W) {
      const I t = Vec::iadd(Vec::bits(Vec::mul(Vec::load(block.v + j), inv)), round);
      Vec::store_codes(v_codes + j,
                       Vec::template srli<q8::kCodeShift>(Vec::imax_s(t, Vec::izero())));
    }
  } else {
    std::fill_n(v_codes, block.full, uint8_t{0});
  }
  if (block.full < block.count) {
    adam8bit_encode_elements(b, block.start, block.full, block.count, block.m, block.v,
                             block.m_scale, block.v_scale);
  }
}

template <class Vec, ElemType G, ElemType L>
void adam8bit_loop(const Adam8bitBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  using V = typename Vec::V;
  using I = typename Vec::I;
  namespace q8 = quant8;
  constexpr int W = Vec::kWidth;
  const AdamRule<Vec> rule(s);
  const I magnitude = Vec::iset1(q8::kMagnitudeMask);
  const I low7 = Vec::iset1(0x7f);
  const I sign_bit = Vec::iset1(0x80000000u);
  const I m_offset = Vec::iset1(q8::kExpAvgOffset);
  const I v_offset = Vec::iset1(q8::kExpAvgSqOffset);
  const V m_zero = Vec::set1(q8::kExpAvgZero);
  alignas(64) float stash[2][2][q8::kBlock];
  PendingBlock pending;
  int side = 0;
  for (int64_t start = begin; start < end; start += q8::kBlock, side ^= 1) {
    const int64_t count = std::min<int64_t>(q8::kBlock, end - start);
    const int64_t full = count / W * W;
    const int64_t block = start / q8::kBlock;
    float* m_buf = stash[side][0];
    float* v_buf = stash[side][1];
    const V m_scale = Vec::set1(b.exp_avg_scale[block]);
    const V v_scale = Vec::set1(b.exp_avg_sq_scale[block]);
    I m_max = Vec::izero();
    I v_max = Vec::izero();
    for (int64_t j = 0; j < full; j += W) {
      const int64_t i = start + j;
      // Decode: D(k) = F(k) - F(0) with the code's bit 7 as the sign, times the block scale.
      const I mc = Vec::load_codes(b.exp_avg + i);
      V m = Vec::sub(Vec::from_bits(Vec::iadd(
                         Vec::template slli<q8::kCodeShift>(Vec::iand(mc, low7)), m_offset)),
                     m_zero);
      m = Vec::from_bits(Vec::or_and(Vec::bits(m), Vec::template slli<24>(mc), sign_bit));
      m = Vec::mul(m, m_scale);
      V v = Vec::from_bits(Vec::iadd(
          Vec::template slli<q8::kCodeShift>(Vec::load_codes(b.exp_avg_sq + i)), v_offset));
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
    if (full < count) adam8bit_elements(b, s, start, full, count, m_buf, v_buf, m_top, v_top);
    const q8::BlockScale ms = q8::block_scale(m_top, q8::kExpAvgMax);
    const q8::BlockScale vs = q8::block_scale(v_top, q8::kExpAvgSqMax);
    b.exp_avg_scale[block] = ms.scale;
    b.exp_avg_sq_scale[block] = vs.scale;
    if (pending.start >= 0) adam8bit_encode_block<Vec>(b, pending);
    pending = PendingBlock{start, count, full, ms, vs, m_buf, v_buf};
  }
  if (pending.start >= 0) adam8bit_encode_block<Vec>(b, pending);
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
