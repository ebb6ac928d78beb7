"""The base of heteromem's optimizers: a ``torch.optim.Optimizer`` whose step is one fused op
call per parameter over flat buffers, and whose state is described by a ``StateLayout``.

A subclass sets ``layout``, validates its hyper-parameters in ``check_group`` and
implements ``update_``, the one call that updates a contiguous run of parameters given its
group, its step count and its state regions. The standalone ``step`` calls it once per
parameter; hm.wrap calls it once per contiguous run of a chunk with the regions' chunk
slices (``layout.views``), the loss scale and the low-precision copy to write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from typing import Any, ClassVar

import torch

from heteromem.ops._checks import check_betas, check_real
from heteromem.optim.layout import StateLayout

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FusedOptimizer(torch.optim.Optimizer):
    """Shared step loop, parameter checks and state validation (see the module docstring)."""

    layout: ClassVar[StateLayout]

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self.check_group(defaults)
        super().__init__(params, defaults)

    @classmethod
    def _name(cls) -> str:
        return cls.__name__

    @classmethod
    def check_group(cls, group: Mapping[str, Any]) -> None:
        """Raises TypeError/ValueError naming a bad hyper-parameter of `group` (a class
        method: hm.wrap checks the groups it took over before every step, with no instance)."""
        name = cls._name()
        check_real(name, "lr", group["lr"], low=0.0)
        check_betas(name, group["betas"])
        check_real(name, "weight_decay", group["weight_decay"], low=0.0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.check_group(self.param_groups[-1])

    @classmethod
    def update_(cls, group: Mapping[str, Any], step: int, param: torch.Tensor,
                grad: torch.Tensor, state: Mapping[str, torch.Tensor], *,
                grad_scale: float = 1.0, param_lowp: torch.Tensor | None = None) -> None:
        """One fused update of a contiguous run of parameter elements, in place.

        Args:
            group: the param group (its hyper-parameters are read: lr, betas, ...).
            step: the run's step count after this update (1 for the first).
            param: the run's fp32 values (flat, contiguous): the parameter itself, or a
                master chunk's slice.
            grad: the run's gradient (flat; fp32, bf16 or fp16), divided by `grad_scale`.
            state: ``layout.state_regions`` by name: flat slices covering the run.
            param_lowp: optional bf16/fp16 buffer that receives the updated values.
        """
        raise NotImplementedError(f"{cls.__name__} must implement update_")

    def _check_param(self, p: torch.Tensor, where: str) -> None:
        name = self._name()
        if p.dtype != torch.float32:
            raise TypeError(f"{name}: {where} is {str(p.dtype).replace('torch.', '')}; its "
                            "update keeps the parameter as its fp32 master, so pass float32 "
                            "parameters (or use hm.wrap, which keeps fp32 masters of bf16/fp16 "
                            "models)")
        if not p.is_contiguous():
            raise ValueError(f"{name}: {where} is not contiguous; the fused update works on a "
                             "flat view, so make the parameter contiguous")
        if p.grad.is_sparse:
            raise ValueError(f"{name}: {where} has a sparse gradient, which it does not support")
        if p.grad.dtype not in _GRAD_DTYPES or p.grad.shape != p.shape:
            raise ValueError(f"{name}: {where} has a {p.grad.dtype} gradient of shape "
                             f"{tuple(p.grad.shape)}; expected a float gradient of the "
                             f"parameter's shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                self._check_param(p, f"parameter {i} of param group {g}")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state.update(self.layout.zeros(p.numel(), p.device))
                state["step"] += 1
                self.update_(group, state["step"], p.view(-1), p.grad.reshape(-1), state)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, after checking that every saved
        parameter state has this optimizer's regions at the right sizes and dtypes (a state
        saved by another optimizer, or for another model, is refused with nothing changed)."""
        saved_groups = state_dict.get("param_groups", [])
        saved_ids = chain.from_iterable(g["params"] for g in saved_groups)
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(saved_ids, params))
        expected = {"step"} | {r.name for r in self.layout.state_regions}
        for key, state in state_dict.get("state", {}).items():
            p = by_id.get(key)
            if p is None:
                continue  # torch's own check reports groups that do not match
            where = f"{self._name()}.load_state_dict: state of parameter {key}"
            if set(state) != expected:
                raise ValueError(f"{where} has keys {sorted(state)}, expected {sorted(expected)} "
                                 f"(was it saved by another optimizer?)")
            if isinstance(state["step"], bool) or not isinstance(state["step"], int) \
                    or state["step"] < 0:
                raise ValueError(f"{where}: step must be an int >= 0, got {state['step']!r} "
                                 "(was it saved by another optimizer?)")
            for region in self.layout.state_regions:
                t = state[region.name]
                want = region.items(p.numel())
                if not isinstance(t, torch.Tensor) or t.dtype != region.dtype or t.numel() != want:
                    got = (f"{t.dtype} with {t.numel()} elements" if isinstance(t, torch.Tensor)
                           else type(t).__name__)
                    raise ValueError(f"{where}: {region.name} is {got}, expected {region.dtype} "
                                     f"with {want} elements for a parameter of {p.numel()}")
        # NOTE: torch casts every state tensor of a float parameter to the parameter's dtype
        # (8-bit codes would come back as float32), so the regions bypass its loading.
        regions = {r.name for r in self.layout.state_regions}
        kept = {key: {k: v for k, v in state.items() if k not in regions}
                for key, state in state_dict.get("state", {}).items()}
        super().load_state_dict({**state_dict, "state": kept})
        for key, state in state_dict.get("state", {}).items():
            p = by_id.get(key)
            if p is not None:
                self.state[p].update({name: state[name].to(device=p.device) for name in regions})
