// CPU registration of heteromem::adam_step_: validates tensors, then runs the SIMD core over
// the range, shared out across torch's intra-op (OpenMP) threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>

#include "../common/adam_checks.h"
#include "adam_core.h"

namespace heteromem {
namespace {

cpu::ElemType elem_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16:
      return cpu::ElemType::kBFloat16;
    case at::kHalf:
      return cpu::ElemType::kFloat16;
    default:
      return cpu::ElemType::kFloat32;
  }
}

// NOTE: blocks are a multiple of every SIMD width so only the last block has a scalar tail,
// and large enough (64 KiB of fp32 per stream) that threads never share a cache line.
constexpr int64_t kBlock = 16384;
constexpr int64_t kBlocksPerTask = 4;

void adam_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, int64_t step, double lr, double beta1,
                   double beta2, double eps, double weight_decay, bool adamw, double grad_scale,
                   const std::optional<at::Tensor>& param_lowp) {
  const AdamScalars scalars = check_adam_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1,
                                              beta2, eps, weight_decay, adamw, grad_scale,
                                              param_lowp);
  cpu::Capability capability;
  try {
    capability = cpu::active_capability();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
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
  const int64_t n = param.numel();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t tasks = (blocks + kBlocksPerTask - 1) / kBlocksPerTask;
  // NOTE: threads take tasks from a shared counter instead of one equal share each. The
  // updates run while the training thread drives the GPU (pipelined with the forward, or in
  // backward), so one core is usually shared; with equal shares every update would wait for
  // the thread on that core (1.7x slower with one busy thread on 2 cores; 1.35x this way).
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(tasks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      const int64_t first = task * kBlocksPerTask;
      const int64_t last = std::min(first + kBlocksPerTask, blocks);
      cpu::adam_update(buffers, scalars, first * kBlock, std::min(last * kBlock, n), capability);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(heteromem, CPU, m) { m.impl("adam_step_", &adam_step_cpu); }

}  // namespace heteromem
