"""The chunk manager of a model sharded over ranks (ZeRO-3 style).

Each rank's host buffers hold only its part of every chunk (`Chunk.shard_lo:shard_hi`):
parameters in the compute dtype, fp32 master and Adam moments. Making a chunk resident copies
this rank's part into the device slab and all-gathers the other ranks' parts into it. A
gradient is first gathered locally, as on one rank (in its parameter's device slot, or the
full-size fp32 accumulation buffer when the chunk is not resident); at the end of each
backward pass, or when the chunk must leave the device, the local gradients of the chunk are
summed over ranks in fp32 and scattered, each rank keeping its part in `Chunk.grad_shard`.
The optimizer then updates each rank's part only (see WrappedOptimizer).

Collectives must be issued in the same order on every rank, so the decisions that lead to
them depend only on the sequence of module calls, which ranks share (`deterministic`), and
the set of chunks flushed at the end of a backward pass is agreed over the ranks first.
"""

from __future__ import annotations

import errno

import torch

from heteromem.distributed.comm import ShardGroup
from heteromem.distributed.shard import owned_part, reduce_buffer_bytes
from heteromem.errors import storage_error
from heteromem.memory.chunk import Chunk, DeviceState, ParamSlot
from heteromem.memory.manager import ChunkManager

FP32 = torch.float32


