"""The host cache: host buffers for the chunks whose image lives on the NVMe tier.

Such a chunk's parameters (compute dtype) are read from its image into a host buffer before
they are copied to the device, and its gradients come home into that buffer (its values can be
read again from the image). All of it fits a byte budget that `hm.wrap` planned and reserved on the
host tier up front (so nothing else can take that room later): when a buffer is needed and the
budget is full, the cached chunk whose next use is furthest away (the
trace's Belady key, as on the device tier) gives its buffer up. A clean buffer is simply
dropped; one holding gradients writes them to the NVMe tier first (`NvmeTier.spill_grads`),
with each parameter's squared norm taken on the way, so clipping never reads them back.

Reads are prefetched along the traced order (`prefetch`), so the disk works ahead of the
host-to-device copies. Buffers are aligned for O_DIRECT (and pinned on CUDA) and reused.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Callable

import torch

from heteromem.errors import OutOfMemory, format_bytes
from heteromem.io import aligned_empty
from heteromem.memory.chunk import Chunk, HostState
from heteromem.memory.tiers import Tier

if TYPE_CHECKING:
    from heteromem.memory.nvme import NvmeTier
    from heteromem.memory.tracer import Trace


class HostCache:
    def __init__(self, nvme: NvmeTier, tier: Tier, budget: int, capacity: int,
                 dtype: torch.dtype, pin: bool) -> None:
        self.nvme, self.tier, self.budget = nvme, tier, budget
        self.capacity, self.dtype, self.pin = capacity, dtype, pin
        tier.reserve(budget, "the host cache of NVMe chunks", advice="raise host_memory")
        self._lock = threading.RLock()  # the update worker frees buffers too
        self.buffer_bytes = capacity * dtype.itemsize
        self.used = 0                       # bytes of buffers held by chunks
        self.chunks: dict[int, Chunk] = {}  # id(chunk) -> chunk holding a buffer
        self._raw: dict[int, torch.Tensor] = {}  # id(chunk) -> its whole aligned buffer
        self._free: list[torch.Tensor] = []
        self.hits = self.misses = 0
        self.bytes_spilled = 0
        # Set by the manager: the trace (eviction order), and waits for a chunk's copies.
        self.trace: Trace | None = None
        self.before_evict: Callable[[Chunk], None] | None = None
        self.wait_update: Callable[[Chunk], None] | None = None

    # ------------------------------------------------------------------ buffers

    def _room(self, nbytes: int, keep: Chunk | None, what: str) -> None:
        """Evicts until `nbytes` fit. When every cached chunk is being updated (updates during
        backward fall behind), waits for an update to end instead: that frees its buffer."""
        while True:
            with self._lock:
                if self.used + nbytes <= self.budget:
                    return
                victim = self._victim(keep)
                if victim is not None:
                    self.evict(victim)
                    continue
                busy = next((c for c in self.chunks.values() if c is not keep
                             and c.host_state is HostState.UPDATING and c.update is not None),
                            None)
                if busy is None:
                    raise OutOfMemory(
                        "host", nbytes, max(self.budget - self.used, 0),
                        f"the host cache of NVMe chunks ({format_bytes(self.budget)}) holds "
                        f"{len(self.chunks)} chunk(s) that are in use; raise host_memory or "
                        "lower chunk_mb", what=what)
            # Outside the lock (the worker needs it to finish); a failed update raises here.
            self.wait_update(busy)

    def _victim(self, keep: Chunk | None) -> Chunk | None:
        best, best_key = None, -math.inf
        for chunk in self.chunks.values():
            if chunk is keep or chunk.host_state is HostState.UPDATING:
                continue
            key = self.trace.eviction_key(chunk.index) if self.trace is not None else 0.0
            if best is None or key > best_key:
                best, best_key = chunk, key
        return best

    def _take(self, chunk: Chunk) -> torch.Tensor:
        # NOTE: _room may wait for the update worker, which takes the lock to free buffers:
        # not under the lock. (Only this thread takes room; the worker only gives it back.)
        self._room(self.buffer_bytes, chunk, f"the host buffer of chunk {chunk.index}")
        with self._lock:
            self.used += self.buffer_bytes
            raw = self._free.pop() if self._free else aligned_empty(
                -(-self.buffer_bytes // 4096) * 4096, pin=self.pin)
            self.chunks[id(chunk)] = chunk
            self._raw[id(chunk)] = raw
            return raw[: self.buffer_bytes].view(self.dtype)

    def _give(self, chunk: Chunk) -> None:
        """Frees the chunk's buffer (and its accumulation buffer)."""
        with self._lock:
            host, chunk.host = chunk.host, None
            if host is not None:
                self._free.append(self._raw.pop(id(chunk)))
                self.used -= self.buffer_bytes
            if chunk.acc is not None:
                self.used -= chunk.acc.numel() * 4
                chunk.acc = None
            self.chunks.pop(id(chunk), None)

    # ------------------------------------------------------------------ values in, out

    def ensure(self, chunk: Chunk) -> None:
        """The chunk's host buffer holds its current values (read from its image if absent;
        waits for a prefetch in flight)."""
        if chunk.host is not None and chunk.host_read is None:
            self.hits += 1
            return
        if chunk.host is None:
            self.misses += 1
            self._start_read(chunk)
        ticket, chunk.host_read = chunk.host_read, None
        try:
            self.nvme.wait(ticket)
        except BaseException:
            self._give(chunk)
            raise

    def _start_read(self, chunk: Chunk) -> None:
        chunk.host = self._take(chunk)
        try:
            chunk.host_read = self.nvme.submit_read_params(chunk, self._raw[id(chunk)])
        except BaseException:
            self._give(chunk)
            raise

    def prefetch(self, chunk: Chunk) -> bool:
        """Starts reading the chunk's values unless it is cached, if that needs no eviction of
        a chunk used sooner; returns whether a read is in flight or done."""
        if chunk.host is not None:
            return True
        if self.used + self.buffer_bytes > self.budget:
            victim = self._victim(chunk)
            if victim is None or self.trace is None or (
                    self.trace.eviction_key(victim.index) <= self.trace.eviction_key(chunk.index)):
                return False
            self.evict(victim)
        self.misses += 1
        self._start_read(chunk)
        return True

    def buffer_for_grads(self, chunk: Chunk) -> None:
        """A buffer for the chunk's gradients from the device (the whole device copy lands
        there, values and gradients, so nothing is read from the image first)."""
        if chunk.host is None:
            chunk.host = self._take(chunk)
        elif chunk.host_read is not None:
            self.nvme.wait(chunk.host_read)
            chunk.host_read = None

    def reload(self, chunk: Chunk) -> None:
        """The host buffer gets its values back from the image (after it held gradients)."""
        self.nvme.wait(self.nvme.submit_read_params(chunk, self._raw[id(chunk)]))

    def forget(self, chunk: Chunk) -> None:
        """Drops the chunk's buffers without writing anything (their content is not needed:
        the image holds the values, the gradients were used or dropped)."""
        if id(chunk) not in self.chunks:
            return
        if chunk.host_read is not None:
            self.nvme._drain(chunk.host_read)
            chunk.host_read = None
        if self.before_evict is not None:
            self.before_evict(chunk)
        self._give(chunk)
        if chunk.host_state is HostState.GRADS:
            chunk.move_host(HostState.PARAMS)

    def evict(self, chunk: Chunk) -> None:
        """Gives the chunk's buffer up; gradients in it are spilled to NVMe first."""
        if self.before_evict is not None:
            self.before_evict(chunk)  # copies reading or filling the buffer are done
        if chunk.host_read is not None:
            self.nvme.wait(chunk.host_read)
            chunk.host_read = None
        if chunk.host_state is HostState.GRADS:
            self.spill(chunk, chunk.host[: chunk.used], "host")
            chunk.move_host(HostState.PARAMS)
        if chunk.acc is not None and any(s.grad_loc == "acc" for s in chunk.slots):
            self.spill(chunk, chunk.acc, "acc")
        self._give(chunk)

    def spill(self, chunk: Chunk, grads: torch.Tensor, loc: str) -> None:
        """Writes the gradients of the slots whose gradient is at `loc` to NVMe."""
        slots = [s for s in chunk.slots if s.grad_loc == loc]
        sq = {id(s): float(torch.linalg.vector_norm(grads[s.range], dtype=torch.float32) ** 2)
              for s in slots}
        if chunk.grad_spill is not None:
            sq = {**chunk.grad_spill.sq_norms, **sq}
        self.nvme.spill_grads(chunk, grads, sq)
        self.bytes_spilled += grads.numel() * grads.element_size()
        for slot in slots:
            slot.grad_loc = "nvme"

    # ------------------------------------------------------------------ accumulation

    def reserve_acc(self, chunk: Chunk, nbytes: int) -> None:
        """Room in the cache for an NVMe chunk's fp32 accumulation buffer (the caller then
        sets `chunk.acc`; evicting the chunk spills and frees it)."""
        self._room(nbytes, chunk, f"gradient accumulation of chunk {chunk.index}")
        with self._lock:
            self.used += nbytes
            self.chunks[id(chunk)] = chunk

    def drop_acc(self, chunk: Chunk) -> None:
        """Frees the chunk's accumulation buffer (its gradients were used or dropped)."""
        with self._lock:
            if chunk.acc is not None:
                self.used -= chunk.acc.numel() * 4
                chunk.acc = None
                if chunk.host is None:
                    self.chunks.pop(id(chunk), None)

    def drop_all(self) -> None:
        """Lets every buffer go (the model is being unwrapped: values were read out)."""
        with self._lock:
            for chunk in list(self.chunks.values()):
                chunk.host, chunk.acc, chunk.host_read = None, None, None
            self.chunks.clear()
            self._raw.clear()
            self._free.clear()
            self.used = 0

    def close(self) -> None:
        """Gives the cache's room back to the host tier (it holds no chunk any more)."""
        assert not self.chunks, "the host cache still holds chunks"
        self.tier.release(self.budget)
        self._free.clear()

    @property
    def hit_rate(self) -> float | None:
        total = self.hits + self.misses
        return None if total == 0 else self.hits / total

