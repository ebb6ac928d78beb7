"""Which optimizers `hm.wrap` takes over, and what the wrapped optimizer needs of each.

An `OptimizerKind` is everything about an optimizer that the chunks care about: its name (as
checkpoints record it), its per-parameter state (`StateLayout`: which regions each chunk
holds, their dtypes and sizes, the alignment of parameters in a chunk), the hyper-parameters
one update reads from a param group, how to check them, and the one fused call that updates
a contiguous run of a chunk. torch's Adam and AdamW run `heteromem.ops.adam_step_`;
`heteromem.optim`'s optimizers run their own class's `update_`, the same call their
standalone `step()` makes, so a wrapped chunk holds the standalone optimizer's bits.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from heteromem.optim import AGD, FP32_MOMENTS, Adam8bit, AdamW8bit, StateLayout
from heteromem.runtime.hyperparams import check_adam_group


@dataclass(frozen=True)
class OptimizerKind:
    """An optimizer as the wrapped model stores and updates it.

    Attributes:
        name: "Adam", "AdamW", "AGD", "AdamW8bit" or "Adam8bit" (recorded in checkpoints).
        layout: the state regions of every trainable chunk (``master`` first).
        hyper: the param-group keys one update reads.
        defaults: hyper-parameters of a group that gives none.
        standalone: the ``heteromem.optim`` class whose ``update_`` runs, or None for torch's
            Adam/AdamW (``heteromem.ops.adam_step_``).
        adamw: decoupled weight decay (torch's Adam/AdamW only).
    """

    name: str
    layout: StateLayout
    hyper: tuple[str, ...]
    defaults: Mapping[str, Any] = field(compare=False)
    standalone: type | None = None
    adamw: bool = True

    def check_group(self, group: Mapping[str, Any], where: str) -> None:
        """Raises TypeError/ValueError naming `where` and the key when `group`'s
        hyper-parameters could not be used by this optimizer's update."""
        if self.standalone is None:
            check_adam_group(group, where)
            return
        try:
            self.standalone.check_group(self.run_group(group))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        except KeyError as exc:
            raise ValueError(f"{where}: has no {exc.args[0]!r}; an {self.name} param group "
                             f"needs {list(self.hyper)}") from None

    def run_group(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The hyper-parameters an update reads, as Python numbers (a scheduler may have set a
        one-element tensor), in a fresh dict the update can keep while the group changes."""
        out: dict[str, Any] = {}
        for key in self.hyper:
            value = group[key]
            if key == "betas" and isinstance(value, (tuple, list)):
                out[key] = tuple(_number(v) for v in value)
            else:
                out[key] = _number(value)
        return out

    def update_(self, group: Mapping[str, Any], step: int, param: torch.Tensor,
                grad: torch.Tensor, state: Mapping[str, torch.Tensor], *, grad_scale: float,
                param_lowp: torch.Tensor | None) -> None:
        """One fused update of a run of a chunk, in place, on the device holding it (the CPU
        kernel for host chunks, the CUDA kernel for device chunks): `param` the run's fp32
        master, `state` its regions' slices (``layout.views``), `group` from `run_group`."""
        if self.standalone is not None:
            self.standalone.update_(group, step, param, grad, state, grad_scale=grad_scale,
                                    param_lowp=param_lowp)
            return
        # NOTE: looked up at call time, so a test can stand a failing op in for it.
        import heteromem.ops as hm_ops
        hm_ops.adam_step_(param, grad, state["exp_avg"], state["exp_avg_sq"], step=step,
                          lr=group["lr"], betas=group["betas"], eps=group["eps"],
                          weight_decay=group["weight_decay"], adamw=self.adamw,
                          grad_scale=grad_scale, param_lowp=param_lowp)


def _number(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return value.item()
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else value


_ADAM_HYPER = ("lr", "betas", "eps", "weight_decay")


def _fused(cls: type) -> OptimizerKind:
    # The constructor's keyword defaults are the class's hyper-parameters (lr, betas, ...).
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if name not in ("self", "params")}
    return OptimizerKind(cls.__name__, cls.layout, tuple(defaults), defaults, standalone=cls)


KINDS: dict[str, OptimizerKind] = {
    "Adam": OptimizerKind("Adam", FP32_MOMENTS, _ADAM_HYPER, dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), adamw=False),
    "AdamW": OptimizerKind("AdamW", FP32_MOMENTS, _ADAM_HYPER, dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2), adamw=True),
    **{cls.__name__: _fused(cls) for cls in (AGD, AdamW8bit, Adam8bit)},
}
"""Every optimizer hm.wrap takes over, by the name checkpoints record."""

ACCEPTED = ("torch.optim.Adam, torch.optim.AdamW, heteromem.optim.AGD, "
            "heteromem.optim.AdamW8bit or heteromem.optim.Adam8bit")


def kind_of(optimizer: torch.optim.Optimizer) -> OptimizerKind:
    """The kind of an optimizer instance handed to hm.wrap.

    Raises:
        TypeError: hm.wrap does not take this optimizer over (the message lists those it does).
    """
    cls = type(optimizer)
    if isinstance(optimizer, torch.optim.AdamW):
        return KINDS["AdamW"]
    if isinstance(optimizer, torch.optim.Adam):
        decoupled = bool(optimizer.defaults.get("decoupled_weight_decay", False))
        return KINDS["AdamW" if decoupled else "Adam"]
    # NOTE: exact classes, not subclasses: a subclass may change the update or the state,
    # and the chunks would then silently run its parent's.
    for kind in KINDS.values():
        if kind.standalone is cls:
            return kind
    raise TypeError(f"hm.wrap: optimizer must be a {ACCEPTED} instance (or None), got "
                    f"{cls.__module__}.{cls.__qualname__}")
