"""The one check every public function taking a wrapped model makes."""

from __future__ import annotations

import torch

from heteromem.errors import NotWrappedError


def wrapped_state(model: object, what: str, hint: str = ""):
    """`model._heteromem` (the WrapState `hm.wrap` attached), or `NotWrappedError` naming
    `what` (the function asking) and, for a plain model, `hint`."""
    state = getattr(model, "_heteromem", None) if isinstance(model, torch.nn.Module) else None
    if state is not None:
        return state
    if not isinstance(model, torch.nn.Module):
        raise NotWrappedError(f"{what}: model must be a torch.nn.Module returned by hm.wrap, got "
                              f"{type(model).__name__}")
    raise NotWrappedError(f"{what}: this {type(model).__name__} was not wrapped by heteromem; "
                          "call `model, opt = hm.wrap(model, opt, ...)` first and pass the "
                          "model it returns" + (f" ({hint})" if hint else ""))
