// Fused attention backward, FlashAttention-2 style, in three launches:
//   1. dsum = rowsum(dO * O) per query row (the softmax backward's correction term; O already
//      holds P V, so this costs one pass over dO and O instead of one over P), and dq_accum = 0.
//   2. One CTA per (key block of kBlockN keys, kv head, batch) keeps K and V in shared memory and
//      dK, dV in registers, and walks every query block (of every q head sharing the kv head,
//      so grouped-query attention sums its dK/dV in fp32 without an expanded copy) that can see
//      its keys: S^T = K Q^T, P^T = exp(S^T - lse), dV += P^T dO, dP^T = V dO^T,
//      dS^T = P^T (dP^T - dsum), dK += dS^T Q, and dQ += dS K, which is added to an fp32
//      dq_accum with atomics because the CTAs of all key blocks contribute to the same rows.
//   3. dq = dq_accum * scale, rounded to the input dtype.
// NOTE: dQ by atomics instead of a separate dQ pass: a second pass would recompute S and dP
// (two more of the five GEMMs per block pair, +40% FLOPs) to avoid them; the atomics are
// BlockM x HeadDim fp32 adds per block pair, against 5 BlockM x BlockN x HeadDim GEMMs, and
// on sm_90 they are vector (float2) reductions.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention/attention_fwd_kernel.h"  // ceil_div
#include "attention/attention_params.h"
#include "attention/fragment_layout.h"
#include "attention/kernel_traits.h"
#include "attention/mask.h"
#include "attention/ptx.h"
#include "attention/tile_io.h"
#include "attention/warp_gemm.h"

namespace heteromem {
namespace attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kPassThreads = 128;  // threads per CTA of passes 1 and 3

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
  }
}

// Pass 1: each query row is handled by head_dim/8 (at most 16) adjacent lanes, one 16-byte
// chunk of dO and O each, reduced with xor-shuffles inside the lane group.
template <int kHeadDim, typename T>
__global__ void __launch_bounds__(kPassThreads) attention_bwd_dsum_kernel(const BwdParams p) {
  constexpr int kLanesPerRow = kHeadDim / 8;
  const Shape& sh = p.shape;
  const int64_t rows = static_cast<int64_t>(sh.batch) * sh.heads_q * sh.len_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kPassThreads / kLanesPerRow) +
                      threadIdx.x / kLanesPerRow;
  const int col = (threadIdx.x % kLanesPerRow) * 8;
  float dot = 0.f;
  const bool active = row < rows && col < sh.head_dim;
  int64_t i = 0, bh = 0;
  if (row < rows) {
    i = row % sh.len_q;
    bh = row / sh.len_q;
  }
  if (active) {
    const int64_t b = bh / sh.heads_q, h = bh % sh.heads_q;
    const T* o = static_cast<const T*>(p.out.ptr) + b * p.out.batch_stride +
                 h * p.out.head_stride + i * p.out.row_stride + col;
    const T* d = static_cast<const T*>(p.grad_out.ptr) + b * p.grad_out.batch_stride +
                 h * p.grad_out.head_stride + i * p.grad_out.row_stride + col;
    const uint4 ov = *reinterpret_cast<const uint4*>(o);
    const uint4 dv = *reinterpret_cast<const uint4*>(d);
    const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w};
    const uint32_t dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 a = unpack2<T>(ow[j]);
      const float2 c = unpack2<T>(dw[j]);
      dot = fmaf(a.x, c.x, fmaf(a.y, c.y, dot));
    }
    float4* acc = reinterpret_cast<float4*>(p.dq_accum + row * sh.head_dim + col);
    acc[0] = make_float4(0.f, 0.f, 0.f, 0.f);
    acc[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  // Every lane of the warp takes part in the shuffles (inactive ones add 0).
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {
    dot += __shfl_xor_sync(0xffffffffu, dot, offset);
  }
  if (row < rows && col == 0) p.dsum[row] = dot;
}

// Pass 3: four elements per thread.
template <typename T>
__global__ void __launch_bounds__(kPassThreads) attention_bwd_dq_kernel(const BwdParams p,
                                                                        int64_t n) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * kPassThreads + threadIdx.x) * 4;
  if (i >= n) return;
  const float4 a = *reinterpret_cast<const float4*>(p.dq_accum + i);
  const float s = p.shape.scale;
  uint2 out;
  out.x = pack2<T>(a.x * s, a.y * s);
  out.y = pack2<T>(a.z * s, a.w * s);
  *reinterpret_cast<uint2*>(static_cast<T*>(p.grad_q) + i) = out;
}

