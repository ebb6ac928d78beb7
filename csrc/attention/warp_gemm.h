// The two warp-level products the attention kernels are made of, on m16n8k16 tensor cores with
// fp32 accumulators. Loops are fully unrolled so every fragment index is a compile-time constant
// (register arrays indexed at run time would spill to local memory).
#pragma once

#include <cstdint>

#include "attention/fragment_layout.h"
#include "attention/ptx.h"

namespace heteromem {
namespace attention {

// Zeroes a fragment array of accumulators before a product starts into it.
template <int kMTiles, int kNTiles>
__device__ __forceinline__ void zero_acc(float (&acc)[kMTiles][kNTiles][4]) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
    }
  }
}

// acc[mt][nt] += A[a_row0 + 16 mt + i][k] * B[8 nt + j][k] summed over k < kDepth, where A and B
// are both swizzled row-major tiles with kDepth columns (Q and K for S = Q K^T; K and Q for
// S^T = K Q^T; V and dO for dP^T = V dO^T). k-steps at or past `depth_limit` (the real head dim
// inside its bucket) are skipped: their loads were zero-filled, so they would add zeros.
template <int kMTiles, int kNTiles, int kDepth, typename T>
__device__ __forceinline__ void gemm_nt(float (&acc)[kMTiles][kNTiles][4], const T* sA,
                                        int a_row0, const T* sB, int depth_limit, int lane) {
  static_assert(kNTiles % 2 == 0, "B fragments are loaded two n-tiles at a time");
  const LaneOffset oa = ldsm_a(lane);
  const LaneOffset ob = ldsm_b(lane);
  const SwizzledLane<kDepth, sizeof(T)> la(smem_addr(sA), a_row0 + oa.row, oa.col);
  const SwizzledLane<kDepth, sizeof(T)> lb(smem_addr(sB), ob.row, ob.col);
#pragma unroll
  for (int ks = 0; ks < kDepth / 16; ++ks) {
    if (ks * 16 < depth_limit) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        ldsm_x4(a[mt], la.at(mt * 16, ks * 16));
      }
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t b[4];
        ldsm_x4(b, lb.at(np * 16, ks * 16));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
          mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }
}

// acc[mt][dt] += P[16 mt + i][k] * B[k][8 dt + j] summed over k < 8 kKTiles, where P is held in
// registers as fp32 accumulators of a previous product (p[mt][n8 tile][4], C layout) and is
// rounded to T here, and B is a swizzled row-major [k][n] tile with kCols columns (V in O += P V;
// dO in dV += P^T dO; Q in dK += dS^T Q). Output n-tiles at or past `cols_limit` are skipped.
//
// The C layout of two adjacent n8 tiles is exactly the A layout of one k16 step (per lane: row g
// cols 2t..2t+1 of tile 2kk -> reg0, row g+8 -> reg1, the same of tile 2kk+1 -> reg2, reg3), so
// no data moves between lanes.
template <int kMTiles, int kKTiles, int kCols, typename T>
__device__ __forceinline__ void gemm_rs(float (&acc)[kMTiles][kCols / 8][4],
                                        const float (&p)[kMTiles][kKTiles][4], const T* sB,
                                        int cols_limit, int lane) {
  static_assert(kKTiles % 2 == 0, "one k16 step takes two n8 tiles of P");
  const LaneOffset ob = ldsm_b_trans(lane);
  const SwizzledLane<kCols, sizeof(T)> lb(smem_addr(sB), ob.row, ob.col);
#pragma unroll
  for (int kk = 0; kk < kKTiles / 2; ++kk) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      a[mt][0] = pack2<T>(p[mt][2 * kk][0], p[mt][2 * kk][1]);
      a[mt][1] = pack2<T>(p[mt][2 * kk][2], p[mt][2 * kk][3]);
      a[mt][2] = pack2<T>(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
      a[mt][3] = pack2<T>(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < kCols / 16; ++dp) {
      if (dp * 16 < cols_limit) {
        uint32_t b[4];
        ldsm_x4_trans(b, lb.at(kk * 16, dp * 16));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<T>(acc[mt][2 * dp], a[mt], b[0], b[1]);
          mma_16816<T>(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }
}

}  // namespace attention
}  // namespace heteromem
