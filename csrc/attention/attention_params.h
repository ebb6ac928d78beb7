// What the host passes to the attention kernels, and the launch entry points that the generated
// files (csrc/attention/generated/) instantiate once per (head-dim bucket, dtype, causal).
// Torch-free on purpose: the generated translation units include only CUDA headers, so each of
// them compiles in seconds and a change to the torch glue never recompiles a kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace heteromem {
namespace attention {

// Layout (batch, heads, seq, head_dim) with the head dim contiguous (stride 1); the other strides
// are in elements, multiples of 8 so every row starts 16-byte aligned (cp.async needs that).
struct TensorRef {
  const void* ptr;
  int64_t batch_stride;
  int64_t head_stride;
  int64_t row_stride;
};

struct Shape {
  int batch;
  int heads_q;
  int heads_kv;  // divides heads_q; q head h reads k/v head h / (heads_q / heads_kv)
  int len_q;
  int len_k;
  int head_dim;  // a multiple of 8, at most the kernel's bucket (64 or 128)
  float scale;       // softmax scale (1/sqrt(head_dim) by default)
  float scale_log2;  // scale * log2(e): the kernels exponentiate in base 2
};

struct FwdParams {
  Shape shape;
  TensorRef q, k, v;
  void* out;   // (batch, heads_q, len_q, head_dim), contiguous
  float* lse;  // (batch, heads_q, len_q), natural log; +inf for a row that sees no key
};

struct BwdParams {
  Shape shape;
  TensorRef q, k, v, out, grad_out;
  const float* lse;    // from the forward
  float* dsum;         // (batch, heads_q, len_q): rowsum(grad_out * out), written by pass 1
  float* dq_accum;     // (batch, heads_q, len_q, head_dim) fp32, zeroed by pass 1
  void* grad_q;        // (batch, heads_q, len_q, head_dim), contiguous
  void* grad_k;        // (batch, heads_kv, len_k, head_dim), contiguous
  void* grad_v;        // same
};

// Each returns the launch error (cudaSuccess when every kernel was launched).
template <int kHeadDim, typename T, bool kCausal>
cudaError_t run_attention_fwd(const FwdParams& params, cudaStream_t stream);

template <int kHeadDim, typename T, bool kCausal>
cudaError_t run_attention_bwd(const BwdParams& params, cudaStream_t stream);

}  // namespace attention
}  // namespace heteromem