// The query blocks whose rows can see key k0 (the first of a key block): with causal attention
// row i sees key k0 when i >= k0 - diag.
template <bool kCausal>
__host__ __device__ inline int bwd_first_query_block(int k0, int block_m, int len_q, int len_k) {
  if (!kCausal) return 0;
  const int first_row = k0 - (len_k - len_q);
  return first_row <= 0 ? 0 : first_row / block_m;
}

template <int kHeadDim, typename T, bool kCausal>
__global__ void __launch_bounds__(BwdConfig<kHeadDim>::kThreads, 1)
    attention_bwd_kernel(const BwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Cfg = BwdConfig<kHeadDim>;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kQTile = kBlockM * kHeadDim;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * kHeadDim;
  T* sQ = sV + kBlockN * kHeadDim;  // [2][kBlockM x kHeadDim]
  T* sdO = sQ + 2 * kQTile;          // [2][kBlockM x kHeadDim]
  T* sdS = sdO + 2 * kQTile;         // dS^T: kBlockN x kBlockM
  float* sLse = reinterpret_cast<float*>(sdS + kBlockN * kBlockM);  // [2][kBlockM]
  float* sDsum = sLse + 2 * kBlockM;                                  // [2][kBlockM]

  const Shape& sh = p.shape;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int key_row0 = warp * 16;  // this warp's 16 keys within the block
  const int k0 = blockIdx.x * kBlockN;
  const int hk = blockIdx.y;
  const int b = blockIdx.z;
  const int group = sh.heads_q / sh.heads_kv;
  const int diag = sh.len_k - sh.len_q;

  const T* k = static_cast<const T*>(p.k.ptr) + b * p.k.batch_stride + hk * p.k.head_stride;
  const T* v = static_cast<const T*>(p.v.ptr) + b * p.v.batch_stride + hk * p.v.head_stride;
  const int64_t kv_offset = (static_cast<int64_t>(b) * sh.heads_kv + hk) * sh.len_k * sh.head_dim;
  T* grad_k = static_cast<T*>(p.grad_k) + kv_offset;
  T* grad_v = static_cast<T*>(p.grad_v) + kv_offset;

  const int m_begin = bwd_first_query_block<kCausal>(k0, kBlockM, sh.len_q, sh.len_k);
  const int m_blocks = max(0, ceil_div(sh.len_q, kBlockM) - m_begin);
  const int steps = group * m_blocks;  // (q head, query block) pairs, head-major
  if (steps == 0) {
    zero_rows<kBlockN, Cfg::kThreads>(grad_k, k0, sh.len_k, sh.head_dim, tid);
    zero_rows<kBlockN, Cfg::kThreads>(grad_v, k0, sh.len_k, sh.head_dim, tid);
    return;
  }

  // Starts the copies of step `it`'s Q and dO tiles and lse / dsum rows into buffer `buf`.
  // Rows past len_q get lse = +inf (so P = 0) and dsum = 0; their Q and dO are zero-filled.
  auto load_step = [&](int it, int buf) {
    const int h = hk * group + it / m_blocks;
    const int m0 = (m_begin + it % m_blocks) * kBlockM;
    const T* q = static_cast<const T*>(p.q.ptr) + b * p.q.batch_stride + h * p.q.head_stride;
    const T* d = static_cast<const T*>(p.grad_out.ptr) + b * p.grad_out.batch_stride +
                 h * p.grad_out.head_stride;
    load_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sQ + buf * kQTile, q, p.q.row_stride, m0,
                                                      sh.len_q, sh.head_dim, tid);
    load_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sdO + buf * kQTile, d,
                                                      p.grad_out.row_stride, m0, sh.len_q,
                                                      sh.head_dim, tid);
    const int64_t row_base = (static_cast<int64_t>(b) * sh.heads_q + h) * sh.len_q + m0;
    const int r = tid % kBlockM;
    if (tid < 2 * kBlockM) {
      const bool is_lse = tid < kBlockM;
      float* dst = (is_lse ? sLse : sDsum) + buf * kBlockM + r;
      if (m0 + r < sh.len_q) {
        cp_async_4(smem_addr(dst), (is_lse ? p.lse : p.dsum) + row_base + r);
      } else {
        *dst = is_lse ? INFINITY : 0.f;
      }
    }
  };

  load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK, k, p.k.row_stride, k0, sh.len_k,
                                                    sh.head_dim, tid);
  load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sV, v, p.v.row_stride, k0, sh.len_k,
                                                    sh.head_dim, tid);
  load_step(0, 0);
  cp_async_commit();

  float acc_dk[1][Cfg::kDTiles][4];
  float acc_dv[1][Cfg::kDTiles][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);
  // dQ warp grid (see BwdConfig).
  const int dq_row0 = (warp % Cfg::kDqWarpsM) * 16;
  const int dq_col0 = (warp / Cfg::kDqWarpsM) * Cfg::kDqCols;

  for (int it = 0; it < steps; ++it) {
    const int buf = it & 1;
    const int h = hk * group + it / m_blocks;
    const int m0 = (m_begin + it % m_blocks) * kBlockM;
    // This step's tiles have landed, and every warp is done with step it - 1 (its buffer and
    // sdS): prefetch step it + 1 into that buffer while this one computes.
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < steps) {
      load_step(it + 1, buf ^ 1);
      cp_async_commit();
    }
    const T* q_tile = sQ + buf * kQTile;
    const T* do_tile = sdO + buf * kQTile;
    const float* lse = sLse + buf * kBlockM;
    const float* dsum = sDsum + buf * kBlockM;

    // S^T = K Q^T for this warp's 16 keys x kBlockM queries; then P^T = exp2(S^T * scale *
    // log2 e - lse * log2 e), zero where masked.
    float s[1][Cfg::kQTiles][4];
    zero_acc(s);
    gemm_nt<1, Cfg::kQTiles, kHeadDim>(s, sK, key_row0, q_tile, sh.head_dim, lane);
    const bool need_mask = k0 + kBlockN > sh.len_k || (kCausal && k0 + kBlockN - 1 > m0 + diag);
