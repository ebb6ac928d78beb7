"""`hm.unwrap`: a wrapped model back as an ordinary module, heteromem's memory released."""

from __future__ import annotations

import torch

from heteromem.runtime.checkpoint.save import wait_checkpoint
from heteromem.runtime.state_dict import _Masters
from heteromem.runtime.wrapped import wrapped_state


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Gives `model` (wrapped by `hm.wrap`) back as an ordinary `nn.Module` with full CPU
    tensors, and releases everything heteromem held for it (host and device chunks, optimizer
    states, NVMe files). Returns the same module object.

    Parameters get their current values in the dtype they had before wrapping (fp32 masters
    for trainable ones), buffers their dtype from before wrapping; gradients not yet applied
    by `opt.step()` are dropped. The optimizer `hm.wrap` returned is finished: its `step()`
    and `zero_grad()` raise. The whole model is then in RAM: this is for models that fit
    there (inspection, PEFT's `merge_and_unload()`, handing over to other code); to save a
    large model use `hm.export_pretrained` or `hm.export_safetensors`, which stream.

    Sharded over ranks, every rank must call it (each chunk is gathered from the ranks'
    parts) and every rank gets the whole model.
    """
    state = wrapped_state(model, "hm.unwrap", "it is an ordinary module already")
    wait_checkpoint(model)  # a flash save still writing reads the chunks
    state.synchronize()
    manager = state.manager
    if state.optimizer is not None:
        state.optimizer.zero_grad()  # gradients in flight go; values stay the masters'
    values: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    masters = _Masters(manager)
    for chunk in manager.chunks:
        for slot in chunk.slots:
            source = masters.get(chunk)[slot.range]
            values.append((slot.param, source.view(slot.shape).to("cpu", slot.orig_dtype,
                                                                   copy=True)))
        _release_chunk(manager, chunk)
    del masters
    state.checkpoint_snapshot = None
    state.hooks.remove()
    for name in ("state_dict", "load_state_dict"):  # the instance's own, set by wrap
        model.__dict__.pop(name, None)
    for param, value in values:
        param.data = value
        param.__dict__.pop("_heteromem_slot", None)
    for module, name, dtype in state.buffer_dtypes:
        buf = module._buffers.get(name)
        if buf is not None:
            module._buffers[name] = buf.to("cpu", dtype)
    if manager.cache is not None:
        manager.cache.drop_all()
    if manager.nvme is not None:
        manager.nvme.close()
    manager.chunks.clear()
    if state.optimizer is not None:
        state.optimizer.released = "its model was unwrapped by hm.unwrap"
    model.__dict__.pop("_heteromem", None)
    return model


def _release_chunk(manager, chunk) -> None:
    """Drops every buffer a chunk holds (the tiers' accounting goes with the manager)."""
    if chunk.allocated:
        manager.memory.free(chunk.device_buffer)
        chunk.allocated = False
    chunk.device_buffer = None
    chunk.host = chunk.master = chunk.states = None
    chunk.acc = chunk.grad_shard = None
