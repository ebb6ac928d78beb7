"""``heteromem.ops.adam8bit_step_``: fused in-place Adam/AdamW with 8-bit moments.

Each moment is a flat uint8 code per element plus one float32 scale per block of 256
elements (``exp_avg``: sign and a 4-bit-mantissa code with zero; ``exp_avg_sq``: an 8-bit
code floored at 2^-15 of its block's largest value; see csrc/common/quant8_math.h and
docs/optim.md). One pass decodes both moments, applies exactly ``adam_step_``'s update, and
re-encodes each block against its new largest magnitude: 16 bytes of memory traffic per
parameter with a bf16 gradient and bf16 copy (28 with fp32 moments), 6 bytes of state (12).
"""

from __future__ import annotations

import torch

from heteromem import _ext
from heteromem.ops import reference
from heteromem.ops._checks import (check_betas, check_param_grad, check_real, check_step,
                                   check_tensor)

_OP = "adam8bit_step_"


def adam8bit_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_scale: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    exp_avg_sq_scale: torch.Tensor,
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
    """Applies one Adam (``adamw=False``: L2 added to the gradient) or AdamW update in place
    to a parameter whose moments are stored in 8 bits.

    Args:
        param: float32, contiguous (n elements). grad: float32, bfloat16 or float16, n
            elements; divided by ``grad_scale`` first.
        exp_avg, exp_avg_sq: uint8, n elements. exp_avg_scale, exp_avg_sq_scale: float32,
            ``ceil(n / 256)`` elements. All zero is the initial state. A range of a chunk
            must start at a multiple of 256 elements so its blocks line up.
        step, lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` / ``Adam``.
        param_lowp: optional bfloat16/float16 buffer that receives the updated parameter,
            rounded to nearest even, in the same pass (it may be ``grad``'s buffer).

    Raises:
        TypeError: a tensor of the wrong dtype, or a non-numeric hyper-parameter.
        ValueError: mismatched sizes or devices, non-contiguous buffers, out-of-range values.
    """
    check_param_grad(_OP, param, grad, param_lowp)
    blocks = reference.quant8_blocks(param.numel())
    check_tensor(_OP, "exp_avg", exp_avg, param, (torch.uint8,))
    check_tensor(_OP, "exp_avg_scale", exp_avg_scale, param, (torch.float32,), numel=blocks)
    check_tensor(_OP, "exp_avg_sq", exp_avg_sq, param, (torch.uint8,))
    check_tensor(_OP, "exp_avg_sq_scale", exp_avg_sq_scale, param, (torch.float32,),
                 numel=blocks)
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
    states = (exp_avg, exp_avg_scale, exp_avg_sq, exp_avg_sq_scale)
    if _ext.use_kernel(_OP, param.device.type):
        torch.ops.heteromem.adam8bit_step_(param, grad, *states, **kwargs)
    else:
        reference.adam8bit_step_(param, grad, *states, **kwargs)


if _ext.LOADED:

    @torch.library.register_fake("heteromem::adam8bit_step_")
    def _adam8bit_step_fake(param, grad, exp_avg, exp_avg_scale, exp_avg_sq, exp_avg_sq_scale,
                            *, step, lr, beta1, beta2, eps, weight_decay, adamw, grad_scale,
                            param_lowp=None):
        # In-place on its inputs and returns nothing: no new tensors to describe.
        return None
