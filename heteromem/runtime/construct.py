"""Models built on the meta device (`with torch.device("meta"):`): their values are made one
module or one tensor at a time while `hm.wrap` fills the chunks, so the model never exists
whole in RAM.

Values come from `init(module)` (default: the module's `reset_parameters()`, or a transformers
model's own weight init) or from safetensors files (`weights`, see `runtime/weights.py`).
A `Materializer` checks everything up front (it changes nothing), then serves as the
`fill_chunks` source: `values(slot)` hands over one parameter's values and leaves the
parameter an empty CPU tensor, which wrap then turns into its placeholder; `finish()`
materialises the buffers.

A model may mix materialised and meta tensors (a PEFT model whose adapters were made for a
meta base model): materialised tensors keep their values, unless `weights` holds them.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import torch

from heteromem.memory.chunk import ParamSlot
from heteromem.memory.file_image import FileSpan
from heteromem.runtime.materialize import to_materialized
from heteromem.runtime import weights as wfiles


# How far the weights are read ahead of the chunk being filled: enough to keep the drive busy
# while a tensor is copied, small beside a chunk (a larger tensor is read alone).
READ_AHEAD_BYTES = 64 * 2**20


def materializer(model: torch.nn.Module, init: object, weights: object) -> "Materializer | None":
    """The Materializer for `model`, or None for an ordinary model with neither `init` nor
    `weights`. Checks `init`, `weights` and the model; changes nothing."""
    if init is not None and not callable(init):
        raise TypeError(f"hm.wrap: init must be a callable taking a module (as model.apply "
                        f"takes), got {type(init).__name__}")
    if init is not None and weights is not None:
        raise ValueError("hm.wrap: pass init or weights, not both: weights fills every parameter "
                         "from the files (buffers the files lack come from the model's own code)")
    has_meta = any(t.is_meta for t in _own_tensors_all(model))
    if init is not None and not has_meta:
        raise ValueError("hm.wrap: init is for a model built on the meta device (with "
                         "torch.device('meta'): ...), but this model's tensors are all "
                         "materialised; call model.apply(init) before wrapping instead")
    if not has_meta and weights is None:
        return None
    return Materializer(model, init, weights)


def _own_tensors_all(model: torch.nn.Module):
    for module in model.modules():
        yield from (p for p in module._parameters.values() if p is not None)
        yield from (b for b in module._buffers.values() if b is not None)


def apply_order(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules in the order `model.apply(fn)` calls `fn`: children first (recursively),
    then the module; a module reachable twice is called twice, as apply does."""
    out: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        for child in module.children():
            visit(child)
        out.append(module)
    visit(model)
    return out


