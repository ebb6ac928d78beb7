"""``heteromem.optim.AGD``: the auto-switchable optimizer of Yue et al. (NeurIPS 2023, as
shipped in Ant's DLRover/atorch), fused on CPU and CUDA tensors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from heteromem import ops
from heteromem.ops._checks import check_real
from heteromem.optim.fused import FusedOptimizer
from heteromem.optim.layout import FP32_MOMENTS


class AGD(FusedOptimizer):
    """AGD: Adam's two moments, but the second follows the step-to-step difference of the
    bias-corrected first moment, and its root is floored at ``delta * sqrt(1 - beta2**t)``,
    below which the update is SGD with momentum (the paper's auto-switch)::

        m_t = beta1 m_{t-1} + (1 - beta1) g_t
        s_t = m_t / (1 - beta1^t) - m_{t-1} / (1 - beta1^(t-1))      (s_1 = m_1 / (1 - beta1))
        b_t = beta2 b_{t-1} + (1 - beta2) s_t^2
        c_t = sqrt(1 - beta2^t)
        p  <- p (1 - lr wd) - lr c_t / (1 - beta1^t) m_t / max(sqrt(b_t), delta c_t)

    Same state as Adam (``exp_avg``, ``exp_avg_sq``: 12 bytes per parameter with the fp32
    master) and the same one pass over memory, on float32 parameters on the CPU (AVX-512,
    AVX2 or scalar) or a CUDA device; every path gives the same bits.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: learning rate.
        betas: (beta1, beta2), each in [0, 1).
        delta: the floor of the preconditioner's root (the switch to SGD with momentum).
        weight_decay: decoupled weight decay (``p *= 1 - lr * weight_decay``).
    """

    layout = FP32_MOMENTS

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), delta: float = 1e-5,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, delta=delta,
                                      weight_decay=weight_decay))

    @classmethod
    def check_group(cls, group: Mapping[str, Any]) -> None:
        super().check_group(group)
        check_real(cls._name(), "delta", group["delta"], low=0.0)

    @classmethod
    def update_(cls, group: Mapping[str, Any], step: int, param: torch.Tensor,
                grad: torch.Tensor, state: Mapping[str, torch.Tensor], *,
                grad_scale: float = 1.0, param_lowp: torch.Tensor | None = None) -> None:
        ops.agd_step_(param, grad, state["exp_avg"], state["exp_avg_sq"], step=step,
                      lr=group["lr"], betas=group["betas"], delta=group["delta"],
                      weight_decay=group["weight_decay"], grad_scale=grad_scale,
                      param_lowp=param_lowp)
