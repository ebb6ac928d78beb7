// Fused attention forward, FlashAttention-2 style: out = softmax(scale * Q K^T) V and the row
// log-sum-exp, without ever writing the (len_q x len_k) score matrix.
//
// One CTA per (query block of kBlockM rows, q head, batch). Q's tile stays in shared memory; the
// CTA walks the key blocks from the last to the first (so the masked ones, at the causal diagonal
// and at an odd sequence end, come first, and a causal block stops at the diagonal: blocks
// entirely above it are never loaded). Per block: S = Q K^T on tensor cores, mask, online
// softmax in registers, O += P V with P rounded to the input dtype. V(j) is copied in while
// S(j) is computed and K(j-1) while O += P V(j) is, with cp.async.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention/attention_params.h"
#include "attention/fragment_layout.h"
#include "attention/kernel_traits.h"
#include "attention/mask.h"
#include "attention/ptx.h"
#include "attention/softmax.h"
#include "attention/tile_io.h"
#include "attention/warp_gemm.h"

namespace heteromem {
namespace attention {

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Key blocks [0, n_blocks) that query rows [m0, m0 + block_m) need: all of them, or with causal
// attention those up to the diagonal of the block's last row (none when even that row sees no
// key).
template <bool kCausal>
__host__ __device__ inline int fwd_key_blocks(int m0, int block_m, int block_n, int len_q,
                                              int len_k) {
  int n_blocks = ceil_div(len_k, block_n);
  if (kCausal) {
    const int keys_seen = m0 + block_m + (len_k - len_q);  // keys of the last row, plus one
    n_blocks = keys_seen <= 0 ? 0 : min(n_blocks, ceil_div(keys_seen, block_n));
  }
  return n_blocks;
}

template <int kHeadDim, typename T, bool kCausal>
__global__ void __launch_bounds__(FwdConfig<kHeadDim>::kThreads, 2)
    attention_fwd_kernel(const FwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Cfg = FwdConfig<kHeadDim>;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kHeadDim;
  T* sV = sK + kBlockN * kHeadDim;

  const Shape& sh = p.shape;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp_row0 = (tid / 32) * Cfg::kWarpRows;  // this warp's first row in the tile
  // NOTE: causal blocks further down have more keys; launching them first shortens the tail.
  const int m_block = kCausal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int m0 = m_block * kBlockM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hk = h / (sh.heads_q / sh.heads_kv);
  const int diag = sh.len_k - sh.len_q;

  const T* q = static_cast<const T*>(p.q.ptr) + b * p.q.batch_stride + h * p.q.head_stride;
  const T* k = static_cast<const T*>(p.k.ptr) + b * p.k.batch_stride + hk * p.k.head_stride;
  const T* v = static_cast<const T*>(p.v.ptr) + b * p.v.batch_stride + hk * p.v.head_stride;
  const int64_t bh = static_cast<int64_t>(b) * sh.heads_q + h;
  T* out = static_cast<T*>(p.out) + bh * sh.len_q * sh.head_dim;
  float* lse = p.lse + bh * sh.len_q;

  const int n_blocks = fwd_key_blocks<kCausal>(m0, kBlockM, kBlockN, sh.len_q, sh.len_k);
  if (n_blocks == 0) {
    zero_rows<kBlockM, Cfg::kThreads>(out, m0, sh.len_q, sh.head_dim, tid);
    if (tid < kBlockM && m0 + tid < sh.len_q) lse[m0 + tid] = INFINITY;
    return;
  }

  load_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sQ, q, p.q.row_stride, m0, sh.len_q,
                                                    sh.head_dim, tid);
  cp_async_commit();
  int n_block = n_blocks - 1;
  load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK, k, p.k.row_stride, n_block * kBlockN,
                                                    sh.len_k, sh.head_dim, tid);
  cp_async_commit();

  float acc_o[Cfg::kMTiles][Cfg::kDTiles][4];
  zero_acc(acc_o);
  OnlineSoftmax<Cfg::kMTiles> softmax;
  softmax.init();

  for (; n_block >= 0; --n_block) {
    const int n0 = n_block * kBlockN;
    // K(n_block) has landed, and every warp is done with V(n_block + 1): V may be overwritten.
    cp_async_wait<0>();
    __syncthreads();
    load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sV, v, p.v.row_stride, n0, sh.len_k,
                                                      sh.head_dim, tid);
    cp_async_commit();

    float s[Cfg::kMTiles][Cfg::kNTiles][4];
    zero_acc(s);
    gemm_nt<Cfg::kMTiles, Cfg::kNTiles, kHeadDim>(s, sQ, warp_row0, sK, sh.head_dim, lane);
    // Only the blocks at the sequence end or crossing the diagonal (of the tile's first row)
    // hold masked pairs; the test is uniform over the CTA.
    if (n0 + kBlockN > sh.len_k || (kCausal && n0 + kBlockN - 1 > m0 + diag)) {
      mask_scores<kCausal>(s, m0 + warp_row0, n0, sh.len_k, diag, lane);
    }
    softmax.update(s, acc_o, sh.scale_log2);

    // V(n_block) has landed, and every warp is done with K(n_block): prefetch K(n_block - 1).
    cp_async_wait<0>();
    __syncthreads();
    if (n_block > 0) {
      load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK, k, p.k.row_stride, n0 - kBlockN,
                                                        sh.len_k, sh.head_dim, tid);
      cp_async_commit();
    }
    gemm_rs<Cfg::kMTiles, Cfg::kNTiles, kHeadDim>(acc_o, s, sV, sh.head_dim, lane);
  }

  float row_lse[Cfg::kMTiles][2];
  softmax.finalize(acc_o, sh.scale, row_lse);

  // Each warp stages its own output rows in its own rows of sQ (only this warp ever read them),
  // then writes them out as 16-byte row chunks.
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int dt = 0; dt < Cfg::kDTiles; ++dt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = warp_row0 + mt * 16 + c_row(lane, 2 * hh);
        *reinterpret_cast<uint32_t*>(sQ + swizzle<kHeadDim>(r, dt * 8 + c_col(lane, 0))) =
            pack2<T>(acc_o[mt][dt][2 * hh], acc_o[mt][dt][2 * hh + 1]);
      }
    }
  }
  __syncwarp();
  store_rows<kHeadDim>(out, sQ, warp_row0, Cfg::kWarpRows, m0, sh.len_q, sh.head_dim, lane);
  if (lane % 4 == 0) {
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = m0 + warp_row0 + mt * 16 + c_row(lane, 2 * hh);
        if (row < sh.len_q) lse[row] = row_lse[mt][hh];
      }
    }
  }
#endif
}

// NOTE: tests/cpp/attention_emulation compiles the kernel bodies above with a host compiler,
// which cannot parse a launch; the launchers are left out there.
#ifndef HETEROMEM_ATTENTION_HOST_EMULATION
template <int kHeadDim, typename T, bool kCausal>
cudaError_t run_attention_fwd(const FwdParams& params, cudaStream_t stream) {
  using Cfg = FwdConfig<kHeadDim>;
  const Shape& sh = params.shape;
  const int smem_bytes = fwd_smem_bytes<kHeadDim>(static_cast<int>(sizeof(T)));
  auto kernel = attention_fwd_kernel<kHeadDim, T, kCausal>;
  // Above 48 KiB of dynamic shared memory a kernel must opt in.
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(sh.len_q, Cfg::kBlockM), sh.heads_q, sh.batch);
  kernel<<<grid, Cfg::kThreads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}
#endif  // HETEROMEM_ATTENTION_HOST_EMULATION

}  // namespace attention
}  // namespace heteromem
