// CUDA registration of heteromem::attention_fwd / attention_bwd: argument checks, output
// allocation and the dispatch of (head-dim bucket, dtype, causal) to the generated kernels.
// heteromem/ops/attention.py decides when these run (and falls back to SDPA otherwise).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "attention/attention_params.h"
#include "attention/kernel_traits.h"
#include "attention/static_switch.h"

namespace heteromem {
namespace {

using at::Tensor;
using attention::BwdParams;
using attention::FwdParams;
using attention::Shape;
using attention::TensorRef;

constexpr float kLog2e = 1.4426950408889634f;
// The kernels hold sequence positions in int and compute some up to one tile (at most 128
// rows) past a length: ceil_div(len, block), a causal block's last row + len_k - len_q, the
// keys of a partial last block. Lengths up to this bound keep all of them below INT_MAX.
// heteromem/ops/attention.py (MAX_KERNEL_SEQ_LEN) falls back to SDPA above it.
constexpr int64_t kMaxSeqLen = (1LL << 31) - 1 - 256;

// The kernels copy rows in 16-byte chunks: the head dim must be contiguous and every row start
// 16-byte aligned. Anything else (a transposed view, an odd storage offset, an expanded
// gradient with stride 0) is copied into a fresh contiguous tensor first.
Tensor kernel_layout(const Tensor& t) {
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3 && ok; ++d) ok = t.size(d) == 1 || t.stride(d) % 8 == 0;
  if (ok) return t;
  return t.is_contiguous() ? t.clone(at::MemoryFormat::Contiguous) : t.contiguous();
}

TensorRef ref(const Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

void check_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                  double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k and v must be 4-D (batch, heads, seq, head_dim)");
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(), op,
              ": q, k and v must be on one CUDA device");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
              ": the CUDA kernel takes bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must have one dtype");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op,
              ": q and k must agree in batch and head_dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op,
              ": k's heads must divide q's heads");
  const int64_t head_dim = q.size(3);
  TORCH_CHECK(head_dim > 0 && head_dim % 8 == 0 && head_dim <= 128, op,
              ": the CUDA kernel takes head_dim a multiple of 8 up to 128, got ", head_dim);
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535, op,
              ": batch and heads must each be at most 65535 (CUDA grid limit)");
  TORCH_CHECK(q.size(2) <= kMaxSeqLen && k.size(2) <= kMaxSeqLen, op,
              ": sequence lengths must be at most ", kMaxSeqLen, ", got ", q.size(2), " and ",
              k.size(2));
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale must be finite and positive");
  const auto* props = at::cuda::getDeviceProperties(q.get_device());
  TORCH_CHECK(props->major >= 8, op, ": the CUDA kernel needs compute capability 8.0 or newer");
}

Shape make_shape(const Tensor& q, const Tensor& k, double scale) {
  Shape s;
  s.batch = static_cast<int>(q.size(0));
  s.heads_q = static_cast<int>(q.size(1));
  s.heads_kv = static_cast<int>(k.size(1));
  s.len_q = static_cast<int>(q.size(2));
  s.len_k = static_cast<int>(k.size(2));
  s.head_dim = static_cast<int>(q.size(3));
  s.scale = static_cast<float>(scale);
  s.scale_log2 = static_cast<float>(scale) * kLog2e;
  return s;
}

std::tuple<Tensor, Tensor> attention_fwd_cuda(const Tensor& q_in, const Tensor& k_in,
                                              const Tensor& v_in, bool causal, double scale) {
  check_inputs("attention_fwd", q_in, k_in, v_in, scale);
  TORCH_CHECK(k_in.size(2) > 0 || q_in.size(2) == 0, "attention_fwd: k has no keys");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};

  FwdParams p;
  p.shape = make_shape(q, k, scale);
  p.q = ref(q);
  p.k = ref(k);
  p.v = ref(v);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = HM_HEADDIM_SWITCH(p.shape.head_dim, kHeadDim, [&] {
    return HM_HALF_SWITCH(q.scalar_type() == at::kBFloat16, T, [&] {
      return HM_BOOL_SWITCH(causal, kCausal, [&] {
        return attention::run_attention_fwd<kHeadDim, T, kCausal>(p, stream);
      });
    });
  });
  C10_CUDA_CHECK(err);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cuda(const Tensor& grad_out_in,
                                                      const Tensor& q_in, const Tensor& k_in,
                                                      const Tensor& v_in, const Tensor& out_in,
                                                      const Tensor& lse_in, bool causal,
                                                      double scale) {
  check_inputs("attention_bwd", q_in, k_in, v_in, scale);
  const int smem_needed = HM_HEADDIM_SWITCH(q_in.size(3), kHeadDim, [&] {
    return attention::bwd_smem_bytes<kHeadDim>(2);
  });
  const auto* props = at::cuda::getDeviceProperties(q_in.get_device());
  TORCH_CHECK(static_cast<int64_t>(props->sharedMemPerBlockOptin) >= smem_needed,
              "attention_bwd: the backward kernel needs ", smem_needed,
              " bytes of shared memory per block and this GPU allows ",
              props->sharedMemPerBlockOptin, "; use hm.ops.attention, which trains through SDPA "
              "there");
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "attention_bwd: grad_out and out must have q's shape");
  TORCH_CHECK(grad_out_in.scalar_type() == q_in.scalar_type() &&
                  out_in.scalar_type() == q_in.scalar_type(),
              "attention_bwd: grad_out and out must have q's dtype");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat &&
                  lse_in.sizes() == at::IntArrayRef({q_in.size(0), q_in.size(1), q_in.size(2)}),
              "attention_bwd: lse must be float32 (batch, heads, seq_q), as attention_fwd "
              "returns it");
  TORCH_CHECK(grad_out_in.device() == q_in.device() && out_in.device() == q_in.device() &&
                  lse_in.device() == q_in.device(),
              "attention_bwd: every tensor must be on q's device");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const Tensor out = kernel_layout(out_in), grad_out = kernel_layout(grad_out_in);
  const Tensor lse = lse_in.contiguous();
  Tensor grad_q = at::empty(q.sizes(), q.options());
  Tensor grad_k = at::empty(k.sizes(), k.options());
  Tensor grad_v = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    grad_q.zero_();
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  Tensor dsum = at::empty(lse.sizes(), lse.options());
  Tensor dq_accum = at::empty(q.sizes(), q.options().dtype(at::kFloat));

  BwdParams p;
  p.shape = make_shape(q, k, scale);
  p.q = ref(q);
  p.k = ref(k);
  p.v = ref(v);
  p.out = ref(out);
  p.grad_out = ref(grad_out);
  p.lse = lse.data_ptr<float>();
  p.dsum = dsum.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.grad_q = grad_q.data_ptr();
  p.grad_k = grad_k.data_ptr();
  p.grad_v = grad_v.data_ptr();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = HM_HEADDIM_SWITCH(p.shape.head_dim, kHeadDim, [&] {
    return HM_HALF_SWITCH(q.scalar_type() == at::kBFloat16, T, [&] {
      return HM_BOOL_SWITCH(causal, kCausal, [&] {
        return attention::run_attention_bwd<kHeadDim, T, kCausal>(p, stream);
      });
    });
  });
  C10_CUDA_CHECK(err);
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(heteromem, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace heteromem
