"""`state_dict()` / `load_state_dict()` of a wrapped model work on full tensors.

Parameters are placeholders while their chunk is off the device, so the wrapped model's
own methods are replaced (on this instance only) by versions that read parameters from the
chunks: the fp32 master for trainable ones, the host copy for frozen ones, in the dtype the
parameter had before wrapping.
"""

from __future__ import annotations

import types
from collections import OrderedDict

import torch

from heteromem.distributed.shard import owned_part
from heteromem.memory.chunk import HostState


def _slot_names(model: torch.nn.Module) -> dict[str, object]:
    """Every state-dict name of every wrapped parameter (tied parameters have several)."""
    return {name: p._heteromem_slot for name, p in model.named_parameters(remove_duplicate=False)
            if getattr(p, "_heteromem_slot", None) is not None}


class _Masters:
    """A chunk's full values, indexable by `slot.range`: the fp32 master of a trainable chunk
    (read from NVMe when it lives there), the host copy of a frozen one. One chunk's at a
    time: an NVMe view is into a staging buffer that the next read reuses. Sharded over
    ranks, each chunk is gathered from every rank's part (a collective: every rank must
    read the same chunks in the same order), so one chunk is held in full at a time."""

    def __init__(self, manager) -> None:
        self.manager, self.chunk, self.master = manager, None, None

    def get(self, chunk) -> torch.Tensor:
        if chunk is not self.chunk:
            mine = (self.manager.states(chunk)["master"] if chunk.trainable
                    else self.manager.values(chunk))
            self.chunk = chunk
            self.master = None  # drop the previous chunk first
            self.master = self.manager.full(chunk, mine)
        return self.master


def install_state_dict_methods(model: torch.nn.Module, state) -> None:
    original_state_dict = model.state_dict
    original_load = model.load_state_dict

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        state.synchronize()
        out = original_state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        masters = _Masters(state.manager)
        # In chunk order, so a master on NVMe is read once.
        for name, slot in sorted(_slot_names(self).items(), key=lambda kv: kv[1].chunk.index):
            key = prefix + name
            if key in out:
                source = masters.get(slot.chunk)
                out[key] = source[slot.range].view(slot.shape).to("cpu", slot.orig_dtype, copy=True)
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state.synchronize()
        names = _slot_names(self)
        for name, slot in names.items():
            if name in state_dict and tuple(state_dict[name].shape) != tuple(slot.shape):
                raise ValueError(f"load_state_dict: {name!r} has shape {tuple(state_dict[name].shape)} "
                                 f"in the state dict but {tuple(slot.shape)} in the model")
        rest = OrderedDict((k, v) for k, v in state_dict.items() if k not in names)
        result = original_load(rest, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k not in names]
        missing += [n for n in names if n not in state_dict]
        unexpected = list(result.unexpected_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: "
                               f"missing keys {missing}, unexpected keys {unexpected}")
        if state.optimizer is not None:
            state.optimizer.zero_grad()
        state.manager.settle_loads()
        by_chunk: dict[int, list] = {}
        for name, slot in names.items():
            if name in state_dict:
                by_chunk.setdefault(slot.chunk.index, []).append((slot, state_dict[name]))
        with torch.no_grad():
            for items in by_chunk.values():
                chunk = items[0][0].chunk
                assert chunk.host_state is HostState.PARAMS
                # On NVMe: read the chunk's image, change it, write it back (atomically).
                image = state.manager.image(chunk)
                params, master = image["params"], image.get("master")
                for slot, value in items:
                    part = owned_part(chunk, slot)
                    if part is None:  # sharded: another rank owns all of this parameter
                        continue
                    mine, theirs = part
                    value = value.reshape(-1)[theirs].to(params.device)
                    if master is not None:
                        master[mine].copy_(value)
                        params[mine].copy_(master[mine])
                    else:
                        params[mine].copy_(value)
                state.manager.store_image(chunk)
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    model.state_dict = types.MethodType(state_dict, model)
    model.load_state_dict = types.MethodType(load_state_dict, model)