#pragma unroll
    for (int nt = 0; nt < Cfg::kQTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int key = k0 + key_row0 + c_row(lane, i);
        const int qi = nt * 8 + c_col(lane, i);
        const float pv = fast_exp2(fmaf(s[0][nt][i], sh.scale_log2, -lse[qi] * kLog2e));
        s[0][nt][i] = need_mask && is_masked<kCausal>(m0 + qi, key, sh.len_k, diag) ? 0.f : pv;
      }
    }
    // dV += P^T dO (P^T rounded to the input dtype, as in the forward's P V).
    gemm_rs<1, Cfg::kQTiles, kHeadDim>(acc_dv, s, do_tile, sh.head_dim, lane);

    // dP^T = V dO^T; dS^T = P^T (dP^T - dsum).
    float ds[1][Cfg::kQTiles][4];
    zero_acc(ds);
    gemm_nt<1, Cfg::kQTiles, kHeadDim>(ds, sV, key_row0, do_tile, sh.head_dim, lane);
#pragma unroll
    for (int nt = 0; nt < Cfg::kQTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        ds[0][nt][i] = s[0][nt][i] * (ds[0][nt][i] - dsum[nt * 8 + c_col(lane, i)]);
      }
    }
    // dK += dS^T Q (the softmax scale is applied once, at the end).
    gemm_rs<1, Cfg::kQTiles, kHeadDim>(acc_dk, ds, q_tile, sh.head_dim, lane);

    // dS^T to shared memory (rounded, as it enters dQ = dS K), then dQ for the whole tile.
#pragma unroll
    for (int nt = 0; nt < Cfg::kQTiles; ++nt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        *reinterpret_cast<uint32_t*>(
            sdS + swizzle<kBlockM>(key_row0 + c_row(lane, 2 * hh), nt * 8 + c_col(lane, 0))) =
            pack2<T>(ds[0][nt][2 * hh], ds[0][nt][2 * hh + 1]);
      }
    }
    __syncthreads();

    float dq[Cfg::kDqCols / 8][4];