class ShardedChunkManager(ChunkManager):
    def __init__(self, *args, comm: ShardGroup, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.comm = comm
        self.deterministic = True
        # NOTE: reducing a chunk needs its fp32 sum and this rank's part on the device. The
        # room is reserved once, here: taken by eviction at each flush, it could only come
        # from evicting another chunk holding gradients, whose own flush would need it too.
        capacity = self.chunks[0].capacity if self.chunks else 0
        self.reduce_bytes = reduce_buffer_bytes(capacity, comm.world)
        self.device_tier.reserve(self.reduce_bytes, "reducing gradients over the ranks",
                                 advice="raise device_memory or lower chunk_mb")
        self._reduce_buffer: torch.Tensor | None = None
        self._part_copied = None  # CUDA event: the last reduced part has left the buffer

    def _reduce_buffers(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        if self._reduce_buffer is None:
            self._reduce_buffer = torch.empty(self.reduce_bytes // 4, dtype=FP32,
                                              device=self.device)
        full = self._reduce_buffer[: chunk.used]
        part = self._reduce_buffer[chunk.capacity: chunk.capacity + chunk.host_len]
        return full, part

    # ------------------------------------------------------------------ residency

    def _fill_device(self, chunk: Chunk) -> object:
        """This rank's part to the slab, then every other rank's part gathered into it."""
        view = chunk.device_view()
        lo, hi = chunk.shard_lo, chunk.shard_hi
        self.copies.h2d(view[lo:hi], chunk.host[: chunk.host_len])
        return self.comm.all_gather_(view, lo, hi, f"gathering chunk {chunk.index}",
                                     stream=self.copies.stream)

    # ------------------------------------------------------------------ gradients

    def _flush(self, chunk: Chunk) -> None:
        """Sums this chunk's local gradients over the ranks (fp32) into each rank's part.

        The first reduction of a step lands in the (zeroed) gradient part by an asynchronous
        copy, waited for in `grads_home` before the norm and the update; a later one (a
        gradient accumulated over backward passes) is added on the host."""
        local = [s for s in chunk.slots if s.grad_loc in ("device", "acc")]
        what = f"reducing the gradients of chunk {chunk.index}"
        full, part = self._reduce_buffers(chunk)
        # NOTE: the previous flush's copy may still read the shared buffer.
        self.copies.wait_for_device_use(self._part_copied)
        first = not any(s.reduced for s in chunk.slots)
        full.zero_()
        had_device = any(s.grad_loc == "device" for s in local)
        for slot in local:
            if slot.grad_loc == "device":
                self._wait_loaded(chunk)
                full[slot.range].copy_(chunk.device_view()[slot.range])
            else:
                full[slot.range].add_(chunk.acc[slot.range].to(self.device))
            slot.grad_loc, slot.reduced = None, True
        self.comm.reduce_scatter(part, full, what)
        if first:
            self._part_copied = chunk.d2h_event = self.copies.d2h(self._grad_shard(chunk), part)
        else:
            self.copies.wait_for_host_use(chunk.d2h_event)
            chunk.d2h_event = None
            self.copies.bytes_d2h += part.numel() * 4  # device tier -> host tier
            self._grad_shard(chunk).add_(part.to("cpu"))
        if chunk.acc is not None:  # only needed until the next flush: give the room back
            self.host_tier.release(chunk.used * 4)
            chunk.acc = None
        if had_device:
            # The device copy holds gradients where parameters were: gather before reuse.
            chunk.device_stale = True
        if chunk.device_state is DeviceState.MIXED:
            chunk.move_device(DeviceState.PARAMS)

    def grad_ready(self, slot: ParamSlot, grad: torch.Tensor) -> None:
        """As on one rank; and once every parameter of the chunk has its gradient of this
        backward pass, the chunk is reduced at once, so the collective overlaps the rest of
        the backward instead of queueing at its end (every rank sees the gradients complete
        in the same order: the same graph)."""
        super().grad_ready(slot, grad)
        chunk = slot.chunk
        expected = [s for s in chunk.slots if s.trainable and s.group >= 0]
        if expected and all(s.grad_loc in ("device", "acc") for s in expected):
            self._flush(chunk)

    def _grad_shard(self, chunk: Chunk) -> torch.Tensor:
        if chunk.grad_shard is None:  # (its room was planned at wrap: host_plan.py)
            chunk.grad_shard = torch.zeros(chunk.host_len, dtype=FP32,
                                           pin_memory=self.copies.cuda)
        return chunk.grad_shard

    def _spill(self, chunk: Chunk, slots: list[ParamSlot]) -> None:
        """A parameter whose gradient took its device slot is needed again: reduce the
        chunk's gradients now and gather its values back."""
        self._flush(chunk)
        self._make_resident(chunk)

    def end_backward(self) -> None:
        """Reduces every chunk holding local gradients on any rank (agreed first: a rank that
        did not use a parameter still joins the sum, with zeros)."""
        trainable = [c for c in self.chunks if c.trainable]
        pending = [any(s.grad_loc in ("device", "acc") for s in c.slots) for c in trainable]
        agreed = self.comm.any(pending, "agreeing which chunks hold gradients")
        for chunk, flush in zip(trainable, agreed):
            if flush:
                self._flush(chunk)

    def grad_source(self, chunk: Chunk) -> torch.Tensor | None:
        if any(s.reduced for s in chunk.slots):
            return chunk.grad_shard
        return None

    def grad_ranges(self, chunk: Chunk) -> list[tuple[ParamSlot, slice]]:
        """(slot, range in this rank's buffers) of each slot with a gradient that overlaps
        this rank's part of the chunk."""
        return [(slot, part[0]) for slot in chunk.slots
                if slot.reduced and (part := owned_part(chunk, slot)) is not None]

    def full(self, chunk: Chunk, mine: torch.Tensor, elements_per_item: int = 1) -> torch.Tensor:
        """Every rank's part gathered (on the CPU group: a collective, so every rank must ask
        for the same chunks in the same order). Parts are multiples of the chunk's alignment,
        so a block-scaled region's part holds whole items."""
        items = chunk.host_len // elements_per_item
        out = torch.empty(items * chunk.world, dtype=mine.dtype)
        self.comm.gather_host(out, mine[:items], f"gathering chunk {chunk.index}")
        return out

    def sum_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.comm.sum_(t, "summing the gradient norm").item())

    def agree_nvme(self, error: BaseException | None) -> BaseException | None:
        """An NVMe step commits on every rank or on none: a rank whose states moved on while
        another's did not would train on a model its peers no longer have."""
        reason = self.comm.agree(None if error is None else f"{type(error).__name__}: {error}",
                                 "agreeing on the NVMe step")
        if error is not None or reason is None:
            return error
        return storage_error(errno.EIO, f"{reason}; this rank's NVMe step was not committed "
                            "either")

    @property
    def grad_divisor(self) -> int:
        """Gradients are summed over ranks; the update uses their mean, as DDP does."""
        return self.comm.world
