"""heteromem.optim's fused steps (AdamW8bit, AGD) beside the fp32-state Adam step and the
baselines they must beat, each measured in the same run:

    .venv/bin/pytest bench/bench_optim.py --benchmark-json=/tmp/bench_optim.json
    .venv/bin/python bench/summarize.py /tmp/bench_optim.json
    .venv/bin/python bench/interleave_optim.py --size 40M       # interleaved, several repeats

Groups, one per size and variant (fp32: fp32 gradient, no copy; bf16: bf16 gradient and bf16
parameter copy in the same pass, the baselines paying the two casts):
  optim-cpu-<variant>   heteromem Adam (fp32 moments), AdamW8bit, AGD
                        vs torch fused AdamW, DeepSpeedCPUAdam, and heteromem Adam itself
                        (the "x vs heteromem Adam" column is the 8-bit and AGD targets)
  optim-cuda-<variant>  the same on a GPU against torch fused AdamW (marker `cuda`)
Bytes per parameter are logical: the states read and written once, the gradient read and the
copy written once (28 for fp32 moments, 16 for 8-bit moments plus 2*4/256 for the scales).
Sizes and durations as bench_adam.py (HETEROMEM_BENCH_SIZES, HETEROMEM_BENCH_SECONDS).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch

import heteromem
import heteromem.optim
from bench_adam import (BETAS, EPS, LR, WEIGHT_DECAY, deepspeed_cpu_adam,  # noqa: F401 (fixture)
                        measure, optimizer_step, require_heteromem_kernel)

FP32, LOWP = 4, 2
VARIANTS = {"fp32": None, "bf16": torch.bfloat16}
StepFn = Callable[[], None]


def grad_and_copy(numel: int, device: str, lowp: torch.dtype | None):
    grad = (torch.randn(numel, device=device) * 1e-2).to(lowp or torch.float32)
    copy = None if lowp is None else torch.empty(numel, dtype=lowp, device=device)
    return grad, copy


def adam_step(numel: int, device: str, lowp: torch.dtype | None) -> StepFn:
    """heteromem's fp32-moment Adam (AdamW) in one pass."""
    param = torch.randn(numel, device=device)
    grad, copy = grad_and_copy(numel, device, lowp)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    steps = itertools.count(1)
    return lambda: heteromem.ops.adam_step_(param, grad, exp_avg, exp_avg_sq, step=next(steps),
                                            lr=LR, betas=BETAS, eps=EPS,
                                            weight_decay=WEIGHT_DECAY, param_lowp=copy)


def adamw8bit_step(numel: int, device: str, lowp: torch.dtype | None) -> StepFn:
    """heteromem's AdamW with 8-bit moments in one pass (AdamW8bit.update_)."""
    param = torch.randn(numel, device=device)
    grad, copy = grad_and_copy(numel, device, lowp)
    state = heteromem.optim.INT8_MOMENTS.zeros(numel, device)
    group = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    steps = itertools.count(1)
    return lambda: heteromem.optim.AdamW8bit.update_(group, next(steps), param, grad, state,
                                                     param_lowp=copy)


def agd_step(numel: int, device: str, lowp: torch.dtype | None) -> StepFn:
    """heteromem's AGD in one pass (AGD.update_)."""
    param = torch.randn(numel, device=device)
    grad, copy = grad_and_copy(numel, device, lowp)
    state = heteromem.optim.FP32_MOMENTS.zeros(numel, device)
    group = dict(lr=LR, betas=BETAS, delta=1e-5, weight_decay=WEIGHT_DECAY)
    steps = itertools.count(1)
    return lambda: heteromem.optim.AGD.update_(group, next(steps), param, grad, state,
                                               param_lowp=copy)


def deepspeed_optimizer(request: pytest.FixtureRequest):
    cls = request.getfixturevalue("deepspeed_cpu_adam")
    return lambda ps: cls(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                          adamw_mode=True)


def torch_fused_adamw(ps):
    return torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                             fused=True)


# impl -> (label, role, bytes per parameter without the gradient/copy terms)
IMPLS = {
    "heteromem-adam": ("heteromem Adam", "baseline", 6 * FP32),
    "heteromem-adamw8bit": ("heteromem AdamW8bit", "subject", 2 * FP32 + 4 + 4 * FP32 / 128),
    "heteromem-agd": ("heteromem AGD", "subject", 6 * FP32),
    "torch-fused-adamw": ("torch fused AdamW", "baseline", 6 * FP32),
    "deepspeed-cpu-adam": ("DeepSpeedCPUAdam", "baseline", 6 * FP32),
}
BUILDERS = {"heteromem-adam": adam_step, "heteromem-adamw8bit": adamw8bit_step,
            "heteromem-agd": agd_step}


def optim_case(request: pytest.FixtureRequest, impl: str, numel: int, device: str,
               lowp: torch.dtype | None) -> tuple[StepFn, float, str, str]:
    """(step function, bytes per parameter, label, role) of one implementation; the
    baselines consume a fp32 gradient and, in the bf16 variant, pay the two casts."""
    label, role, state_bytes = IMPLS[impl]
    if impl in BUILDERS:
        require_heteromem_kernel(device)
        io_bytes = FP32 if lowp is None else 2 * LOWP
        return BUILDERS[impl](numel, device, lowp), state_bytes + io_bytes, label, role
    make = deepspeed_optimizer(request) if impl == "deepspeed-cpu-adam" else torch_fused_adamw
    io_bytes = FP32 + (0 if lowp is None else 2 * (FP32 + LOWP))
    label += "" if lowp is None else " + casts"
    return optimizer_step(make, numel, device, lowp), state_bytes + io_bytes, label, role


CUDA = pytest.mark.cuda
CASES = [pytest.param("cpu", impl, id=f"cpu-{impl}") for impl in IMPLS]
CASES += [pytest.param("cuda", impl, id=f"cuda-{impl}", marks=CUDA)
          for impl in IMPLS if impl != "deepspeed-cpu-adam"]


# NOTE: the implementation varies fastest, so a group's rows run back to back.
@pytest.mark.parametrize(("device", "impl"), CASES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_optim(benchmark, request: pytest.FixtureRequest, numel: int, size_tag: str, device: str,
               impl: str, variant: str) -> None:
    """One optimizer step over `numel` parameters."""
    lowp = VARIANTS[variant]
    benchmark.group = f"optim-{device}-{variant} {size_tag}"
    fn, per_param, label, role = optim_case(request, impl, numel, device, lowp)
    extra = {"cpu_simd": heteromem.build_info().cpu_simd} if device == "cpu" else {}
    measure(benchmark, fn, numel=numel, device=device, bytes_moved=int(per_param * numel),
            case=label, impl=impl, role=role, grad_dtype=variant,
            lowp_dtype=None if lowp is None else variant, threads=torch.get_num_threads(),
            **extra)
