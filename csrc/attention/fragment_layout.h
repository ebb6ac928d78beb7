// Where each lane's data lives: the shared-memory swizzle and the ldmatrix lane addresses that
// turn a tile into mma.m16n8k16 fragments. Plain integer maths, compiled for host and device,
// so tests/cpp/test_attention_fragments.cpp can check it against the PTX ISA's fragment tables
// without a GPU.
//
// PTX ISA, "Matrix Fragments for mma.m16n8k16" (bf16/f16), with g = lane / 4, t = lane % 4:
//   A (16x16, row): reg0 = (row g,   k 2t..2t+1)   reg1 = (row g+8, k 2t..2t+1)
//                   reg2 = (row g,   k 2t+8..+9)   reg3 = (row g+8, k 2t+8..+9)
//   B (16x8, col):  reg0 = (k 2t..2t+1, col g)     reg1 = (k 2t+8..+9, col g)
//   C/D (16x8 f32): c0,c1 = (row g, col 2t, 2t+1)  c2,c3 = (row g+8, col 2t, 2t+1)
// A register holds two 16-bit values, the lower index in the low half.
// ldmatrix.m8n8.x4: lanes 8j..8j+7 give the addresses of the 8 rows (16 bytes each) of matrix j;
// lane l receives in register j the elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix j, or
// with .trans the elements (rows 2(l%4), 2(l%4)+1, col l/4).
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace heteromem {
namespace attention {

// Element offset of (row, col) in a row-major tile of kCols 16-bit columns whose 16-byte chunks
// are XOR-swizzled by row % 8. ldmatrix reads one 16-byte chunk from each of 8 consecutive rows;
// unswizzled, rows 128 or 256 bytes apart would hit the same banks (an 8-way conflict); with the
// XOR the 8 chunks land in 8 distinct 16-byte bank groups. cp.async writes whole chunks, so the
// swizzle costs nothing on the store side.
template <int kCols>
HM_HOST_DEVICE int swizzle(int row, int col) {
  static_assert(kCols % 64 == 0, "the XOR needs at least 8 chunks of 8 elements per row");
  return row * kCols + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// Shared-memory byte addresses, for one lane, of the 16-byte rows it hands to ldmatrix at
// (row + row0, col + col0) of a swizzled tile, for every 16x16 block (row0 a multiple of 8,
// col0 a multiple of 16). The lane's own (row, col) is fixed; across blocks the swizzled chunk
// (col + col0) / 8 ^ row % 8 only depends on col0 / 16 mod 4 beyond a plain offset, so four base
// addresses plus immediates cover every block. Recomputing the swizzle per block instead kept
// dozens of loop-invariant addresses live in registers and made the kernels spill.
template <int kCols, int kElemBytes>
struct SwizzledLane {
  uint32_t base[4];

  HM_HOST_DEVICE SwizzledLane(uint32_t tile_addr, int row, int col) {
    for (int j = 0; j < 4; ++j) {
      base[j] = tile_addr + kElemBytes * static_cast<uint32_t>(swizzle<kCols>(row, col + 16 * j));
    }
  }

  // Blocks with (col + col0) % 64 equal share a base; the rest is whole 64-column groups
  // (the XOR only touches the low three chunk bits) and whole rows (row0 % 8 == 0 keeps row % 8).
  HM_HOST_DEVICE uint32_t at(int row0, int col0) const {
    return base[(col0 >> 4) & 3] + kElemBytes * static_cast<uint32_t>(row0 * kCols + (col0 & ~63));
  }
};

// (row, col) offset, within a 16x16 block of the stored tile, of the row this lane hands to
// ldmatrix.x4. The four variants differ in which 8x8 quarter each group of 8 lanes addresses.
struct LaneOffset {
  int row;
  int col;
};

// A fragment (m16 x k16) from row-major [m][k] storage, no transpose: matrices
// (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15) = reg0..reg3.
HM_HOST_DEVICE LaneOffset ldsm_a(int lane) {
  return {(lane & 7) + ((lane >> 3) & 1) * 8, (lane >> 4) * 8};
}

// A fragment (m16 x k16) from [k][m] storage (the operand is stored transposed), with .trans:
// matrices (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15) = reg0..reg3.
HM_HOST_DEVICE LaneOffset ldsm_a_trans(int lane) {
  return {(lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8};
}

// Two B fragments (k16 x n8 each, n-tiles n0 and n0+8) from [n][k] storage, no transpose (K in
// Q K^T: B(k=d, n=key) = K[key][d]): matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
// (n 8-15, k 8-15) = {reg0, reg1} of n-tile n0, then {reg0, reg1} of n-tile n0+8.
HM_HOST_DEVICE LaneOffset ldsm_b(int lane) {
  return {(lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8};
}

// Two B fragments from [k][n] storage with .trans (V in P V: B(k=key, n=d) = V[key][d]):
// matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
HM_HOST_DEVICE LaneOffset ldsm_b_trans(int lane) {
  return {(lane & 7) + ((lane >> 3) & 1) * 8, (lane >> 4) * 8};
}

// Row and column, within a 16x8 C tile, of accumulator element i (0..3) of this lane.
HM_HOST_DEVICE int c_row(int lane, int i) { return (lane >> 2) + (i >> 1) * 8; }
HM_HOST_DEVICE int c_col(int lane, int i) { return (lane & 3) * 2 + (i & 1); }

}  // namespace attention
}  // namespace heteromem
