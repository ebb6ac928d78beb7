"""Pure-PyTorch versions of every heteromem op: the fallback without the extension and the
oracle the tests compare the kernels against.

``adam_step_`` performs exactly the rounded float32 operations of the kernels
(csrc/common/adam_math.h) in the same order, one PyTorch op per rounding, so on the same
inputs it gives bit-identical results (NaN payloads aside).
"""

from __future__ import annotations

import math

import torch


def adam_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw: bool,
    grad_scale: float,
    param_lowp: torch.Tensor | None,
) -> None:
    """In-place Adam/AdamW update; arguments as ``heteromem.ops.adam_step_`` (validated there)."""
    bias_corr1 = 1.0 - beta1**step
    bias_corr2 = 1.0 - beta2**step
    g = grad.float() * (1.0 / grad_scale)
    if not adamw and weight_decay != 0.0:
        g = g + param * weight_decay
    if adamw and weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(g * (1.0 - beta1))
    exp_avg_sq.mul_(beta2).add_((g * g).mul_(1.0 - beta2))
    # NOTE: torch's CPU sqrt (MKL VML) is not always correctly rounded; the float64 square
    # root rounded to float32 is, for every float32 input, so it matches the kernels' sqrt.
    denom = exp_avg_sq.double().sqrt_().float().mul_(1.0 / math.sqrt(bias_corr2)).add_(eps)
    param.sub_((exp_avg / denom).mul_(lr / bias_corr1))
    if param_lowp is not None:
        param_lowp.copy_(param)
