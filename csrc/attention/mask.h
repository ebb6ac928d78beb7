// Which (query, key) pairs a score may not contribute: keys past the sequence end, and with
// causal attention keys after the query's position. Causal is aligned bottom-right, as in
// FlashAttention and a KV cache: with len_q queries and len_k keys, query i is the token at
// position i + (len_k - len_q), so it sees keys j <= i + diag, diag = len_k - len_q. With
// len_q > len_k the first len_q - len_k queries see no key: their output is 0, their lse +inf.
#pragma once

#include <cmath>

#include "attention/fragment_layout.h"

namespace heteromem {
namespace attention {

template <bool kCausal>
__device__ __forceinline__ bool is_masked(int query, int key, int len_k, int diag) {
  return key >= len_k || (kCausal && key > query + diag);
}

// Forward: scores s[mt][nt] of query rows row0 + 16 mt + (0..15) and keys col0 + 8 nt + (0..7).
template <bool kCausal, int kMTiles, int kNTiles>
__device__ __forceinline__ void mask_scores(float (&s)[kMTiles][kNTiles][4], int row0, int col0,
                                            int len_k, int diag, int lane) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int query = row0 + mt * 16 + c_row(lane, i);
        const int key = col0 + nt * 8 + c_col(lane, i);
        if (is_masked<kCausal>(query, key, len_k, diag)) s[mt][nt][i] = -INFINITY;
      }
    }
  }
}

}  // namespace attention
}  // namespace heteromem
