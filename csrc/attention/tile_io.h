// Moving (rows x head_dim) tiles between global memory and swizzled shared memory in 16-byte
// chunks, with the bounds of odd sequence lengths and of head dims below the bucket.
#pragma once

#include <cstdint>

#include "attention/fragment_layout.h"
#include "attention/ptx.h"

namespace heteromem {
namespace attention {

// Starts async copies of rows [row0, row0 + kRows) of one head (`head`: its row 0, row stride
// `stride` elements) into the swizzled kRows x kCols tile `smem`. Rows at or past `len` and
// columns at or past `head_dim` are zero-filled. Consecutive threads take consecutive chunks of
// a row, so each warp reads whole 128/256-byte row segments (coalesced).
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* head, int64_t stride, int row0,
                                                int len, int head_dim, int tid) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    const bool valid = row0 + row < len && col < head_dim;
    const T* src = valid ? head + static_cast<int64_t>(row0 + row) * stride + col : head;
    cp_async_16(smem_addr(smem + swizzle<kCols>(row, col)), src, valid);
  }
}

// Copies `rows` rows of this warp's part of a swizzled tile (tile rows [row_begin, row_begin +
// rows)) to global rows row0 + r of a contiguous (len x head_dim) output, 16 bytes per lane and
// store, skipping rows at or past `len` and the head-dim padding.
template <int kCols, typename T>
__device__ __forceinline__ void store_rows(T* out, const T* smem, int row_begin, int rows,
                                           int row0, int len, int head_dim, int lane) {
  constexpr int kChunksPerRow = kCols / 8;
  for (int c = lane; c < rows * kChunksPerRow; c += 32) {
    const int r = row_begin + c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    if (row0 + r < len && col < head_dim) {
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row0 + r) * head_dim + col) =
          *reinterpret_cast<const uint4*>(smem + swizzle<kCols>(r, col));
    }
  }
}

// Zeroes rows [row0, row0 + kRows) of a contiguous (len x head_dim) output (a block whose rows
// see no key at all, or keys that no query sees).
template <int kRows, int kThreads, typename T>
__device__ __forceinline__ void zero_rows(T* out, int row0, int len, int head_dim, int tid) {
  const int chunks_per_row = head_dim / 8;
  for (int c = tid; c < kRows * chunks_per_row; c += kThreads) {
    const int r = row0 + c / chunks_per_row;
    if (r < len) {
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(r) * head_dim +
                                (c % chunks_per_row) * 8) = make_uint4(0, 0, 0, 0);
    }
  }
}

}  // namespace attention
}  // namespace heteromem
