"""``heteromem.ops.agd_step_``: fused in-place AGD over flat buffers.

AGD (Yue et al., NeurIPS 2023) keeps Adam's two moments, but its second moment follows the
step-to-step difference of the bias-corrected first moment, and its root is floored at
``delta * sqrt(1 - beta2**step)``, below which the update is SGD with momentum. Same state and
the same one pass as ``adam_step_``: 28 bytes per parameter for a bf16 gradient and bf16 copy.
The maths, operation by operation, is in csrc/common/agd_math.h.
"""

from __future__ import annotations

import torch

from heteromem import _ext
from heteromem.ops import reference
from heteromem.ops._checks import (check_betas, check_param_grad, check_real, check_step,
                                   check_tensor)

_OP = "agd_step_"


def agd_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    delta: float = 1e-5,
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
    param_lowp: torch.Tensor | None = None,
) -> None:
    """Applies one AGD update in place, with decoupled weight decay (``param *= 1 - lr * wd``).

    Args:
        param, exp_avg, exp_avg_sq: float32, contiguous, same numel and device.
        grad: float32, bfloat16 or float16, same numel; divided by ``grad_scale`` first.
        step: the step count *after* this update (1 for the first).
        lr, betas, delta, weight_decay: as ``heteromem.optim.AGD``.
        param_lowp: optional bfloat16/float16 buffer that receives the updated parameter,
            rounded to nearest even, in the same pass (it may be ``grad``'s buffer).

    Raises:
        TypeError: a tensor of the wrong dtype, or a non-numeric hyper-parameter.
        ValueError: mismatched sizes or devices, non-contiguous buffers, out-of-range values.
    """
    check_param_grad(_OP, param, grad, param_lowp)
    check_tensor(_OP, "exp_avg", exp_avg, param, (torch.float32,))
    check_tensor(_OP, "exp_avg_sq", exp_avg_sq, param, (torch.float32,))
    step = check_step(_OP, step)
    beta1, beta2 = check_betas(_OP, betas)
    kwargs = dict(
        step=step,
        lr=check_real(_OP, "lr", lr, low=0.0),
        beta1=beta1,
        beta2=beta2,
        delta=check_real(_OP, "delta", delta, low=0.0),
        weight_decay=check_real(_OP, "weight_decay", weight_decay, low=0.0),
        grad_scale=check_real(_OP, "grad_scale", grad_scale, low=0.0, low_inclusive=False),
        param_lowp=param_lowp,
    )
    if _ext.use_kernel(_OP, param.device.type):
        torch.ops.heteromem.agd_step_(param, grad, exp_avg, exp_avg_sq, **kwargs)
    else:
        reference.agd_step_(param, grad, exp_avg, exp_avg_sq, **kwargs)


if _ext.LOADED:

    @torch.library.register_fake("heteromem::agd_step_")
    def _agd_step_fake(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, delta,
                       weight_decay, grad_scale, param_lowp=None):
        # In-place on its inputs and returns nothing: no new tensors to describe.
        return None
