"""Checks of optimizer hyper-parameters, at `hm.wrap` and before every step.

torch's optimizers refuse impossible values in their constructor but not after a user (or a
scheduler) edits `param_groups`; a value the fused update cannot take would then fail in the
middle of a step. heteromem checks every param group when wrapping and again at the start of
every `opt.step()`, before any chunk changes, so a bad value is reported with the group and
key to fix, and the step can be taken again once it is fixed. (The checks of
`heteromem.optim`'s optimizers are their classes' `check_group`; optimizer_kind.py picks.)
"""

from __future__ import annotations

import math
import numbers

import torch


def _number(where: str, key: str, value: object) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {key} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def _check(where: str, key: str, value: object, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {key}={value!r} is invalid: it must be {rule}")


def check_adam_group(group: dict, where: str) -> None:
    """Raises ValueError/TypeError naming `where` and the key when `group`'s lr, betas, eps
    or weight_decay could not be used by an Adam/AdamW update."""
    lr = _number(where, "lr", group["lr"])
    _check(where, "lr", group["lr"], math.isfinite(lr) and lr >= 0, "a finite number >= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for k, beta in enumerate(betas):
        b = _number(where, f"betas[{k}]", beta)
        _check(where, f"betas[{k}]", beta, 0.0 <= b < 1.0, "in [0, 1)")
    eps = _number(where, "eps", group["eps"])
    _check(where, "eps", group["eps"], math.isfinite(eps) and eps >= 0, "a finite number >= 0")
    wd = _number(where, "weight_decay", group["weight_decay"])
    _check(where, "weight_decay", group["weight_decay"], math.isfinite(wd) and wd >= 0,
           "a finite number >= 0")
