"""``heteromem.ops.adam_step_``: fused in-place Adam/AdamW over flat buffers.

One pass reads the fp32 master, both moments and the gradient (fp32, bf16 or fp16) and
writes the three fp32 states, plus the updated parameter rounded to bf16/fp16 when
``param_lowp`` is given: 28 bytes per parameter for bf16 instead of the several passes a
PyTorch optimizer plus casts needs. CPU: AVX-512/AVX2/scalar picked at run time, torch's
OpenMP threads. CUDA: one launch on the current stream.
"""

from __future__ import annotations

import torch

from heteromem import _ext
from heteromem.ops import reference
from heteromem.ops._checks import (check_betas, check_param_grad, check_real, check_step,
                                   check_tensor)

_OP = "adam_step_"


def adam_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    adamw: bool = True,
    grad_scale: float = 1.0,
    param_lowp: torch.Tensor | None = None,
) -> None:
    """Applies one Adam (``adamw=False``: L2 added to the gradient) or AdamW update in place.

    Args:
        param, exp_avg, exp_avg_sq: float32, contiguous, same numel and device.
        grad: float32, bfloat16 or float16, same numel; divided by ``grad_scale`` first.
        step: the step count *after* this update (1 for the first), for bias correction as
            in ``torch.optim.AdamW``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` / ``torch.optim.Adam``.
        param_lowp: optional bfloat16/float16 buffer that receives the updated parameter,
            rounded to nearest even, in the same pass.

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
        eps=check_real(_OP, "eps", eps, low=0.0),
        weight_decay=check_real(_OP, "weight_decay", weight_decay, low=0.0),
        adamw=bool(adamw),
        grad_scale=check_real(_OP, "grad_scale", grad_scale, low=0.0, low_inclusive=False),
        param_lowp=param_lowp,
    )
    if _ext.use_kernel(_OP, param.device.type):
        torch.ops.heteromem.adam_step_(param, grad, exp_avg, exp_avg_sq, **kwargs)
    else:
        reference.adam_step_(param, grad, exp_avg, exp_avg_sq, **kwargs)


if _ext.LOADED:

    @torch.library.register_fake("heteromem::adam_step_")
    def _adam_step_fake(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps,
                        weight_decay, adamw, grad_scale, param_lowp=None):
        # In-place on its inputs and returns nothing: no new tensors to describe.
        return None
