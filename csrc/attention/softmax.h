// The forward's online softmax, kept in registers. Each row of scores is spread over the four
// lanes of a quad (lanes 4g..4g+3 hold row g's columns 2t, 2t+1 of every n-tile), so row
// reductions are a local loop plus two xor-shuffles. Probabilities are computed in base 2,
// exp2(s * scale * log2(e) - max * scale * log2(e)), one FFMA and one MUFU.EX2 per score.
#pragma once

#include <cmath>

#include "attention/ptx.h"

namespace heteromem {
namespace attention {

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Running max and (lane-partial) sum of the two rows (g and g+8) of each m-tile of a warp.
template <int kMTiles>
struct OnlineSoftmax {
  float row_max[kMTiles][2];
  float row_sum[kMTiles][2];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_max[mt][h] = -INFINITY;
        row_sum[mt][h] = 0.f;
      }
    }
  }

  // Replaces the scores of one key block by exp2((s - m_new) * scale_log2), where m_new is the
  // max over this and all earlier blocks, and rescales the output accumulators and sums of the
  // earlier blocks by exp2((m_old - m_new) * scale_log2). A row with every score so far masked
  // (-inf) uses 0 as its reference, so it yields zeros instead of exp2(-inf + inf) = NaN.
  template <int kNTiles, int kDTiles>
  __device__ __forceinline__ void update(float (&s)[kMTiles][kNTiles][4],
                                         float (&acc_o)[kMTiles][kDTiles][4], float scale_log2) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float m_new = row_max[mt][h];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          m_new = fmaxf(m_new, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
        }
        m_new = quad_max(m_new);
        const float ref = m_new == -INFINITY ? 0.f : m_new * scale_log2;
        // exp2(-inf) = 0: the first block (row_max = -inf) rescales nothing it has not set.
        const float correction = fast_exp2(row_max[mt][h] * scale_log2 - ref);
        row_max[mt][h] = m_new;
        float sum = row_sum[mt][h] * correction;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          acc_o[mt][dt][2 * h] *= correction;
          acc_o[mt][dt][2 * h + 1] *= correction;
        }
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float p = fast_exp2(fmaf(s[mt][nt][2 * h + j], scale_log2, -ref));
            s[mt][nt][2 * h + j] = p;
            sum += p;
          }
        }
        row_sum[mt][h] = sum;
      }
    }
  }

  // Divides the output by the row sums and returns each row's log-sum-exp (natural log, of the
  // scaled scores). A row that saw no key (sum 0) gets output 0 and lse +inf, so the backward's
  // exp(s * scale - lse) is 0 for it; a NaN sum (NaN inputs) propagates.
  template <int kDTiles>
  __device__ __forceinline__ void finalize(float (&acc_o)[kMTiles][kDTiles][4], float scale,
                                           float (&lse)[kMTiles][2]) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sum = quad_sum(row_sum[mt][h]);
        const bool empty = sum == 0.f;
        const float inv = empty ? 0.f : 1.f / sum;
        lse[mt][h] = empty ? INFINITY : row_max[mt][h] * scale + logf(sum);
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          acc_o[mt][dt][2 * h] *= inv;
          acc_o[mt][dt][2 * h + 1] *= inv;
        }
      }
    }
  }
};

}  // namespace attention
}  // namespace heteromem
