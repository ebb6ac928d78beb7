"""Argument checks shared by the typed optimizer-op wrappers (adam_step_, agd_step_,
adam8bit_step_): each error names the op and the argument and says what to pass instead,
before anything is written."""

from __future__ import annotations

import numbers

import torch

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOWP_DTYPES = (torch.bfloat16, torch.float16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_real(op: str, name: str, value: object, *, low: float, low_inclusive: bool = True,
               high: float | None = None) -> float:
    """A finite real number in [low, high) (or (low, ...) when not low_inclusive)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = value == value and value not in (float("inf"), float("-inf"))
    ok = ok and (value >= low if low_inclusive else value > low)
    ok = ok and (high is None or value < high)
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"{op}: {name} must be finite and {bound}, got {value}")
    return value


def check_tensor(op: str, name: str, t: object, param: torch.Tensor,
                 dtypes: tuple[torch.dtype, ...], numel: int | None = None) -> None:
    """A contiguous tensor of one of `dtypes` on param's device with `numel` elements
    (param's count by default)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must be {allowed}, got {dtype_name(t.dtype)}")
    if t is not param:
        if t.device != param.device:
            raise ValueError(f"{op}: {name} is on {t.device} but param is on {param.device}; "
                             "move all tensors to one device")
        want = param.numel() if numel is None else numel
        if t.numel() != want:
            need = (f"param has {param.numel()}" if numel is None else
                    f"{want} are needed for param's {param.numel()}")
            raise ValueError(f"{op}: {name} has {t.numel()} elements but {need}; pass buffers "
                             "of the right size")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; call .contiguous() or pass a flat "
                         "chunk view")


def check_param_grad(op: str, param: object, grad: object,
                     param_lowp: torch.Tensor | None) -> None:
    check_tensor(op, "param", param, param, (torch.float32,))  # type: ignore[arg-type]
    check_tensor(op, "grad", grad, param, GRAD_DTYPES)  # type: ignore[arg-type]
    if param_lowp is not None:
        check_tensor(op, "param_lowp", param_lowp, param, LOWP_DTYPES)  # type: ignore[arg-type]


def check_step(op: str, step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"{op}: step must be an int >= 1 (the count after this update), "
                         f"got {step!r}")
    return int(step)


def check_betas(op: str, betas: object) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{op}: betas must be a pair (beta1, beta2), got {betas!r}")
    return (check_real(op, "betas[0]", betas[0], low=0.0, high=1.0),
            check_real(op, "betas[1]", betas[1], low=0.0, high=1.0))