#pragma unroll
    for (int dt = 0; dt < Cfg::kDqCols / 8; ++dt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) dq[dt][i] = 0.f;
    }
    {
      // A = dS (queries x keys), read from dS^T with .trans; B = K (keys x head dim), .trans.
      const LaneOffset oa = ldsm_a_trans(lane);
      const LaneOffset ob = ldsm_b_trans(lane);
      const SwizzledLane<kBlockM, sizeof(T)> la(smem_addr(sdS), oa.row, dq_row0 + oa.col);
      const SwizzledLane<kHeadDim, sizeof(T)> lb(smem_addr(sK), ob.row, dq_col0 + ob.col);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4_trans(a, la.at(kk * 16, 0));
#pragma unroll
        for (int dp = 0; dp < Cfg::kDqCols / 16; ++dp) {
          if (dq_col0 + dp * 16 < sh.head_dim) {
            uint32_t bb[4];
            ldsm_x4_trans(bb, lb.at(kk * 16, dp * 16));
            mma_16816<T>(dq[2 * dp], a, bb[0], bb[1]);
            mma_16816<T>(dq[2 * dp + 1], a, bb[2], bb[3]);
          }
        }
      }
    }
    float* dq_accum = p.dq_accum +
                      (static_cast<int64_t>(b) * sh.heads_q + h) * sh.len_q * sh.head_dim;
#pragma unroll
    for (int dt = 0; dt < Cfg::kDqCols / 8; ++dt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = m0 + dq_row0 + c_row(lane, 2 * hh);
        const int col = dq_col0 + dt * 8 + c_col(lane, 0);
        if (row < sh.len_q && col < sh.head_dim) {
          atomic_add2(dq_accum + static_cast<int64_t>(row) * sh.head_dim + col, dq[dt][2 * hh],
                      dq[dt][2 * hh + 1]);
        }
      }
    }
  }

  // Every warp is done reading K and V: stage dK (scaled) and dV in this warp's own rows of
  // sK and sV, then write them out as 16-byte row chunks.
  __syncthreads();
#pragma unroll
  for (int dt = 0; dt < Cfg::kDTiles; ++dt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int off = swizzle<kHeadDim>(key_row0 + c_row(lane, 2 * hh), dt * 8 + c_col(lane, 0));
      *reinterpret_cast<uint32_t*>(sK + off) =
          pack2<T>(acc_dk[0][dt][2 * hh] * sh.scale, acc_dk[0][dt][2 * hh + 1] * sh.scale);
      *reinterpret_cast<uint32_t*>(sV + off) =
          pack2<T>(acc_dv[0][dt][2 * hh], acc_dv[0][dt][2 * hh + 1]);
    }
  }
  __syncwarp();
  store_rows<kHeadDim>(grad_k, sK, key_row0, 16, k0, sh.len_k, sh.head_dim, lane);
  store_rows<kHeadDim>(grad_v, sV, key_row0, 16, k0, sh.len_k, sh.head_dim, lane);
#endif
}

#ifndef HETEROMEM_ATTENTION_HOST_EMULATION  // see attention_fwd_kernel.h
template <int kHeadDim, typename T, bool kCausal>
cudaError_t run_attention_bwd(const BwdParams& params, cudaStream_t stream) {
  using Cfg = BwdConfig<kHeadDim>;
  const Shape& sh = params.shape;
  const int64_t rows = static_cast<int64_t>(sh.batch) * sh.heads_q * sh.len_q;
  const int64_t rows_per_cta = kPassThreads / (kHeadDim / 8);
  attention_bwd_dsum_kernel<kHeadDim, T>
      <<<static_cast<unsigned>((rows + rows_per_cta - 1) / rows_per_cta), kPassThreads, 0,
         stream>>>(params);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int smem_bytes = bwd_smem_bytes<kHeadDim>(static_cast<int>(sizeof(T)));
  auto kernel = attention_bwd_kernel<kHeadDim, T, kCausal>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(sh.len_k, Cfg::kBlockN), sh.heads_kv, sh.batch);
  kernel<<<grid, Cfg::kThreads, smem_bytes, stream>>>(params);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int64_t n = rows * sh.head_dim;
  const int64_t per_cta = 4 * kPassThreads;
  attention_bwd_dq_kernel<T><<<static_cast<unsigned>((n + per_cta - 1) / per_cta), kPassThreads,
                               0, stream>>>(params, n);
  return cudaGetLastError();
}
#endif  // HETEROMEM_ATTENTION_HOST_EMULATION

}  // namespace attention
}  // namespace heteromem
