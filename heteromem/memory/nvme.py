"""The NVMe tier: optimizer states (fp32 master, exp_avg, exp_avg_sq) of chunks that do not fit
the host budget, in files under `nvme_dir/heteromem-<pid>-<random>/`.

Layout: one file per chunk holding two copies of its states, each copy three regions
(master | exp_avg | exp_avg_sq) of `region` bytes, 4096-aligned for O_DIRECT. `current` says
which copy is valid. An update reads the current copy into a staging slot, updates it there
and writes it to the *other* copy; only when every chunk of the step has been written are the
copies flipped. So a failed write (ENOSPC, EIO) leaves every chunk's current copy - the state
from before the step - intact, and the step can simply be taken again.

Staging slots come from a bounded pool of aligned (pinned on CUDA) host buffers reserved on the
host tier; the step pipeline reads ahead into free slots while it updates and writes back.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from heteromem.errors import OutOfMemory, format_bytes
from heteromem.io import IoEngine, IoFile, aligned_empty
from heteromem.memory.chunk import Chunk
from heteromem.memory.tiers import Tier

ALIGN = 4096
STATES = 3  # master, exp_avg, exp_avg_sq
DEFAULT_STAGING_SLOTS = 4
MIN_STAGING_SLOTS = 2  # one updating while the next is read


def region_bytes(capacity: int) -> int:
    """Bytes of one fp32 state region of a chunk of `capacity` elements, 4096-aligned."""
    return -(-capacity * 4 // ALIGN) * ALIGN


def file_bytes(capacity: int) -> int:
    return 2 * STATES * region_bytes(capacity)


def staging_bytes(capacity: int, slots: int = DEFAULT_STAGING_SLOTS) -> int:
    """Host bytes of a staging pool of `slots` slots, each one chunk's three states."""
    return slots * STATES * region_bytes(capacity)


@dataclass(eq=False)
class NvmeStates:
    """Where one chunk's optimizer states live on the NVMe tier."""

    file: IoFile
    current: int = 0  # which of the two copies holds the valid state

    def copy_offset(self, copy: int, region: int) -> int:
        return copy * STATES * region


