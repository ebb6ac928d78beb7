"""Filling a wrapped model's chunks with parameter values, and putting the model back when a
wrap fails part-way.

`fill_chunks` goes through the chunks in order; for each parameter slot it asks a *source* for
the parameter's values and writes them into the chunk's home: its host buffers (the fp32
master of a trainable chunk and the compute-dtype copy), or, for a chunk the host plan put on
NVMe, a staging slot laid out as its image, written to disk once the chunk is full. The source
decides where values come from (the live parameter tensor, an init function, a safetensors
file); the chunk's buffers decide where they go. One slot's values are in flight at a time.
"""

from __future__ import annotations

from typing import Callable

import torch

from heteromem.distributed import shard as sharding
from heteromem.memory.chunk import Chunk, ParamSlot
from heteromem.memory.file_image import FileSpan
from heteromem.memory.host_plan import HostPlan
from heteromem.memory.nvme import NvmeTier
from heteromem.memory.tiers import Tier

# A source gives a slot's values: a tensor of the parameter's shape (or any shape with
# `slot.numel` elements), of any floating dtype, on any device; `fill_chunks` converts it.
Source = Callable[[ParamSlot], torch.Tensor]


def live_values(slot: ParamSlot) -> torch.Tensor:
    """The source of an ordinary (materialised) model: the parameter's own tensor."""
    return slot.param.detach()


def fill_chunks(chunks: list[Chunk], dtype: torch.dtype, pin: bool, host_tier: Tier,
                nvme: NvmeTier | None, plan: HostPlan, source: Source = live_values,
                from_files: dict[int, list[FileSpan]] | None = None,
                skip: Callable[[ParamSlot], None] | None = None) -> None:
    """Writes every slot's values from `source` into its chunk, chunk by chunk and slot by slot
    in order: into host buffers for the chunks the plan keeps on the host (reserving what the
    plan gave them), into an image on the NVMe tier (through a staging slot) for the others.
    One chunk's values are in host memory at a time besides the host-resident chunks.
    `source(slot)` is called exactly once per slot, in that order, except for the slots of
    the chunks in `from_files` (id -> where the checkpoint files hold them): those chunks are
    read from the files when needed, and `skip(slot)` is called for their slots instead."""
    advice = "raise host_memory" + ("" if nvme is not None else
                                    ", or set nvme_dir so chunks that do not fit go to NVMe")
    if plan.staging_bytes:
        nvme.reserve_staging()
    if plan.shard_bytes:
        host_tier.reserve(plan.shard_bytes, "the reduced gradients of every chunk",
                          advice=advice)
    for chunk in chunks:
        spans = (from_files or {}).get(id(chunk))
        if spans is not None:
            for slot in chunk.slots:
                skip(slot)
            nvme.place_from_files(chunk, spans)
            continue
        if id(chunk) in plan.on_nvme:
            with nvme.staging_lock:
                views = nvme.staging_views(chunk)
                for view in views.values():
                    zero_gaps(view, chunk)
                _write_values(chunk, source, views["params"],
                              views.get("master", views["params"]) if chunk.trainable else None)
                nvme.place_staged(chunk)
            continue
        host_tier.reserve(plan.resident_bytes[id(chunk)], f"chunk {chunk.index} (parameters, "
                          "optimizer states, gradient accumulation)", advice=advice)
        chunk.acc_planned = chunk.trainable and chunk.world == 1
        # NOTE: empty, not zeros: every slot is written below and `zero_gaps` clears the rest,
        # so each page is written once (a memset first would double the work of a load).
        chunk.host = torch.empty(chunk.host_len, dtype=dtype, pin_memory=pin)
        zero_gaps(chunk.host, chunk)
        master = None
        if chunk.trainable:
            if dtype == torch.float32:
                master = chunk.host
            else:
                master = torch.empty(chunk.host_len, dtype=torch.float32, pin_memory=pin)
                zero_gaps(master, chunk)
        _write_values(chunk, source, chunk.host, master)
        if chunk.trainable:
            chunk.master = master
            chunk.states = chunk.new_states(chunk.host_len, pin)


def _write_values(chunk: Chunk, source: Source, params: torch.Tensor,
                  master: torch.Tensor | None) -> None:
    """Each slot's values into `params` (compute dtype) and, trainable, the fp32 `master`
    (rounded into `params` from it, so the two agree as after an optimizer step)."""
    with torch.no_grad():
        for slot in chunk.slots:
            # NOTE: every slot is asked, also those another rank owns (sharded), so a
            # source that makes values in order (init) never has to hold any back.
            data = source(slot)
            part = sharding.owned_part(chunk, slot)
            if part is not None:
                mine, theirs = part
                data = data.reshape(-1)[theirs]
                if master is not None and master is not params:
                    master[mine].copy_(data)
                    params[mine].copy_(master[mine])
                else:
                    params[mine].copy_(data)
            del data  # the next slot's values may be large: drop these first


def zero_gaps(buffer: torch.Tensor, chunk: Chunk) -> None:
    """Zeroes the elements of a chunk's host-side buffer (this rank's part of the chunk)
    that no slot covers: alignment padding and the unused tail."""
    lo, n = chunk.shard_lo, chunk.host_len
    done = 0
    for slot in sorted(chunk.slots, key=lambda s: s.offset):
        start = min(max(slot.offset - lo, 0), n)
        stop = min(max(slot.offset + slot.numel - lo, 0), n)
        if start > done:
            buffer[done:start].zero_()
        done = max(done, stop)
    if done < n:
        buffer[done:n].zero_()


def move_buffers(model: torch.nn.Module, dev: torch.device, dtype: torch.dtype, tier: Tier) -> int:
    """Buffers stay on the device (not paged); floating ones take the compute dtype."""
    total = 0
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            new = buf.to(dev, dtype) if buf.is_floating_point() else buf.to(dev)
            module._buffers[name] = new
            total += new.numel() * new.element_size()
    tier.reserve(total, "the model's buffers", advice="raise device_memory")
    return total


def to_materialized(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Makes `param` (the same object) hold `value`, whether or not either is on the meta
    device: `.data` cannot move a tensor between meta and real storage, `swap_tensors` can."""
    if param.is_meta == value.is_meta:
        param.data = value
        return
    new = torch.nn.Parameter(value, requires_grad=param.requires_grad)
    new.__dict__.update(param.__dict__)  # swap_tensors swaps attributes too: keep param's
    torch.utils.swap_tensors(param, new)


class Undo:
    """Puts a model back as it was before a wrap that failed part-way."""

    def __init__(self, model: torch.nn.Module, slots: list[ParamSlot]) -> None:
        self.params = [(s.param, s.param.data) for s in slots]
        self.buffers = [(m, dict(m._buffers)) for m in model.modules() if m._buffers]
        self.nvme: NvmeTier | None = None

    def __call__(self) -> None:
        for param, data in self.params:
            to_materialized(param, data)
            if hasattr(param, "_heteromem_slot"):
                del param._heteromem_slot
        for module, buffers in self.buffers:
            module._buffers.update(buffers)
        if self.nvme is not None:
            self.nvme.close()
