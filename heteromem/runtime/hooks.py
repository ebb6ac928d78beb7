"""Module and parameter hooks that page chunks in and out around forward and backward.

- Before a module's forward: its parameters' chunks are made resident and pinned; after, they
  are released (evictable, not freed).
- Backward: a hook on each output of a module call pins that call's chunks again just before
  autograd reaches it (again in every backward pass through a retained graph: the first pass
  may have put gradients where the values were). Once the gradients of the call's inputs
  exist, its nodes have run and the pin becomes a soft pin: the chunks stay while there is
  room (the parameters' gradients are usually still accumulating), but may be evicted when
  nothing else can go, which is what lets two forwards share one backward under a budget.
  The pin is dropped once every trainable parameter of the module has delivered its
  gradient, or at the end of the backward pass.
- Each trainable parameter's accumulated gradient goes into the chunk manager
  (`register_post_accumulate_grad_hook`), and `param.grad` is dropped: no gradient memory
  outside the chunks.
- At the end of each backward pass (an autograd engine callback) the remaining pins of that
  pass are dropped and gradients still on the device are sent home.
- With `step_in_backward`, each gradient is also counted, and a chunk whose gradients are
  complete is updated at once (`StepInBackward`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from heteromem.errors import UpdateError
from heteromem.memory.chunk import Chunk, ParamSlot
from heteromem.memory.manager import ChunkManager
from heteromem.runtime.backward_step import StepInBackward


def _graph_task() -> int:
    return torch._C._current_graph_task_id()


def _needing_grad(value: Any) -> list[torch.Tensor]:
    """The tensors in `value` (a tensor, or a pytree of them) that require grad. A tensor or
    a flat tuple of them, what most modules take and return, skips the pytree walk: these
    hooks run at every module call."""
    if isinstance(value, torch.Tensor):
        return [value] if value.requires_grad else []
    if isinstance(value, tuple) and all(isinstance(t, torch.Tensor) for t in value):
        return [t for t in value if t.requires_grad]
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor) and t.requires_grad]


def _weak_grad_hook(hooks: "Hooks"):
    ref = weakref.ref(hooks)

    def grad_hook(param: torch.nn.Parameter) -> None:
        owner = ref()
        if owner is not None:
            owner._grad_hook(param)
    return grad_hook


class _Call:
    """One call of a module: the chunks it pinned for its backward, and what it waits for."""

    __slots__ = ("module", "slots", "waiting", "pinned", "soft", "task")

    def __init__(self, module: torch.nn.Module, slots: list[ParamSlot]) -> None:
        self.module, self.slots = module, slots
        self.waiting: set[int] = {id(s) for s in slots if s.trainable}
        self.pinned: list[Chunk] = []
        self.soft = False  # whether `pinned` holds soft pins
        self.task = -1     # the backward pass (graph task) that pinned it last


class Hooks:
    def __init__(self, manager: ChunkManager, root: torch.nn.Module,
                 slots_by_module: dict[torch.nn.Module, list[ParamSlot]],
                 slot_of: dict[int, ParamSlot]) -> None:
        self.manager = manager
        self.slots_by_module = slots_by_module
        self.slot_of = slot_of
        self._forward_pins: dict[int, list[list[Chunk]]] = {}
        self._calls_by_task: dict[int, list[_Call]] = {}
        self._calls_by_slot: dict[int, list[_Call]] = {}
        self._tasks_with_callback: set[int] = set()
        # The first iteration records the order in which parameters are first used; when it
        # ends, `on_first_use_order` (set by wrap) may re-pack the chunks in that order.
        self.first_use: list[ParamSlot] | None = []
        self._first_use_seen: set[int] = set()
        self.on_first_use_order = None
        self.in_backward: StepInBackward | None = None  # set by wrap with step_in_backward
        self.handles: list[Any] = []
        self.handles.append(root.register_forward_pre_hook(self._root_pre_forward, prepend=True))
        for module, slots in slots_by_module.items():
            self.handles.append(module.register_forward_pre_hook(self._pre_forward))
            # always_call: a forward that raises (including the early stop of a non-reentrant
            # checkpoint recomputation) must still release its chunks.
            self.handles.append(module.register_forward_hook(self._post_forward, always_call=True))
        # NOTE: torch's garbage collector does not look into a parameter's post-accumulate-grad
        # hooks, so a hook holding this object (which holds the parameter) would keep the model
        # alive forever; the hook holds it weakly.
        grad_hook = _weak_grad_hook(self)
        for slot in slot_of.values():
            if slot.trainable:
                self.handles.append(slot.param.register_post_accumulate_grad_hook(grad_hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # ------------------------------------------------------------------ forward

    def _root_pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        if _graph_task() != -1:  # a recomputation inside backward, not a new forward
            return
        if torch.is_grad_enabled():
            if self.manager.unfinished_step is not None:
                # Its gradients wait for opt.step() or opt.zero_grad(): a backward now would
                # silently add this batch's gradients to them.
                raise UpdateError(f"heteromem: {self.manager.unfinished_step}")
            if self.in_backward is not None:
                self.in_backward.before_forward()
        # Before re-packing: its moves belong to the iteration that runs with the new layout.
        self.manager.timeline.new_iteration()
        self.manager.count_iteration()
        if self.first_use and self.on_first_use_order is not None:
            # Re-packing allocates chunks: never as inference tensors.
            with torch.inference_mode(False):
                if self.on_first_use_order(self.first_use):
                    self.first_use = None
        self.manager.trace.new_iteration()

    def _pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        if self.first_use is not None:
            for slot in self.slots_by_module[module]:
                if id(slot) not in self._first_use_seen:
                    self._first_use_seen.add(id(slot))
                    self.first_use.append(slot)
        pinned = self.manager.acquire(self.slots_by_module[module])
        self._forward_pins.setdefault(id(module), []).append(pinned)

    def _post_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        pins = self._forward_pins.get(id(module))
        if not pins:  # the pre-forward hook itself failed (always_call runs us anyway)
            return
        self.manager.release(pins.pop())
        if not torch.is_grad_enabled():
            return
        outputs = _needing_grad(output)
        if not outputs:
            return
        call = _Call(module, self.slots_by_module[module])
        for t in outputs:
            t.register_hook(lambda grad, call=call: self._pre_backward(call))
        inputs = _needing_grad(args)
        if len(inputs) == 1:
            # One input: its own gradient hook is the multi-grad hook's "all" (and cheaper).
            inputs[0].register_hook(lambda grad, call=call: self._inputs_done(call))
        elif inputs:
            torch.autograd.graph.register_multi_grad_hook(
                inputs, lambda grads, call=call: self._inputs_done(call), mode="all")

    # ------------------------------------------------------------------ backward

    def _ensure_end_callback(self, task: int) -> None:
        if task in self._tasks_with_callback:
            return
        self._tasks_with_callback.add(task)
        if self.in_backward is not None:
            self.in_backward.pass_started()
        self.manager.timeline.mark("backward")
        torch.autograd.Variable._execution_engine.queue_callback(lambda: self._end_backward(task))

    def _pre_backward(self, call: _Call) -> None:
        task = _graph_task()
        if call.task == task:  # another output of the same call, same pass
            return
        self._unpin(call)  # a soft pin left over from an earlier pass through a retained graph
        call.task = task
        self._ensure_end_callback(task)
        call.pinned = self.manager.acquire(call.slots)
        call.soft = False
        call.waiting = {id(s) for s in call.slots if s.trainable}
        self._calls_by_task.setdefault(call.task, []).append(call)
        for slot in call.slots:
            if slot.trainable:
                self._calls_by_slot.setdefault(id(slot), []).append(call)

    def _inputs_done(self, call: _Call) -> None:
        if call.task != _graph_task() or not call.pinned or call.soft:
            return
        if not call.waiting:  # nothing left to accumulate: drop the pin
            self._unpin(call)
            return
        self.manager.soften(call.pinned)
        call.soft = True

    def _unpin(self, call: _Call) -> None:
        if call.pinned:
            if call.soft:
                self.manager.release_soft(call.pinned)
            else:
                self.manager.release(call.pinned)
        call.pinned = []
        call.soft = False

    def _grad_hook(self, param: torch.nn.Parameter) -> None:
        slot = self.slot_of[id(param)]
        self._ensure_end_callback(_graph_task())
        if self.in_backward is not None:
            self.in_backward.before_grad(slot)
        self.manager.grad_ready(slot, param.grad)
        param.grad = None
        for call in self._calls_by_slot.pop(id(slot), []):
            call.waiting.discard(id(slot))
            if not call.waiting:
                self._unpin(call)
        if self.in_backward is not None:
            self.in_backward.after_grad(slot)

    def _end_backward(self, task: int) -> None:
        self._tasks_with_callback.discard(task)
        if self.in_backward is not None:
            self.in_backward.pass_ended()
        for call in self._calls_by_task.pop(task, []):
            self._unpin(call)
        self._calls_by_slot = {k: [c for c in v if c.task != task]
                               for k, v in self._calls_by_slot.items()}
        self._calls_by_slot = {k: v for k, v in self._calls_by_slot.items() if v}
        self.manager.end_backward()