class StagingSlot:
    """One aligned host buffer holding a chunk's three fp32 states."""

    def __init__(self, region: int, pin: bool) -> None:
        self.region = region
        self.buffer = aligned_empty(STATES * region, pin=pin)

    def states(self, used: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        views = [self.buffer[k * self.region:(k + 1) * self.region].view(torch.float32)[:used]
                 for k in range(STATES)]
        return views[0], views[1], views[2]


class NvmeTier:
    def __init__(self, nvme_dir: str, capacity: int, staging_slots: int, host_tier: Tier,
                 pin: bool, owner: object) -> None:
        self.region = region_bytes(capacity)
        self.root = os.path.join(nvme_dir, f"heteromem-{os.getpid()}-{secrets.token_hex(4)}")
        os.makedirs(self.root)
        # Removed with the wrapped model, and at interpreter exit (finalize runs atexit too).
        self._cleanup = weakref.finalize(owner, shutil.rmtree, self.root, ignore_errors=True)
        self.tier = Tier("nvme", shutil.disk_usage(nvme_dir).free)
        self.engine = IoEngine()
        self.host_tier = host_tier
        self.pin = pin
        self.slot_count = staging_slots
        self.slots: list[StagingSlot] = []
        self._files = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.wait_seconds = 0.0
        # Called with (start, end, "nvme") for each wait (the memory timeline).
        self.on_stall: Callable[[float, float, str], None] | None = None

    # ------------------------------------------------------------------ staging pool

    @property
    def staging_bytes(self) -> int:
        return self.slot_count * STATES * self.region

    def reserve_staging(self) -> None:
        """Allocates the staging pool (reserved on the host tier) unless it exists."""
        if self.slots:
            return
        self.host_tier.reserve(self.staging_bytes, "the NVMe staging pool", advice=(
            "raise host_memory or lower nvme_staging"))
        self.slots = [StagingSlot(self.region, self.pin) for _ in range(self.slot_count)]

    # ------------------------------------------------------------------ placing states

    def place(self, chunk: Chunk, master: torch.Tensor, exp_avg: torch.Tensor | None,
              exp_avg_sq: torch.Tensor | None) -> None:
        """Gives `chunk` a file and writes the given states (None: zeros) as its current copy."""
        nbytes = file_bytes(chunk.host_capacity)
        self.tier.reserve(nbytes, f"optimizer state of chunk {chunk.index}", advice=(
            "free space under nvme_dir, or raise host_memory so fewer states go to NVMe"))
        try:
            path = os.path.join(self.root, f"states-{self._files:06d}.bin")
            self._files += 1
            f = self.engine.open(path, create=True)
            self.engine.set_size(f, nbytes)
            chunk.nvme = NvmeStates(f)
            self.reserve_staging()
            slot = self.slots[0]
            for dst, src in zip(slot.states(chunk.host_len), (master, exp_avg, exp_avg_sq)):
                if src is None:
                    dst.zero_()
                else:
                    dst.copy_(src)
            self._write(chunk, slot, copy=0)
        except BaseException:
            if chunk.nvme is not None:
                self.drop(chunk)
            else:
                self.tier.release(nbytes)
            raise

    def drop(self, chunk: Chunk) -> None:
        """Deletes the chunk's file (its states moved elsewhere)."""
        states, chunk.nvme = chunk.nvme, None
        self.engine.close(states.file)
        try:
            os.unlink(states.file.path)
        except FileNotFoundError:
            pass
        self.tier.release(file_bytes(chunk.host_capacity))

    # ------------------------------------------------------------------ reading and writing

    def _wait(self, ticket: int) -> None:
        start = time.perf_counter()
        try:
            self.engine.wait(ticket)
        finally:
            end = time.perf_counter()
            self.wait_seconds += end - start
            if self.on_stall is not None:
                self.on_stall(start, end, "nvme")

    def _submit_read(self, chunk: Chunk, slot: StagingSlot) -> int:
        states = chunk.nvme
        self.bytes_read += slot.buffer.numel()
        return self.engine.submit_read(states.file, states.copy_offset(states.current, self.region),
                                       slot.buffer)

    def _submit_write(self, chunk: Chunk, slot: StagingSlot, copy: int) -> int:
        states = chunk.nvme
        self.bytes_written += slot.buffer.numel()
        return self.engine.submit_write(states.file, states.copy_offset(copy, self.region),
                                        slot.buffer)

    def _write(self, chunk: Chunk, slot: StagingSlot, copy: int) -> None:
        self._wait(self._submit_write(chunk, slot, copy))
        chunk.nvme.current = copy

    def load(self, chunk: Chunk, slot_index: int = 0) -> tuple[torch.Tensor, ...]:
        """Reads the chunk's current states into staging slot `slot_index`; returns views
        (master, exp_avg, exp_avg_sq) valid until that slot is used again."""
        self.reserve_staging()
        slot = self.slots[slot_index]
        self._wait(self._submit_read(chunk, slot))
        return slot.states(chunk.host_len)

    def store(self, chunk: Chunk, slot_index: int = 0) -> None:
        """Writes staging slot `slot_index` (filled by `load` and changed) as the chunk's new
        state: into the other copy, then flipped, so a failure keeps the old state."""
        self._write(chunk, self.slots[slot_index], copy=1 - chunk.nvme.current)

    # ------------------------------------------------------------------ the optimizer step

    def step(self, chunks: list[Chunk],
             update: Callable[[Chunk, torch.Tensor, torch.Tensor, torch.Tensor], None],
             agree: Callable[[BaseException | None], BaseException | None] | None = None) -> None:
        """Updates the states of `chunks`, all or nothing: read ahead into free staging
        slots, `update(chunk, master, exp_avg, exp_avg_sq)` in the slot, write back to the
        other copy; the copies flip only when every write has succeeded. On failure every
        chunk keeps its current copy and the error is raised (after all I/O has stopped).

        `agree` (sharded models) is called with this rank's outcome before the flip and
        returns the error to raise, its own or another rank's: then no rank flips."""
        error = None
        try:
            self._step(chunks, update)
        except BaseException as exc:  # noqa: BLE001  (raised below, after agreeing)
            error = exc
        if agree is not None:
            error = agree(error)
        if error is not None:
            raise error
        for chunk in chunks:
            chunk.nvme.current = 1 - chunk.nvme.current

    def _step(self, chunks: list[Chunk],
              update: Callable[[Chunk, torch.Tensor, torch.Tensor, torch.Tensor], None]) -> None:
        if not chunks:
            return
        self.reserve_staging()
        free = deque(range(len(self.slots)))
        reads: deque[tuple[Chunk, int, int]] = deque()
        writes: deque[tuple[int, int]] = deque()
        next_read = 0
        def read_next() -> None:
            nonlocal next_read
            slot_index = free.popleft()
            target = chunks[next_read]
            reads.append((target, slot_index, self._submit_read(target, self.slots[slot_index])))
            next_read += 1

        try:
            for i, chunk in enumerate(chunks):
                if next_read <= i:  # this chunk's read is not in flight yet: free a slot
                    if not free:
                        slot_index, ticket = writes.popleft()
                        self._wait(ticket)
                        free.append(slot_index)
                    read_next()
                while next_read < len(chunks) and free:  # read ahead into every free slot
                    read_next()
                target, slot_index, ticket = reads.popleft()
                assert target is chunk
                self._wait(ticket)
                update(chunk, *self.slots[slot_index].states(chunk.used))
                writes.append((slot_index, self._submit_write(
                    chunk, self.slots[slot_index], 1 - chunk.nvme.current)))
            while writes:
                slot_index, ticket = writes.popleft()
                self._wait(ticket)
        except BaseException:
            # Let every request in flight finish before the slots (and the caller's state)
            # are touched again; their own errors are secondary to the first one.
            for _, _, ticket in reads:
                self._drain(ticket)
            for _, ticket in writes:
                self._drain(ticket)
            raise

    def _drain(self, ticket: int) -> None:
        try:
            self.engine.wait(ticket)
        except OSError:
            pass

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self.engine.shutdown()
        self._cleanup()


def check_nvme_dir(nvme_dir: object, needed: int) -> str:
    """Validates `nvme_dir` up front: an existing writable directory with room for `needed`
    bytes of optimizer state. Returns it as a string."""
    if not isinstance(nvme_dir, (str, os.PathLike)):
        raise TypeError(f"hm.wrap: nvme_dir must be a path (str or os.PathLike), got "
                        f"{type(nvme_dir).__name__}")
    path = os.fspath(nvme_dir)
    if not path:
        raise ValueError("hm.wrap: nvme_dir is empty; give a directory on an NVMe drive")
    if not os.path.exists(path):
        raise ValueError(f"hm.wrap: nvme_dir={path!r} does not exist; create it first")
    if not os.path.isdir(path):
        raise ValueError(f"hm.wrap: nvme_dir={path!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"hm.wrap: nvme_dir={path!r} is not writable by this process; choose a "
                         "directory you can write to")
    free = shutil.disk_usage(path).free
    if needed > free:
        raise OutOfMemory("nvme", needed, free,
                          f"nvme_dir={path!r} has {format_bytes(free)} free but the optimizer state "
                          f"planned for it needs {format_bytes(needed)}; free space, choose another "
                          "nvme_dir, or raise host_memory", what="optimizer states")
    return path