def _own(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def transformers_owners(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """id(module) -> the nearest enclosing transformers `PreTrainedModel` (itself included),
    whose `_init_weights(module)` is the module's own init (what `from_config` runs). Empty
    when transformers is not imported or the model holds none (a PEFT model holds one)."""
    tf = sys.modules.get("transformers")
    if tf is None:
        return {}
    owner: dict[int, torch.nn.Module] = {}

    def visit(module: torch.nn.Module, current: torch.nn.Module | None) -> None:
        if isinstance(module, tf.PreTrainedModel):
            current = module
        if current is not None:
            owner[id(module)] = current
        for child in module.children():
            visit(child, current)
    visit(model, None)
    return owner


def _own_init(model: torch.nn.Module, names: dict[int, str], modules: list[torch.nn.Module],
              problem: Callable[[torch.nn.Module], str]) -> Callable[[torch.nn.Module], None]:
    """The model's own init for `modules`: a transformers model's `_init_weights`, else each
    module's `reset_parameters()`. A module in `modules` with neither is refused: `problem`
    says what it lacks and what to do."""
    owners = transformers_owners(model)
    for module in modules:
        if id(module) not in owners and not callable(getattr(module, "reset_parameters", None)):
            raise ValueError(f"hm.wrap: module {names[id(module)]!r} ({type(module).__name__}) "
                             + problem(module))

    def init(module: torch.nn.Module) -> None:
        owner = owners.get(id(module))
        if owner is not None:
            with torch.no_grad():
                owner._init_weights(module)
        elif _own(module):
            # Only modules that own tensors: a container's reset_parameters() may reach into
            # its children, whose values have been handed to the chunks already.
            module.reset_parameters()
    return init


def _load_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: its allocator is not the one to help
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Gives the pages of freed heap blocks back to the OS.

    NOTE: glibc serves allocations below its mmap threshold (which rises up to 32 MiB once
    a process has freed larger blocks) from the heap, and a freed block that small
    allocations have since split cannot hold the next tensor of the same size: filling
    chunk by chunk would then grow RSS by every materialised tensor, as if the model were
    whole. `malloc_trim(0)` releases the free pages wherever they are; called once a
    chunk, so at most about one chunk of freed values stays resident."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _nan_filled(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return torch.full(t.shape, math.nan, dtype=t.dtype)
    return torch.zeros(t.shape, dtype=t.dtype)


class Materializer:
    """Values for a model with tensors on the meta device; see the module docstring."""

    def __init__(self, model: torch.nn.Module, init: Callable | None, weights: object) -> None:
        self.model = model
        self.names = {id(m): n or "the model itself"
                      for n, m in model.named_modules(remove_duplicate=False)}
        for module in model.modules():
            params = [p for p in module._parameters.values() if p is not None]
            if len({p.is_meta for p in params}) > 1:
                raise ValueError(
                    f"hm.wrap: module {self.names[id(module)]!r} ({type(module).__name__}) has "
                    "parameters both on the meta device and materialised; build it wholly on "
                    "one of them (a module's init sets all of its parameters together)")
        from heteromem.integrations import lora
        self.adapters = lora.meta_adapters(model)  # PEFT adapters: made by PEFT, up front
        adapter_params = {id(p) for layer, _, _ in self.adapters
                          for p in lora.adapter_params(layer)}
        self.meta_params = {id(p) for p in model.parameters()
                            if p.is_meta and id(p) not in adapter_params}
        self.modules = apply_order(model)
        self.plan: wfiles.WeightsPlan | None = None
        self.reader = wfiles.TensorReader()
        self.prefetch: wfiles.Prefetch | None = None
        self._chunk = None  # the chunk values() last served
        if weights is not None:
            self.plan = _weights_plan(model, weights, adapter_params)
            # Meta buffers the files lack (rotary inv_freq): the model's own code makes them.
            self.computed = [(m, [n for n, b in m._buffers.items() if b is not None
                                  and b.is_meta and not self.plan.has(b)])
                             for m in model.modules()]
            self.computed = [(m, made) for m, made in self.computed if made]
            missing = dict(self.computed)
            self.init = _own_init(model, self.names, list(missing), lambda m: (
                f"has buffer(s) {missing[m]} on the meta device that the weights do not hold, "
                "and no reset_parameters() to compute them; build the model with those "
                "buffers materialised, or save them into the weights"))
        else:
            if init is None:
                init = _own_init(model, self.names, [m for m in self.modules if any(
                    t.is_meta for t in _own(m))], lambda m: (
                    "has tensors on the meta device and no reset_parameters() to make them; "
                    "pass init=fn, called as fn(module) for every module as model.apply "
                    "calls it, or weights=... to load them"))
            self.init = init
            self._last_owner: dict[int, int] = {}
            for k, module in enumerate(self.modules):
                for p in module._parameters.values():
                    if p is not None:
                        self._last_owner[id(p)] = k
            self._next = 0                       # the next module to initialise
            self._ready: dict[int, torch.Tensor] = {}  # id(param) -> final values

    # ------------------------------------------------------------------ layout

    def pack_order(self, named: list[tuple[str, torch.nn.Parameter]]
                   ) -> list[tuple[str, torch.nn.Parameter]]:
        """With `init`, parameters are packed in the order their values become final (their
        last owner's place in apply order), so each chunk fills while the values it needs
        are being made and nothing waits long; with `weights`, in the model's order."""
        if self.plan is not None:
            return named
        return sorted(named, key=lambda kv: self._last_owner.get(id(kv[1]), -1))

    # ------------------------------------------------------------------ values

    def file_spans(self, chunk, dtype: torch.dtype) -> list[FileSpan] | None:
        """Where the files hold every parameter of `chunk` byte for byte in `dtype` (the
        compute dtype), so the chunk can be read from them instead of copied: None when one
        parameter is not from the files, is stored in another dtype, or the chunk is sharded
        (its host part is not whole tensors)."""
        if self.plan is None or chunk.world != 1:
            return None
        spans = []
        for slot in chunk.slots:
            if not self.plan.has(slot.param):
                return None
            _, entry = self.plan.source[id(slot.param)]
            # (The plan checked the shape; safetensors, that the header's bytes match it.)
            if wfiles.torch_dtype(entry.dtype) != dtype:
                return None
            spans.append(FileSpan(entry.file, entry.begin, slot.offset * dtype.itemsize,
                                  entry.end - entry.begin))
        return spans

    def prepare(self, chunks: list, skipped: set[int] = frozenset()) -> None:
        """Changes the model for the first time (inside wrap's put-back-on-failure): PEFT
        adapters on the meta device are made by PEFT's own init. With `weights`, starts
        reading the files in the order `fill_chunks` will ask for `chunks`' slots (but those
        of the chunks in `skipped`, ids of chunks read from the files later), at most
        `READ_AHEAD_BYTES` or one chunk, whichever is less (one tensor at least), ahead."""
        from heteromem.integrations import lora
        for layer, adapter, init in self.adapters:
            lora.materialize_adapter(layer, adapter, init)
        if self.plan is not None and chunks:
            order = [self.plan.source[id(s.param)] for c in chunks if id(c) not in skipped
                     for s in c.slots if self.plan.has(s.param)]
            chunk_bytes = chunks[0].capacity * chunks[0].dtype.itemsize
            self.prefetch = wfiles.Prefetch(order, min(READ_AHEAD_BYTES, chunk_bytes))

    def skip(self, slot: ParamSlot) -> None:
        """`fill_chunks` for a slot of a chunk read from the files (`file_spans`): its values
        are not needed now; the parameter becomes an empty CPU tensor as after `values`."""
        to_materialized(slot.param, torch.empty(0, dtype=slot.param.dtype))

    def values(self, slot: ParamSlot) -> torch.Tensor:
        """`fill_chunks`' source: the parameter's values. A meta parameter is left an empty
        CPU tensor (wrap makes it a placeholder next)."""
        if self.plan is None and slot.chunk is not self._chunk:
            release_freed_memory()  # once a chunk: the previous chunk's values init made
            self._chunk = slot.chunk
        param = slot.param
        if self.plan is not None and self.plan.has(param):
            value = self.prefetch.get(self.plan.name_of(param))
        elif id(param) not in self.meta_params:
            return param.detach()
        elif self.plan is not None:  # a meta parameter the plan would have named as missing
            raise AssertionError(f"hm.wrap: no value for {slot.name!r}")
        else:
            while id(param) not in self._ready:
                self._init_next()
            value = self._ready.pop(id(param))
        self.skip(slot)
        return value

    def _init_next(self) -> None:
        k, module = self._next, self.modules[self._next]
        self._next += 1
        tensors = _own(module)
        if tensors and not any(t.is_meta or id(t) in self.meta_params for t in tensors):
            return  # a mixed model's materialised part: left as it is
        made = []
        for p in module._parameters.values():
            if p is not None and p.is_meta:
                to_materialized(p, _nan_filled(p))
        for name, b in module._buffers.items():
            if b is not None and b.is_meta:
                module._buffers[name] = _nan_filled(b)
                made.append(name)
        self.init(module)
        self._check_set(module, module._buffers, made, "buffer", "init(module)")
        for name, p in module._parameters.items():
            if p is not None and self._last_owner.get(id(p)) == k and id(p) in self.meta_params:
                # Final once its last owner's init ran (a tied parameter has several).
                self._check_set(module, module._parameters, [name], "parameter", "init(module)")
                self._ready[id(p)] = p.detach()
                to_materialized(p, torch.empty(0, dtype=p.dtype))

    def _check_set(self, module: torch.nn.Module, tensors: dict, names: list[str], kind: str,
                   by: str) -> None:
        """Tensors are materialised filled with NaN: one still NaN at both ends was never set
        (a check of two elements, not a pass over the values)."""
        for name in names:
            t = tensors[name]
            if t is None or not t.is_floating_point() or not t.numel():
                continue
            flat = t.detach().reshape(-1)
            if bool(flat[0].isnan()) and bool(flat[-1].isnan()):
                raise ValueError(f"hm.wrap: {kind} {name!r} of module "
                                 f"{self.names[id(module)]!r} ({type(module).__name__}) was on "
                                 f"the meta device and {by} did not set it; set it there "
                                 f"(meta tensors are materialised filled with NaN, so one left "
                                 "unset shows)")

    # ------------------------------------------------------------------ buffers

    def finish(self) -> None:
        """After the parameters: the modules `init` has not reached yet (those owning no
        parameter), or, with `weights`, every buffer from the files or the model's code."""
        if self.plan is None:
            while self._next < len(self.modules):
                self._init_next()
            return
        for module in self.model.modules():
            for name, b in module._buffers.items():
                if b is not None and self.plan.has(b):
                    value = self.reader.read(self.plan.name_of(b), self.plan.source[id(b)][1])
                    module._buffers[name] = value.to(b.dtype)
        for module, made in self.computed:
            for name in made:
                module._buffers[name] = _nan_filled(module._buffers[name])
            self.init(module)
            self._check_set(module, module._buffers, made, "buffer", "the model's init")

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
        self.reader.close()


def _weights_plan(model: torch.nn.Module, weights: object,
                  adapter_params: set[int]) -> wfiles.WeightsPlan:
    from heteromem.integrations import lora

    files, index = wfiles.weight_files(weights)
    rename = lora.file_name if lora.is_peft_model(model) else (lambda name: name)
    state = type(model).state_dict(model, keep_vars=True)  # names only, nothing copied
    by_tensor: dict[int, wfiles.Target] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        target = by_tensor.setdefault(id(t), wfiles.Target([], [], t, True))
        target.names.append(name)
        target.file_names.append(None if id(t) in adapter_params else rename(name))
    for name, b in model.named_buffers(remove_duplicate=False):
        if id(b) not in by_tensor:  # non-persistent: the files may hold it (old checkpoints)
            by_tensor[id(b)] = wfiles.Target([name], [rename(name)], b, False)
    ignore = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    return wfiles.WeightsPlan(files, index, list(by_tensor.values()), ignore)
