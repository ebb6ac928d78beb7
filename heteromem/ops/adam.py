"""``heteromem.ops.adam_step_``: fused in-place Adam/AdamW over flat buffers.

One pass reads the fp32 master, both moments and the gradient (fp32, bf16 or fp16) and
writes the three fp32 states, plus the updated parameter rounded to bf16/fp16 when
``param_lowp`` is given: 28 bytes per parameter for bf16 instead of the several passes a
PyTorch optimizer plus casts needs. CPU: AVX-512/AVX2/scalar picked at run time, torch's
OpenMP threads. CUDA: one launch on the current stream.
"""

from __future__ import annotations

import numbers

import torch

from heteromem import _ext
from heteromem.ops import reference

_OP = "adam_step_"
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOWP_DTYPES = (torch.bfloat16, torch.float16)


def _check_real(name: str, value: object, *, low: float, low_inclusive: bool = True,
                high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"adam_step_: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = value == value and value not in (float("inf"), float("-inf"))
    ok = ok and (value >= low if low_inclusive else value > low)
    ok = ok and (high is None or value < high)
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"adam_step_: {name} must be finite and {bound}, got {value}")
    return value


def _check_tensor(name: str, t: object, param: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"adam_step_: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"adam_step_: {name} must be {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if t is not param:
        if t.device != param.device:
            raise ValueError(f"adam_step_: {name} is on {t.device} but param is on {param.device}; "
                             "move all tensors to one device")
        if t.numel() != param.numel():
            raise ValueError(f"adam_step_: {name} has {t.numel()} elements but param has "
                             f"{param.numel()}; pass buffers of equal size")
    if not t.is_contiguous():
        raise ValueError(f"adam_step_: {name} must be contiguous; call .contiguous() or pass a "
                         "flat chunk view")


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
    _check_tensor("param", param, param, (torch.float32,))
    _check_tensor("grad", grad, param, _GRAD_DTYPES)
    _check_tensor("exp_avg", exp_avg, param, (torch.float32,))
    _check_tensor("exp_avg_sq", exp_avg_sq, param, (torch.float32,))
    if param_lowp is not None:
        _check_tensor("param_lowp", param_lowp, param, _LOWP_DTYPES)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"adam_step_: step must be an int >= 1 (the count after this update), got {step!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"adam_step_: betas must be a pair (beta1, beta2), got {betas!r}")
    kwargs = dict(
        step=int(step),
        lr=_check_real("lr", lr, low=0.0),
        beta1=_check_real("betas[0]", betas[0], low=0.0, high=1.0),
        beta2=_check_real("betas[1]", betas[1], low=0.0, high=1.0),
        eps=_check_real("eps", eps, low=0.0),
        weight_decay=_check_real("weight_decay", weight_decay, low=0.0),
        adamw=bool(adamw),
        grad_scale=_check_real("grad_scale", grad_scale, low=0.0, low_inclusive=False),
        param_lowp=param_lowp,
    )
    if _ext.has_kernel(_OP, param.device.type):
        torch.ops.heteromem.adam_step_(param, grad, exp_avg, exp_avg_sq, **kwargs)
        return
    if param.device.type != "meta":
        _ext.warn_fallback(_ext.LOAD_ERROR if not _ext.LOADED else
                           f"this build has no {param.device.type} kernel for adam_step_ "
                           "(rebuild with the CUDA toolkit to get one)")
    reference.adam_step_(param, grad, exp_avg, exp_avg_sq, **kwargs)


if _ext.LOADED:

    @torch.library.register_fake("heteromem::adam_step_")
    def _adam_step_fake(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps,
                        weight_decay, adamw, grad_scale, param_lowp=None):
        # In-place on its inputs and returns nothing: no new tensors to describe.
        return None
