"""The chunk manager: which chunks are on the device, moving them, and where gradients go.

Hooks call `acquire` before a module uses its parameters (forward, backward, recompute) and
`release` after; `grad_ready` takes each parameter's gradient as autograd finishes it;
`end_backward` sends every gradient still on the device home. The optimizer reads
gradients through `grad_source` and writes updates through the host buffers.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable

import torch

from heteromem.errors import OutOfMemory, format_bytes
from heteromem.memory.chunk import Chunk, DeviceState, HostState, ParamSlot
from heteromem.memory.streams import CopyEngine
from heteromem.memory.tiers import DeviceChunkMemory, Tier
from heteromem.memory.timeline import TimelineRecorder
from heteromem.memory.tracer import Trace

if TYPE_CHECKING:
    from heteromem.memory.host_cache import HostCache
    from heteromem.memory.nvme import NvmeTier

PREFETCH_CHUNKS = 2
HOST_PREFETCH_CHUNKS = 2


class ChunkManager:
    def __init__(self, chunks: list[Chunk], device: torch.device, device_tier: Tier,
                 host_tier: Tier, slab_bytes: int) -> None:
        self.chunks = chunks
        self.device = device
        self.device_tier, self.host_tier = device_tier, host_tier
        self.memory = DeviceChunkMemory(device_tier, slab_bytes, device)
        self.copies = CopyEngine(device)
        # Chunks copied ahead of their use. On a CPU "device" a copy cannot overlap anything,
        # so none by default (tests turn it on to run the same logic).
        self.prefetch_depth = PREFETCH_CHUNKS if self.copies.cuda else 0
        self.trace = Trace()
        self.timeline = TimelineRecorder([device_tier, host_tier])
        self.copies.on_stall = self.timeline.stall
        self.fp32 = chunks[0].dtype == torch.float32 if chunks else False
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self.update_stall_seconds = 0.0
        # Set by the optimizer: called as (chunk, exception) when an update failed.
        self.on_update_failed = None
        # Why a forward with autograd on must wait (a step that failed part-way), or None.
        self.unfinished_step: str | None = None
        self._nvme: NvmeTier | None = None
        # Host buffers of the chunks whose image is on NVMe (set by wrap with the NVMe tier).
        self.cache: HostCache | None = None
        # Chunks read ahead from NVMe into the host cache, beyond the device prefetch.
        self.host_prefetch_depth = HOST_PREFETCH_CHUNKS
        # NVMe bytes (read, written) of the last whole iteration, and at the current one's start.
        self.last_iteration_io: tuple[int, int] | None = None
        self._iteration_io: tuple[int, int] | None = None
        # Most chunks (not kept on the device) pinned at once so far: what paging needs. (A
        # chunk's keep_on_device only changes while it is unpinned, so the count stays true.)
        self.peak_pinned = 0
        self._pinned_now = 0
        # Sharded models gather chunks with collectives, which every rank must issue in the
        # same order: then no paging decision may depend on timing (whether a copy or an
        # update has finished yet), only on the sequence of acquires, which ranks share.
        self.deterministic = False

    @property
    def nvme(self) -> NvmeTier | None:
        """The NvmeTier when nvme_dir was given, else None."""
        return self._nvme

    @nvme.setter
    def nvme(self, nvme: NvmeTier | None) -> None:
        self._nvme = nvme
        if nvme is not None:  # its file bytes and waits join the memory timeline
            self.timeline.add_tier(nvme.tier)
            nvme.on_stall = self.timeline.stall

    def count_iteration(self) -> None:
        """An iteration begins: NVMe bytes read and written in the one that ended are kept
        (the report's per-step figures)."""
        if self.nvme is None:
            return
        now = (self.nvme.bytes_read, self.nvme.bytes_written)
        start = self._iteration_io
        if start is not None:
            self.last_iteration_io = (now[0] - start[0], now[1] - start[1])
        self._iteration_io = now

    def nvme_emptied(self) -> None:
        """No chunk has an image on NVMe any more: the pool files and the host cache's room
        are given back."""
        self.nvme.remove_pools()
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def use_cache(self, cache: HostCache) -> None:
        self.cache = cache
        cache.trace = self.trace
        cache.before_evict = self._host_buffer_idle
        cache.wait_update = self._wait_update

    # ------------------------------------------------------------------ parameter views

    def placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        """An empty tensor standing in for a parameter that is not on the device."""
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return self._placeholders[dtype]

    def _bind(self, chunk: Chunk) -> None:
        view = chunk.device_view()
        for slot in chunk.slots:
            slot.param.data = view[slot.range].view(slot.shape)

    def _unbind(self, chunk: Chunk) -> None:
        for slot in chunk.slots:
            slot.param.data = self.placeholder(chunk.dtype)

    # ------------------------------------------------------------------ residency

    def acquire(self, slots: Iterable[ParamSlot]) -> list[Chunk]:
        """Makes the chunks of `slots` resident with those parameters' values, and pins them.
        Returns the pinned chunks (pass them to `release`)."""
        # Device buffers and parameter views made under torch.inference_mode() would be
        # inference tensors, unusable by every later training step. (Entering the context
        # costs as much as the rest of a call: only when it matters.)
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return self._acquire(slots)
        return self._acquire(slots)

    def _acquire(self, slots: Iterable[ParamSlot]) -> list[Chunk]:
        by_chunk: dict[int, list[ParamSlot]] = {}
        for slot in slots:
            by_chunk.setdefault(slot.chunk.index, []).append(slot)
        pinned = []
        for index, needed in by_chunk.items():
            chunk = self.chunks[index]
            self.trace.record(index)
            self._make_resident(chunk)
            if any(s.grad_loc == "device" for s in needed):
                self._spill(chunk, [s for s in needed if s.grad_loc == "device"])
            chunk.pins += 1
            if chunk.pins == 1 and not chunk.keep_on_device:
                self._pinned_now += 1
                self.peak_pinned = max(self.peak_pinned, self._pinned_now)
            pinned.append(chunk)
        for chunk in pinned:
            if chunk.device_state is DeviceState.LOADING:
                self.copies.wait_for_device_use(chunk.load_event)
                chunk.load_event = None
                chunk.move_device(DeviceState.PARAMS)
        self._prefetch()
        return pinned

    def release(self, chunks: Iterable[Chunk]) -> None:
        for chunk in chunks:
            if chunk.pins <= 0:
                raise AssertionError(f"chunk {chunk.index} released more often than acquired")
            chunk.pins -= 1
            if chunk.pins == 0 and not chunk.keep_on_device:
                self._pinned_now -= 1

    def soften(self, chunks: Iterable[Chunk]) -> None:
        """Turns pins into soft pins: the chunks stay resident while the device tier has room,
        but may be evicted when nothing else can go (see `_pick_victim`)."""
        for chunk in chunks:
            self.release([chunk])
            chunk.soft_pins += 1

    def release_soft(self, chunks: Iterable[Chunk]) -> None:
        for chunk in chunks:
            if chunk.soft_pins <= 0:
                raise AssertionError(f"chunk {chunk.index} soft-released more often than softened")
            chunk.soft_pins -= 1

    def _make_resident(self, chunk: Chunk) -> None:
        self._wait_update(chunk)
        if chunk.resident and not chunk.device_stale:
            return
        if chunk.host_state is HostState.GRADS:
            # The host buffer holds gradients but the values are needed again (gradient
            # accumulation, or a parameter reused after its gradient was sent home).
            self._activate_acc(chunk)
        if not chunk.allocated:
            self._allocate(chunk)
        if chunk.nvme is not None:
            self.cache.ensure(chunk)  # (after _allocate: its evictions may need the cache)
        chunk.load_event = self._fill_device(chunk)
        chunk.move_device(DeviceState.LOADING)
        chunk.device_stale = False
        self._bind(chunk)

    def _fill_device(self, chunk: Chunk) -> object:
        """Starts filling the chunk's slab with its values; returns the copy's event."""
        return self.copies.h2d(chunk.device_view(), chunk.host[: chunk.used])

    def _allocate(self, chunk: Chunk) -> None:
        self.make_room(self.memory.slab_bytes, f"chunk {chunk.index}", exclude=chunk)
        chunk.device_buffer = self.memory.allocate(chunk.device_buffer, chunk.dtype, chunk.capacity,
                                                   f"chunk {chunk.index}")
        chunk.allocated = True

    def make_room(self, nbytes: int, what: str, exclude: Chunk | None = None) -> None:
        """Evicts unpinned chunks (furthest next use first) until `nbytes` fit the device tier."""
        while not self.device_tier.fits(nbytes):
            victim = self._pick_victim(exclude=exclude)
            if victim is None:
                in_use = [c for c in self.chunks if c.allocated]
                kept = sum(1 for c in in_use if c.keep_on_device)
                raise OutOfMemory(
                    "device", nbytes, max(self.device_tier.left() or 0, 0),
                    f"{len(in_use) - kept} chunk(s) of {format_bytes(self.memory.slab_bytes)} are in "
                    f"use" + (f" and {kept} kept on the device" if kept else "")
                    + f", and {what} needs room too; raise device_memory, lower chunk_mb, or keep "
                    "fewer modules on the device", what=what)
            self.evict(victim)

    def _pick_victim(self, exclude: Chunk | None = None) -> Chunk | None:
        """The evictable chunk used furthest in the future; soft-pinned chunks only when no
        other chunk can go."""
        best, best_key = None, (True, -1.0)
        for c in self.chunks:
            if c.device_state is DeviceState.LOADING and c.pins == 0:
                self._settle(c, block=self.deterministic)
            if (c is exclude or c.pins > 0 or c.keep_on_device or not c.allocated
                    or c.device_state is DeviceState.LOADING):
                continue
            key = (c.soft_pins == 0, self.trace.eviction_key(c.index))
            if best is None or key > best_key:
                best, best_key = c, key
        return best

    def _settle(self, chunk: Chunk, block: bool) -> None:
        """A prefetched chunk whose copy has landed is an ordinary resident chunk (and may be
        evicted if its use never comes); one still loading stays untouchable unless `block`
        waits for its copy."""
        if chunk.load_event is not None and not chunk.load_event.query():
            if not block:
                return
            chunk.load_event.synchronize()
        chunk.load_event = None
        chunk.move_device(DeviceState.PARAMS)

    def evict(self, chunk: Chunk) -> None:
        """Frees the device copy; gradients on it are sent home first."""
        if chunk.device_state is DeviceState.MIXED:
            self._flush(chunk)
        self._unbind(chunk)
        if self.copies.cuda:
            # NOTE: copies on the copy stream may still read this storage; the caching
            # allocator must not hand it out before they finish.
            chunk.device_buffer.record_stream(self.copies.stream)
        self.memory.free(chunk.device_buffer)
        chunk.allocated = False
        if chunk.device_state is not DeviceState.ABSENT:
            chunk.move_device(DeviceState.ABSENT)

    def _prefetch(self) -> None:
        """Start copying the chunks the trace expects next, so the copy overlaps
        the compute before their use. When no slab is free, a chunk whose next use comes
        later than the prefetched one's is evicted for it (what furthest-next-use eviction
        would do at that chunk's use anyway, only earlier). Chunks on NVMe are read into the
        host cache further ahead still."""
        if self.cache is not None and not self.deterministic:
            self._prefetch_host()
        if not self.prefetch_depth:
            return
        for index in self.trace.upcoming(self.prefetch_depth):
            chunk = self.chunks[index]
            if chunk.resident and not chunk.device_stale:
                continue
            if chunk.update is not None and self.deterministic:
                self._wait_update(chunk)  # whether it is done yet must not decide anything
            if chunk.update is not None and not chunk.update.done():
                return  # its optimizer update is still running; prefetch it later
            if chunk.host_state is not HostState.PARAMS:
                return
            if not chunk.allocated and not self.memory.fits():
                victim = self._pick_victim(exclude=chunk)
                if (victim is None or victim.soft_pins > 0 or self.trace.eviction_key(victim.index)
                        <= self.trace.eviction_key(chunk.index)):
                    return
                self.evict(victim)
            self._make_resident(chunk)

    def _prefetch_host(self) -> None:
        for index in self.trace.upcoming(self.prefetch_depth + self.host_prefetch_depth):
            chunk = self.chunks[index]
            if chunk.nvme is None or (chunk.resident and not chunk.device_stale):
                continue
            if chunk.update is not None and not chunk.update.done():
                return  # its image is being rewritten
            if not self.cache.prefetch(chunk):
                return

    def _host_buffer_idle(self, chunk: Chunk) -> None:
        """Waits for the copies that read or fill the chunk's host buffer."""
        if chunk.device_state is DeviceState.LOADING:
            self._settle(chunk, block=True)
        if chunk.d2h_event is not None:
            self.copies.wait_for_host_use(chunk.d2h_event)
            chunk.d2h_event = None

    # ------------------------------------------------------------------ gradients

    def grad_ready(self, slot: ParamSlot, grad: torch.Tensor) -> None:
        """Takes a parameter's (accumulated) gradient from autograd: into the parameter's own
        device slot when the chunk is resident, else into the fp32 accumulation buffer."""
        if slot.group < 0:
            # Trainable but given to no optimizer param group: torch's optimizer would never
            # read this gradient, and storing it would overwrite the parameter in its slot.
            return
        chunk = slot.chunk
        flat = grad.reshape(-1)
        if slot.grad_loc == "device":
            self._wait_loaded(chunk)
            chunk.device_view()[slot.range].add_(flat)
        elif (slot.grad_loc is None and not chunk.device_stale
              and chunk.device_state in (DeviceState.PARAMS, DeviceState.MIXED)):
            chunk.device_view()[slot.range].copy_(flat)
            slot.grad_loc = "device"
            if chunk.device_state is DeviceState.PARAMS:
                chunk.move_device(DeviceState.MIXED)
        else:
            self._activate_acc(chunk)
            chunk.acc[slot.range].add_(self._to_acc(chunk, flat))
            slot.grad_loc = "acc"

    def _wait_loaded(self, chunk: Chunk) -> None:
        if chunk.device_state is DeviceState.LOADING:
            self.copies.wait_for_device_use(chunk.load_event)
            chunk.load_event = None
            chunk.move_device(DeviceState.PARAMS)

    def end_backward(self) -> None:
        """Sends every gradient still on the device home (grads are complete per backward)."""
        for chunk in self.chunks:
            self.send_home(chunk)

    def send_home(self, chunk: Chunk) -> None:
        """Starts copying the chunk's gradients on the device home, unless its optimizer
        state is on the device: they are used there."""
        if chunk.device_state is DeviceState.MIXED and not chunk.states_on_device:
            self._flush(chunk)

    def _flush(self, chunk: Chunk) -> None:
        """Device gradients -> host. The whole chunk is copied into the host buffer when it
        holds parameters and no accumulation is active (one large copy; slots without a
        gradient carry the unchanged parameter value); otherwise each gradient is added into
        the fp32 accumulation buffer."""
        on_device = [s for s in chunk.slots if s.grad_loc == "device"]
        if not on_device:
            chunk.move_device(DeviceState.PARAMS)
            return
        acc_in_use = any(s.grad_loc in ("acc", "nvme") for s in chunk.slots)
        # NOTE: the whole device copy goes into the host buffer in one piece: its values
        # come back from the fp32 master (or, on NVMe, the image) if they are needed again.
        # In fp32 the host buffer *is* the master, so gradients go to the accumulation buffer.
        if (not acc_in_use and (not self.fp32 or chunk.nvme is not None)
                and chunk.host_state is HostState.PARAMS):
            if chunk.nvme is not None:
                self.cache.buffer_for_grads(chunk)
            chunk.d2h_event = self.copies.d2h(chunk.host[: chunk.used], chunk.device_view())
            chunk.move_host(HostState.GRADS)
            for slot in on_device:
                slot.grad_loc = "host"
        else:
            self._activate_acc(chunk)
            view = chunk.device_view()
            for slot in on_device:
                chunk.acc[slot.range].add_(self._to_acc(chunk, view[slot.range]))
                slot.grad_loc = "acc"
        # The device copy now holds gradients where parameters were: reload before reuse.
        chunk.device_stale = True
        chunk.move_device(DeviceState.PARAMS)

    def _spill(self, chunk: Chunk, slots: list[ParamSlot]) -> None:
        """A parameter whose gradient took its device slot is needed again: add the gradients
        into the accumulation buffer and restore the values from the host."""
        self._activate_acc(chunk)
        view = chunk.device_view()
        events = []
        for slot in slots:
            chunk.acc[slot.range].add_(self._to_acc(chunk, view[slot.range]))
            slot.grad_loc = "acc"
            if chunk.states_on_device:  # the host copy is not kept current for these chunks
                view[slot.range].copy_(chunk.master[slot.range])
            else:
                if chunk.nvme is not None:
                    self.cache.ensure(chunk)
                events.append(self.copies.h2d(view[slot.range], chunk.host[slot.range]))
        for event in events:
            self.copies.wait_for_device_use(event)
        if not any(s.grad_loc == "device" for s in chunk.slots):
            chunk.move_device(DeviceState.PARAMS)

    def _to_acc(self, chunk: Chunk, t: torch.Tensor) -> torch.Tensor:
        """`t` as fp32 on the device of the chunk's accumulation buffer (counting the copy)."""
        if chunk.states_on_device:
            return t.to(self.device, torch.float32)
        self.copies.bytes_d2h += t.numel() * t.element_size()  # device tier -> host tier
        return t.to("cpu", torch.float32)

    def _activate_acc(self, chunk: Chunk) -> None:
        """Gives the chunk an fp32 gradient accumulation buffer and moves host gradients into
        it, restoring the parameter values on the host from the fp32 master (or the image)."""
        if chunk.acc is None:
            nbytes = chunk.used * 4
            what = f"gradient accumulation of chunk {chunk.index}"
            if chunk.states_on_device:
                self.make_room(nbytes, what, exclude=chunk)
                self.device_tier.reserve(nbytes, what,
                                         advice="raise device_memory or lower chunk_mb")
                chunk.acc = torch.zeros(chunk.used, dtype=torch.float32, device=self.device)
            else:
                if chunk.nvme is not None:
                    self.cache.reserve_acc(chunk, nbytes)
                elif not chunk.acc_planned:  # (planned at wrap: host_plan.py)
                    self.host_tier.reserve(nbytes, what,
                                           advice="raise host_memory or lower chunk_mb")
                chunk.acc = torch.zeros(chunk.used, dtype=torch.float32,
                                        pin_memory=self.copies.cuda)
        if chunk.grad_spill is not None:
            # Gradients the host cache wrote to NVMe join the buffer again.
            self._read_spilled_into_acc(chunk)
        if chunk.host_state is HostState.GRADS:
            self.copies.wait_for_host_use(chunk.d2h_event)
            chunk.d2h_event = None
            for slot in chunk.slots:
                if slot.grad_loc == "host":
                    chunk.acc[slot.range].add_(chunk.host[slot.range])
                    slot.grad_loc = "acc"
            self.restore_host(chunk)
            chunk.move_host(HostState.PARAMS)

    def _read_spilled_into_acc(self, chunk: Chunk) -> None:
        spill = chunk.grad_spill
        nvme = self.nvme
        nvme.reserve_staging()
        with nvme.staging_lock:
            staging = nvme.slots[0]
            nvme.wait(nvme.submit_read_grads(chunk, staging))
            grads = staging.grads(spill.dtype, spill.used)
            for slot in chunk.slots:
                if slot.grad_loc == "nvme":
                    chunk.acc[slot.range].add_(grads[slot.range])
                    slot.grad_loc = "acc"
        nvme.drop_grads(chunk)

    def restore_host(self, chunk: Chunk) -> None:
        """The host buffer gets its parameter values back from the fp32 master, or from the
        image on NVMe (after it held gradients, or an update that was undone)."""
        if chunk.nvme is not None:
            self.cache.reload(chunk)
            return
        chunk.host[: chunk.host_len].copy_(self.states(chunk)["master"])

    def states(self, chunk: Chunk) -> dict[str, torch.Tensor]:
        """A trainable chunk's fp32 master and optimizer state regions by name (``master``
        first, then its layout's regions), where they live now (host or device tensors). An
        image on NVMe is read into staging slot 0: the views stay valid until that slot is
        used again, and `store_image(chunk)` writes changes back."""
        if chunk.nvme is not None:
            image = self.image(chunk)
            out = {"master": image.get("master", image["params"])}
            out.update((r.name, image[r.name]) for r in chunk.layout.state_regions)
            return out
        return {"master": chunk.master, **chunk.states}

    def image(self, chunk: Chunk) -> dict[str, torch.Tensor]:
        """Every tensor of the chunk by region name: params (compute dtype) and, trainable,
        master (not in fp32, where the params are the master) and the optimizer's regions.
        On NVMe, views into staging slot 0, valid until it is used again (`store_image`
        writes them back); else the live tensors."""
        if chunk.nvme is not None:
            return self.nvme.load(chunk)
        out = {"params": self.values(chunk)}
        if chunk.trainable:
            if chunk.master is not chunk.host or chunk.states_on_device:
                out["master"] = chunk.master
            out.update(chunk.states)
        return out

    def store_image(self, chunk: Chunk) -> None:
        """After the tensors `image` returned were changed: an NVMe image is written back
        (atomically) and the host cache's copy of its values refreshed; the device copy is
        marked stale."""
        if chunk.nvme is not None:
            self.nvme.store(chunk)
            if chunk.host is not None:
                params = self.nvme.slots[0].view("params", chunk.host_len, chunk.nvme.layout)
                chunk.host[: chunk.host_len].copy_(params)
        if chunk.resident and not chunk.states_on_device:
            chunk.device_stale = True

    def values(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's current parameter values in the compute dtype: the device copy when its
        optimizer state lives there (the host copy is not kept then), else the host buffer
        (read from the image first for a chunk on NVMe)."""
        if chunk.states_on_device:
            return chunk.device_view()
        if chunk.nvme is not None:
            self.cache.ensure(chunk)
        return chunk.host[: chunk.host_len]

    def full(self, chunk: Chunk, mine: torch.Tensor, elements_per_item: int = 1) -> torch.Tensor:
        """A host tensor of this rank's (`mine`: a buffer laid out like the chunk, one item
        per `elements_per_item` of its host_len elements) as the whole chunk, indexable by
        `slot.range` (by items of it): itself on one rank."""
        return mine

    def grad_ranges(self, chunk: Chunk) -> list[tuple[ParamSlot, slice]]:
        """(slot, range in the gradient source and state buffers) of each slot with a
        gradient (sharded models: the part of it this rank owns)."""
        return [(s, s.range) for s in chunk.slots
                if s.grad_loc in ("host", "acc", "device", "nvme")]

    def sum_over_ranks(self, value: float) -> float:
        """`value` summed over the ranks a model is sharded over (itself on one rank)."""
        return value

    # Gradients are divided by this before the update (the number of ranks summed).
    grad_divisor = 1
    # Sharded: agrees the outcome of an NVMe step over the ranks (see NvmeTier.step).
    agree_nvme = None

    def grads_home(self) -> None:
        """Waits for every gradient copy to the host (before norms and updates)."""
        for chunk in self.chunks:
            self.grads_home_of(chunk)

    def grads_home_of(self, chunk: Chunk) -> None:
        """Waits for the copy of one chunk's gradients to the host."""
        if chunk.d2h_event is not None:
            self.copies.wait_for_host_use(chunk.d2h_event)
            chunk.d2h_event = None

    def grad_source(self, chunk: Chunk) -> torch.Tensor | None:
        """The buffer holding this chunk's gradients for the optimizer, or None."""
        if chunk.acc is not None and any(s.grad_loc == "acc" for s in chunk.slots):
            if chunk.states_on_device and any(s.grad_loc == "device" for s in chunk.slots):
                # Some gradients still sit in their slots: add them in, so one buffer has all.
                view = chunk.device_view()
                for slot in chunk.slots:
                    if slot.grad_loc == "device":
                        chunk.acc[slot.range].add_(view[slot.range])
                        slot.grad_loc = "acc"
            return chunk.acc
        if chunk.states_on_device and any(s.grad_loc == "device" for s in chunk.slots):
            return chunk.device_view()
        if chunk.host_state is HostState.GRADS:
            return chunk.host[: chunk.used]
        return None

    # ------------------------------------------------------------------ optimizer updates

    def _wait_update(self, chunk: Chunk) -> None:
        if chunk.update is None:
            return
        if not chunk.update.done():
            start = time.perf_counter()
            chunk.update.exception()  # waits without raising
            end = time.perf_counter()
            self.update_stall_seconds += end - start
            self.timeline.stall(start, end, "update")
        future, chunk.update = chunk.update, None
        error = future.exception()
        if error is not None:
            # The optimizer puts back what the update did not do, here in the training
            # thread, and raises.
            if self.on_update_failed is None:
                raise error
            self.on_update_failed(chunk, error)

    def restore_device_values(self, chunk: Chunk) -> None:
        """Discarding gradients of a chunk whose state is on the device: slots holding a
        gradient get their parameter value back from the master."""
        view = chunk.device_view()
        for slot in chunk.slots:
            if slot.grad_loc == "device":
                view[slot.range].copy_(chunk.master[slot.range])
        if chunk.device_state is DeviceState.MIXED:
            chunk.move_device(DeviceState.PARAMS)

    def settle_loads(self) -> None:
        """Waits for copies to the device still in flight (prefetches), so host buffers can be
        overwritten (load_state_dict, load_checkpoint) without racing a copy that reads them."""
        for chunk in self.chunks:
            if chunk.device_state is DeviceState.LOADING:
                self._settle(chunk, block=True)

    def wait_updates(self) -> None:
        for chunk in self.chunks:
            self._wait_update(chunk)
