// Tile shapes of the attention kernels, per head-dim bucket, as compile-time constants.
//
// Forward: a CTA of 4 warps owns kBlockM = 128 query rows, 32 per warp (two m16 tiles: each
// K/V fragment loaded from shared memory feeds two MMAs), and walks key/value blocks of
// kBlockN = 64 rows. Per-thread accumulators: scores 2*kBlockN/8*4 + output 2*kHeadDim/8*4
// floats = 192 for hdim 128 (255 registers, a few spilled: ptxas -v) and 128 for hdim 64 (213,
// none; FlashAttention-2's 128-key blocks for hdim 64 spilled ~200 bytes here). Two CTAs per SM.
//
// Backward: a CTA of 8 warps owns kBlockN = 128 keys, 16 per warp, and walks the query blocks of
// kBlockM rows. Each warp computes S^T = K Q^T for its 16 keys, so P^T and dS^T come out of the
// score accumulators already in the A-operand layout of dV += P^T dO and dK += dS^T Q (no
// round trip through shared memory for those two products). Registers per thread: dK and dV
// (2 * kHeadDim/8*4) + S^T and dP^T (2 * kBlockM/8*4) = 192 floats for both buckets.
#pragma once

namespace heteromem {
namespace attention {

// One forward tile shape for both head-dim buckets: 64-key blocks keep the 64 bucket free
// of register spills as well (a per-bucket specialisation is the place to tune them apart).
template <int kHeadDim>
struct FwdTraits {
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head-dim buckets are 64 and 128");
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 64;
};

template <int kHeadDim>
struct FwdConfig : FwdTraits<kHeadDim> {
  using Base = FwdTraits<kHeadDim>;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = Base::kBlockM / kWarps;  // query rows per warp
  static constexpr int kMTiles = kWarpRows / 16;            // m16 tiles per warp
  static constexpr int kNTiles = Base::kBlockN / 8;         // n8 tiles of scores per block
  static constexpr int kDTiles = kHeadDim / 8;              // n8 tiles of the output
  // Q stays resident; one K and one V tile: V(j) loads while S = Q K(j)^T is computed, K(j-1)
  // while O += P V(j) is, so a single buffer of each hides the copies.
  static constexpr int kSmemElems = (Base::kBlockM + 2 * Base::kBlockN) * kHeadDim;
  static_assert(kWarpRows % 16 == 0 && Base::kBlockN % 16 == 0 && kHeadDim % 16 == 0, "tile");
};

template <int kHeadDim>
struct BwdTraits;

template <>
struct BwdTraits<64> {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
};

template <>
struct BwdTraits<128> {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 128;
};

template <int kHeadDim>
struct BwdConfig : BwdTraits<kHeadDim> {
  using Base = BwdTraits<kHeadDim>;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kQTiles = Base::kBlockM / 8;  // n8 tiles of S^T (queries) per warp
  static constexpr int kDTiles = kHeadDim / 8;       // n8 tiles of dK / dV per warp
  // dQ = dS K over the kBlockM x kHeadDim tile: warps in a (kDqWarpsM x kDqWarpsN) grid, each
  // 16 query rows by kDqCols head-dim columns.
  static constexpr int kDqWarpsM = Base::kBlockM / 16;
  static constexpr int kDqWarpsN = kWarps / kDqWarpsM;
  static constexpr int kDqCols = kHeadDim / kDqWarpsN;
  // K and V resident; Q, dO (and their lse / dsum rows) double-buffered; dS^T staged for dQ.
  static constexpr int kSmemElems = 2 * Base::kBlockN * kHeadDim          // K, V
                                    + 2 * 2 * Base::kBlockM * kHeadDim    // Q, dO x 2
                                    + Base::kBlockN * Base::kBlockM;      // dS^T
  static constexpr int kSmemFloats = 2 * 2 * Base::kBlockM;              // lse, dsum x 2
  static_assert(Base::kBlockN == 16 * kWarps, "each warp owns 16 keys");
  static_assert(kDqWarpsM * kDqWarpsN == kWarps && kDqCols % 16 == 0, "dQ warp grid");
  static_assert(2 * Base::kBlockM <= kThreads, "one thread per lse / dsum row");
};

// Dynamic shared memory of one CTA, for elements of `elem_bytes` bytes. The backward needs
// 130 KiB (hdim 64) or 145 KiB (hdim 128): more than the 99 KiB a CTA may have on sm_86/sm_89
// (RTX 30xx/40xx, L4, L40), so there heteromem/ops/attention.py trains through SDPA
// (BWD_SMEM_BYTES there must equal these numbers for 16-bit inputs).
template <int kHeadDim>
constexpr int fwd_smem_bytes(int elem_bytes) {
  return FwdConfig<kHeadDim>::kSmemElems * elem_bytes;
}

template <int kHeadDim>
constexpr int bwd_smem_bytes(int elem_bytes) {
  return BwdConfig<kHeadDim>::kSmemElems * elem_bytes +
         BwdConfig<kHeadDim>::kSmemFloats * static_cast<int>(sizeof(float));
}

static_assert(bwd_smem_bytes<64>(2) == 133120 && bwd_smem_bytes<128>(2) == 148480,
              "update BWD_SMEM_BYTES in heteromem/ops/attention.py");

}  // namespace attention
}  // namespace heteromem
