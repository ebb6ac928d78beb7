"""``heteromem.optim.AdamW8bit`` and ``Adam8bit``: Adam whose moments are stored in 8 bits
with one scale per block of 256 elements, fused on CPU and CUDA tensors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from heteromem import ops
from heteromem.ops._checks import check_real
from heteromem.optim.fused import FusedOptimizer
from heteromem.optim.layout import INT8_MOMENTS


class AdamW8bit(FusedOptimizer):
    """AdamW whose ``exp_avg`` and ``exp_avg_sq`` are 8-bit codes with a float32 scale per
    block of 256 elements (6 bytes of state per parameter with the fp32 master instead of 12,
    and 16 bytes of memory traffic per step instead of 28 with a bf16 gradient and copy).

    Each step decodes the moments, applies exactly ``torch.optim.AdamW``'s update in float32
    (``heteromem.ops.adam_step_``'s arithmetic) and re-encodes each block against its new
    largest magnitude, in one pass over memory. ``exp_avg`` keeps a sign and 4 significant
    bits down to 2^-7 of its block's largest magnitude (finer steps below, zero exact);
    ``exp_avg_sq`` keeps 4 significant bits down to 2^-15 of its block's largest value and is
    floored there, so a denominator is never understated. See docs/optim.md for the formats
    and their error bounds.

    Args:
        params: float32 parameters or param groups, on the CPU or a CUDA device.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
    """

    layout = INT8_MOMENTS
    adamw: ClassVar[bool] = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @classmethod
    def check_group(cls, group: Mapping[str, Any]) -> None:
        super().check_group(group)
        check_real(cls._name(), "eps", group["eps"], low=0.0)

    @classmethod
    def update_(cls, group: Mapping[str, Any], step: int, param: torch.Tensor,
                grad: torch.Tensor, state: Mapping[str, torch.Tensor], *,
                grad_scale: float = 1.0, param_lowp: torch.Tensor | None = None) -> None:
        ops.adam8bit_step_(param, grad, state["exp_avg"], state["exp_avg_scale"],
                           state["exp_avg_sq"], state["exp_avg_sq_scale"], step=step,
                           lr=group["lr"], betas=group["betas"], eps=group["eps"],
                           weight_decay=group["weight_decay"], adamw=cls.adamw,
                           grad_scale=grad_scale, param_lowp=param_lowp)


class Adam8bit(AdamW8bit):
    """``AdamW8bit`` with ``torch.optim.Adam``'s L2 weight decay (``weight_decay * param`` is
    added to the gradient) and its default ``weight_decay=0``."""

    adamw = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
