// What the CPU op wrappers of the optimizers share: the task size, the capability in use as a
// ValueError, and tensors -> the cores' raw buffers.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <stdexcept>

#include "adam_core.h"

namespace heteromem {

// NOTE: tasks of 65536 elements (a multiple of every SIMD width and of the 8-bit block, so only
// the last task has a scalar tail or a partial block; 256 KiB of fp32 per stream, so threads
// never share a cache line).
constexpr int64_t kTaskElements = 65536;

inline cpu::ElemType elem_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16:
      return cpu::ElemType::kBFloat16;
    case at::kHalf:
      return cpu::ElemType::kFloat16;
    default:
      return cpu::ElemType::kFloat32;
  }
}

// HETEROMEM_CPU_CAPABILITY may name a path this CPU lacks: a ValueError in Python.
inline cpu::Capability active_capability_or_throw() {
  try {
    return cpu::active_capability();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

inline cpu::AdamBuffers fp32_state_buffers(const at::Tensor& param, const at::Tensor& grad,
                                           const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                           const std::optional<at::Tensor>& param_lowp) {
  cpu::AdamBuffers buffers;
  buffers.param = param.data_ptr<float>();
  buffers.grad = grad.const_data_ptr();
  buffers.grad_type = elem_type(grad.scalar_type());
  buffers.exp_avg = exp_avg.data_ptr<float>();
  buffers.exp_avg_sq = exp_avg_sq.data_ptr<float>();
  if (param_lowp.has_value()) {
    buffers.param_lowp = param_lowp->data_ptr();
    buffers.lowp_type = elem_type(param_lowp->scalar_type());
  }
  return buffers;
}

}  // namespace heteromem
