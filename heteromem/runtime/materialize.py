"""Filling a wrapped model's chunks with parameter values, and putting the model back when a
wrap fails part-way.

`fill_chunks` goes through the chunks in order; for each parameter slot it asks a *source* for
the parameter's values and writes them into the chunk's host buffers (the fp32 master of a
trainable chunk and the compute-dtype copy), then moves on. The source decides where values
come from (the live parameter tensor, an init function, a safetensors file); the chunk's
buffers decide where they go. One slot's values are in flight at a time.
"""

from __future__ import annotations

from typing import Callable

import torch

from heteromem.distributed import shard as sharding
from heteromem.memory.chunk import Chunk, ParamSlot
from heteromem.memory.nvme import NvmeTier
from heteromem.memory.tiers import Tier

# A source gives a slot's values: a tensor of the parameter's shape (or any shape with
# `slot.numel` elements), of any floating dtype, on any device; `fill_chunks` converts it.
Source = Callable[[ParamSlot], torch.Tensor]


def live_values(slot: ParamSlot) -> torch.Tensor:
    """The source of an ordinary (materialised) model: the parameter's own tensor."""
    return slot.param.detach()


def fill_chunks(chunks: list[Chunk], dtype: torch.dtype, pin: bool, host_tier: Tier,
                nvme: NvmeTier | None, on_nvme: set[int], source: Source = live_values) -> None:
    """Allocates each chunk's host buffers and writes every slot's values from `source` into
    them, chunk by chunk and slot by slot in order; the optimizer states of the chunks in
    `on_nvme` are written to the NVMe tier instead. `source(slot)` is called exactly once per
    slot, in that order."""
    elem = torch.empty((), dtype=dtype).element_size()
    advice = "raise host_memory" + ("" if nvme is not None else
                                    ", or set nvme_dir to keep optimizer states on NVMe")
    for chunk in chunks:
        host_tier.reserve(chunk.host_len * elem, f"parameters of chunk {chunk.index}",
                          advice=advice)
        # NOTE: empty, not zeros: every slot is written below and `zero_gaps` clears the rest,
        # so each page is written once (a memset first would double the work of a load).
        chunk.host = torch.empty(chunk.host_len, dtype=dtype, pin_memory=pin)
        zero_gaps(chunk.host, chunk)
    if on_nvme:
        nvme.reserve_staging()
    for chunk in chunks:
        master = None
        if chunk.trainable:
            if id(chunk) in on_nvme or dtype != torch.float32:
                master = torch.empty(chunk.host_len, dtype=torch.float32,
                                     pin_memory=pin and id(chunk) not in on_nvme)
                zero_gaps(master, chunk)
            else:
                master = chunk.host
        with torch.no_grad():
            for slot in chunk.slots:
                # NOTE: every slot is asked, also those another rank owns (sharded), so a
                # source that makes values in order (init) never has to hold any back.
                data = source(slot)
                part = sharding.owned_part(chunk, slot)
                if part is not None:
                    mine, theirs = part
                    data = data.reshape(-1)[theirs]
                    if master is not None and master is not chunk.host:
                        master[mine].copy_(data)
                        chunk.host[mine].copy_(master[mine])
                    else:
                        chunk.host[mine].copy_(data)
                del data  # the next slot's values may be large: drop these first
        if not chunk.trainable:
            continue
        if id(chunk) in on_nvme:
            nvme.place(chunk, master, None, None)
            continue
        host_tier.reserve(chunk.state_bytes(), f"optimizer state of chunk {chunk.index}",
                          advice=advice)
        chunk.master = master
        chunk.exp_avg = torch.zeros(chunk.host_len, dtype=torch.float32, pin_memory=pin)
        chunk.exp_avg_sq = torch.zeros(chunk.host_len, dtype=torch.float32, pin_memory=pin)


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
