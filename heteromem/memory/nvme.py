"""The NVMe tier: everything a chunk owns, in files under `nvme_dir/heteromem-<pid>-<random>/`.

A chunk on this tier has an *image* on disk: its parameters in the compute dtype and, when
trainable, its fp32 master (unless the parameters are the master, in fp32) and the optimizer's
state regions (its `StateLayout`: Adam's fp32 moments, or 8-bit codes and their block scales),
each region 4096-aligned for O_DIRECT. Images live in fixed-size slots of a pool
file (one pool for trainable chunks, one for frozen ones). The disk holds one image per chunk
plus a few spare slots: an update reads the chunk's states, writes the whole new image into a
spare slot and then *commits* by pointing the chunk at that slot, the old one becoming the
spare. So each chunk's update is atomic (its old image or its new one, never a mix), and a
failed write leaves the old image in place.

A chunk loaded from safetensors files that hold its parameters in the compute dtype
(`hm.from_pretrained`, `hm.wrap(weights=...)`) reads its values from those files
(`file_image.py`, `NvmeImage.values`): a frozen chunk has no slot in the pools at all, a
trainable one reads them from there until its first update writes its whole image. So a load
onto NVMe copies nothing, and a LoRA base is never copied here.

A sharded model commits only once every rank has written all its chunks (`agree`), so that no
rank moves on without the others: its pools then hold a spare slot for every chunk.

Gradients that the host cache cannot keep until `opt.step()` are spilled to a third pool, one
slot per spilled chunk (compute dtype; fp32 while accumulating), read back by the step.

Staging slots come from a bounded pool of aligned (pinned on CUDA) host buffers reserved on the
host tier, each one image plus an fp32 gradient region; the step pipeline reads ahead into free
slots while it updates and writes back.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from heteromem.errors import OutOfMemory, format_bytes, storage_error
from heteromem.io import IoEngine, IoFile, aligned_empty
from heteromem.memory.chunk import Chunk
from heteromem.memory.file_image import FileImage, FileSpan, SourceFiles
from heteromem.memory.tiers import Tier
from heteromem.optim.layout import FP32_MOMENTS, StateLayout

ALIGN = 4096
VALUES = ("params", "master")  # the regions written at wrap; the optimizer's start as zeros
ZERO_BLOCK = 8 << 20  # zeros written from a buffer this large when a chunk is placed
DEFAULT_STAGING_SLOTS = 4
MIN_STAGING_SLOTS = 2  # one updating while the next is read
FP32 = torch.float32


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def region_bytes(capacity: int) -> int:
    """Bytes of one fp32 region of a chunk of `capacity` elements, 4096-aligned."""
    return aligned(capacity * 4)


class ImageRegion(NamedTuple):
    """One region of an image: where it starts, its dtype, and how many elements of the
    chunk one of its items covers (256 for a block scale, else 1)."""

    offset: int
    dtype: torch.dtype
    elements_per_item: int = 1

    def items(self, elements: int) -> int:
        return -(-elements // self.elements_per_item)

    def nbytes(self, elements: int) -> int:
        return self.items(elements) * self.dtype.itemsize


@dataclass(frozen=True)
class ImageLayout:
    """Where each region of a chunk's image is (name -> `ImageRegion`): the parameters, then
    for a trainable chunk the fp32 master (none in fp32: the parameters are the master) and
    the regions of `states`, the optimizer's state layout."""

    capacity: int
    dtype: torch.dtype
    trainable: bool
    states: StateLayout = FP32_MOMENTS

    @property
    def regions(self) -> dict[str, ImageRegion]:
        names = [("params", self.dtype, 1)]
        if self.trainable:
            if self.dtype != FP32:
                names.append(("master", FP32, 1))
            names += [(r.name, r.dtype, r.elements_per_item) for r in self.states.state_regions]
        out, offset = {}, 0
        for name, dtype, per in names:
            out[name] = ImageRegion(offset, dtype, per)
            offset += aligned(out[name].nbytes(self.capacity))
        return out

    @property
    def nbytes(self) -> int:
        return sum(aligned(r.nbytes(self.capacity)) for r in self.regions.values())

    def state_offset(self) -> int:
        """Where the optimizer's regions start (the fp32 parameters are the master)."""
        regions = self.regions
        return regions["master" if "master" in regions else "params"].offset


def image_bytes(capacity: int, dtype: torch.dtype, trainable: bool = True,
                states: StateLayout = FP32_MOMENTS) -> int:
    return ImageLayout(capacity, dtype, trainable, states).nbytes


def staging_bytes(capacity: int, slots: int = DEFAULT_STAGING_SLOTS,
                  dtype: torch.dtype = torch.bfloat16, states: StateLayout = FP32_MOMENTS,
                  trainable: bool = True) -> int:
    """Host bytes of a staging pool of `slots` slots: a trainable image (with the
    optimizer's `states`) plus an fp32 gradient region each; with `trainable=False` (only
    frozen chunks on NVMe) a frozen image each, which is never updated."""
    if not trainable:
        return slots * image_bytes(capacity, dtype, False)
    return slots * (image_bytes(capacity, dtype, True, states) + region_bytes(capacity))


def nvme_disk_bytes(capacity: int, dtype: torch.dtype, trainable: int, frozen: int,
                    spares: int | None, states: StateLayout = FP32_MOMENTS) -> int:
    """Disk bytes of the image pools for `trainable` and `frozen` chunks plus `spares` spare
    slots each (None: a spare per chunk); trainable images hold the optimizer's `states`."""
    total = 0
    for n, t in ((trainable, True), (frozen, False)):
        if n:
            total += (n + (n if spares is None else spares)) * image_bytes(capacity, dtype, t,
                                                                           states)
    return total


class SlotPool:
    """Fixed-size slots in one file; grows by whole slots (reserved on the nvme tier)."""

    def __init__(self, engine: IoEngine, path: str, slot_bytes: int, tier: Tier,
                 what: str) -> None:
        self.engine, self.path, self.slot_bytes, self.tier, self.what = (
            engine, path, slot_bytes, tier, what)
        self.file: IoFile = engine.open(path, create=True)
        self.count = 0
        self.free: deque[int] = deque()
        # Slots never written since the file got their room: they read as zeros (set_size
        # allocates zeroed blocks), so a chunk placed there needs no zeros written.
        self.fresh: set[int] = set()
        self._lock = threading.Lock()

    def grow(self, slots: int) -> None:
        if slots <= 0:
            return
        nbytes = slots * self.slot_bytes
        self.tier.reserve(nbytes, self.what, advice=(
            "free space under nvme_dir, or raise host_memory so fewer chunks go to NVMe"))
        try:
            self.engine.set_size(self.file, (self.count + slots) * self.slot_bytes)
        except BaseException:
            self.tier.release(nbytes)
            raise
        with self._lock:
            self.free.extend(range(self.count, self.count + slots))
            self.fresh.update(range(self.count, self.count + slots))
            self.count += slots

    def take(self) -> int:
        with self._lock:
            if self.free:
                return self.free.popleft()
        self.grow(1)
        with self._lock:
            return self.free.popleft()

    def give(self, slot: int) -> None:
        with self._lock:
            self.free.append(slot)

    def offset(self, slot: int) -> int:
        return slot * self.slot_bytes

    def written(self, slot: int) -> None:
        """A write to `slot` is being submitted: it no longer reads as zeros."""
        with self._lock:
            self.fresh.discard(slot)

    def shrink_if_unused(self) -> None:
        """Gives every slot's disk space back when none is in use (the gradients a step
        spilled are all read: the file need not keep its size until the next spill)."""
        with self._lock:
            if self.count == 0 or len(self.free) != self.count:
                return
            self.engine.set_size(self.file, 0)
            self.tier.release(self.count * self.slot_bytes)
            self.free.clear()
            self.fresh.clear()
            self.count = 0

    def close(self) -> None:
        self.engine.close(self.file)


@dataclass(eq=False)
class NvmeImage:
    """Where a chunk's image is: its pool and slot. `values`: the chunk's parameter values
    (and fp32 master, their upcast) are not in the slot but in checkpoint files, until a
    whole image is committed (a trainable chunk's first update; for a frozen chunk, which
    then has no slot (None) nor pool, a checkpoint loaded into it)."""

    pool: SlotPool | None
    slot: int | None
    layout: ImageLayout
    values: FileImage | None = None


@dataclass(eq=False)
class SpilledGrads:
    """A chunk's gradients written out of the host cache until the step reads them."""

    slot: int
    dtype: torch.dtype  # the compute dtype, or fp32 for an accumulation buffer
    used: int
    # Per-slot squared norms, taken before writing: the global norm needs no read back.
    sq_norms: dict[int, float]


class StagingSlot:
    """One aligned host buffer: a chunk's image (a trainable one's), then an fp32 gradient
    region (none when only frozen chunks are on NVMe: their images are never updated)."""

    def __init__(self, layout: ImageLayout, pin: bool) -> None:
        self.layout = layout
        self.grad_offset = layout.nbytes
        grads = region_bytes(layout.capacity) if layout.trainable else 0
        self.buffer = aligned_empty(layout.nbytes + grads, pin=pin)

    def view(self, name: str, used: int, layout: ImageLayout | None = None) -> torch.Tensor:
        """Region `name` for a chunk of `used` elements (its items: a block-scale region
        holds one per block)."""
        layout = layout or self.layout
        region = layout.regions[name]
        return self.buffer[region.offset:region.offset + region.nbytes(used)].view(region.dtype)

    def image(self, layout: ImageLayout) -> torch.Tensor:
        return self.buffer[:layout.nbytes]

    def grads(self, dtype: torch.dtype, used: int) -> torch.Tensor:
        return self.buffer[self.grad_offset:self.grad_offset + used * dtype.itemsize].view(dtype)


class NvmeTier:
    def __init__(self, nvme_dir: str, capacity: int, dtype: torch.dtype, staging_slots: int,
                 host_tier: Tier, pin: bool, owner: object, spares: int | None,
                 states: StateLayout = FP32_MOMENTS, trainable_staging: bool = True) -> None:
        self.root = os.path.join(nvme_dir, f"heteromem-{os.getpid()}-{secrets.token_hex(4)}")
        os.makedirs(self.root)
        # Removed with the wrapped model, and at interpreter exit (finalize runs atexit too).
        self._cleanup = weakref.finalize(owner, shutil.rmtree, self.root, ignore_errors=True)
        self.tier = Tier("nvme", shutil.disk_usage(nvme_dir).free)
        self.engine = IoEngine()
        self.host_tier = host_tier
        self.pin = pin
        self.capacity, self.dtype = capacity, dtype
        self.states = states  # the optimizer's state layout, in every trainable image
        self.layouts = {t: ImageLayout(capacity, dtype, t, states) for t in (True, False)}
        self.slot_count = staging_slots
        # False when the host plan put only frozen chunks here (LoRA over a large base): the
        # staging slots then hold a frozen image, a ninth of a trainable one in bf16.
        self.trainable_staging = trainable_staging
        # Spare slots per pool: one per write that can be in flight (None: one per chunk,
        # for steps that commit all at once).
        self.spares = spares
        self.slots: list[StagingSlot] = []
        # Held while staging slots are in use (the update worker and the training thread
        # both step chunks; loads and stores hold slot 0 between them only when quiet).
        self.staging_lock = threading.RLock()
        self._pools: dict[str, SlotPool] = {}
        # The checkpoint files chunks loaded from them read their values from.
        self.sources = SourceFiles(self.engine)
        self._zero_block: torch.Tensor | None = None
        self.bytes_read = 0
        self.bytes_written = 0
        self.wait_seconds = 0.0
        # Called with (start, end, "nvme") for each wait (the memory timeline).
        self.on_stall: Callable[[float, float, str], None] | None = None

    # ------------------------------------------------------------------ pools and staging

    def pool(self, kind: str) -> SlotPool:
        """'trainable' / 'frozen' images, or 'grads' (fp32-sized gradient slots)."""
        if kind not in self._pools:
            nbytes = (region_bytes(self.capacity) if kind == "grads"
                      else self.layouts[kind == "trainable"].nbytes)
            self._pools[kind] = SlotPool(self.engine, os.path.join(self.root, f"{kind}.bin"),
                                         nbytes, self.tier, f"NVMe {kind} images")
        return self._pools[kind]

    def plan(self, trainable: int, frozen: int) -> None:
        """Makes the pool files as large as `trainable` and `frozen` chunk images plus the
        spares, up front (a full disk shows at wrap, not in the middle of training)."""
        for kind, n in (("trainable", trainable), ("frozen", frozen)):
            if n:
                spares = n if self.spares is None else self.spares
                self.pool(kind).grow(n + spares)

    @property
    def staging_bytes(self) -> int:
        return staging_bytes(self.capacity, self.slot_count, self.dtype, self.states,
                             self.trainable_staging)

    def reserve_staging(self) -> None:
        """Allocates the staging pool (reserved on the host tier) unless it exists."""
        if self.slots:
            return
        self.host_tier.reserve(self.staging_bytes, "the NVMe staging pool", advice=(
            "raise host_memory or lower nvme_staging"))
        self.slots = [StagingSlot(self.layouts[self.trainable_staging], self.pin)
                      for _ in range(self.slot_count)]

    def _check_staging(self, chunk: Chunk) -> None:
        if chunk.trainable and not self.trainable_staging:
            # NOTE: the host plan keeps every trainable chunk on the host in this case; a
            # trainable image here would overrun the frozen-sized staging slots.
            raise RuntimeError("heteromem internal error: a trainable chunk's image is on NVMe "
                               "but the staging pool was sized for frozen chunks only")

    # ------------------------------------------------------------------ placing images

    def _pool_of(self, chunk: Chunk) -> SlotPool:
        return self.pool("trainable" if chunk.trainable else "frozen")

    def staging_views(self, chunk: Chunk) -> dict[str, torch.Tensor]:
        """Staging slot 0 laid out as the chunk's values (params and, trainable, the master),
        to be filled, gaps included, and then written by `place_staged` (hold `staging_lock`
        across both). The optimizer's regions are not staged: they start as zeros."""
        self.reserve_staging()
        self._check_staging(chunk)
        layout = self.layouts[chunk.trainable]
        staging = self.slots[0]
        return {name: staging.view(name, chunk.host_len, layout) for name in layout.regions
                if name in VALUES}

    def place_staged(self, chunk: Chunk) -> None:
        """Gives `chunk` an image holding what `staging_views` returned, and zero optimizer
        state (written from one small zeroed buffer: a wrap touches only the values' pages)."""
        chunk.nvme = self._place(chunk, self.slots[0])

    def place_from_files(self, chunk: Chunk, spans: list[FileSpan]) -> None:
        """Gives `chunk` an image whose parameter values are in checkpoint files: `spans` say
        where its parameter bytes are (compute dtype). A frozen chunk's image is those files;
        a trainable one gets a slot with zero optimizer state (nothing written in a fresh
        slot), and its values (and fp32 master, their exact upcast) are read from the files
        until its first update commits a whole image. Nothing else is read or written now."""
        self.sources.open({s.path for s in spans})
        values = FileImage.of(spans, chunk.host_len * self.dtype.itemsize)
        chunk.nvme = (self._place(chunk, None, values) if chunk.trainable
                      else NvmeImage(None, None, self.layouts[False], values))

    def _place(self, chunk: Chunk, staging: StagingSlot | None,
               values: FileImage | None = None) -> NvmeImage:
        """A slot for `chunk` holding the values regions of `staging` (none: their values are
        in `values`' files) and zero optimizer regions."""
        layout = self.layouts[chunk.trainable]
        pool = self._pool_of(chunk)
        slot = pool.take()
        base = pool.offset(slot)
        fresh = slot in pool.fresh
        tickets = []
        try:
            for name, region in layout.regions.items():
                offset, nbytes = region.offset, aligned(region.nbytes(self.capacity))
                if name in VALUES:
                    if staging is not None:
                        pool.written(slot)
                        tickets.append(self.engine.submit_write(
                            pool.file, base + offset, staging.buffer[offset:offset + nbytes]))
                        self.bytes_written += nbytes
                    continue
                if fresh:  # already zeros on disk: the optimizer's start costs no writes
                    continue
                pool.written(slot)
                self.bytes_written += nbytes
                zeros = self._zeros()
                for at in range(0, nbytes, zeros.numel()):
                    n = min(zeros.numel(), nbytes - at)
                    tickets.append(self.engine.submit_write(pool.file, base + offset + at,
                                                            zeros[:n]))
            for ticket in tickets:
                self._wait(ticket)
        except BaseException:
            for ticket in tickets:
                self._drain(ticket)
            pool.give(slot)
            raise
        return NvmeImage(pool, slot, layout, values)

    def _zeros(self) -> torch.Tensor:
        if self._zero_block is None:
            self._zero_block = aligned_empty(ZERO_BLOCK).zero_()
        return self._zero_block

    def drop(self, chunk: Chunk) -> None:
        """The chunk's image is no longer needed (its state moved elsewhere)."""
        image, chunk.nvme = chunk.nvme, None
        if image.slot is not None:
            image.pool.give(image.slot)
        self.drop_grads(chunk)

    # ------------------------------------------------------------------ reading and writing

    def _wait(self, ticket: int | list[int]) -> None:
        start = time.perf_counter()
        try:
            if isinstance(ticket, list):  # the spans of a read of checkpoint files
                self._wait_files(ticket)
            else:
                self.engine.wait(ticket)
        finally:
            end = time.perf_counter()
            self.wait_seconds += end - start
            if self.on_stall is not None:
                self.on_stall(start, end, "nvme")

    def _submit(self, pool: SlotPool, slot: int, buf: torch.Tensor, write: bool,
                skip: int = 0) -> int:
        offset = pool.offset(slot) + skip
        if write:
            pool.written(slot)
            self.bytes_written += buf.numel()
            return self.engine.submit_write(pool.file, offset, buf)
        self.bytes_read += buf.numel()
        return self.engine.submit_read(pool.file, offset, buf)

    def _wait_files(self, tickets: list[int]) -> None:
        for i, ticket in enumerate(tickets):
            try:
                self.engine.wait(ticket)
            except OSError as exc:
                for rest in tickets[i + 1:]:
                    self._drain(rest)
                raise storage_error(exc.errno, f"heteromem: checkpoint file read failed "
                                    f"(parameter values are read from it): {exc.strerror}",
                                    exc.filename) from None

    def submit_read_params(self, chunk: Chunk, into: torch.Tensor) -> int | list[int]:
        """Starts reading the chunk's parameters (compute dtype) into the front of `into`, an
        aligned uint8 host buffer of at least the aligned parameter bytes; returns the ticket
        to wait."""
        image = chunk.nvme
        raw = into[: aligned(chunk.host_len * image.layout.dtype.itemsize)]
        if image.values is not None:
            return self._read_files(image.values, raw)
        return self._submit(image.pool, image.slot, raw, write=False)

    def _read_files(self, values: FileImage, into: torch.Tensor) -> list[int]:
        self.bytes_read += sum(s.nbytes for s in values.spans)
        return self.sources.submit_read(values, into)

    def _master_from_values(self, chunk: Chunk, staging: StagingSlot) -> None:
        """After the values of a trainable chunk still in checkpoint files were read into
        `staging`: its fp32 master region becomes their upcast, what the wrap would have
        written there (in fp32 the parameters are the master)."""
        image = chunk.nvme
        if image.values is not None and "master" in image.layout.regions:
            staging.view("master", chunk.host_len, image.layout).copy_(
                staging.view("params", chunk.host_len, image.layout))

    def wait(self, ticket: int | list[int]) -> None:
        self._wait(ticket)

    def submit_read_states(self, chunk: Chunk, staging: StagingSlot
                           ) -> list[int | list[int]]:
        """Starts reading what an update needs of the image (the fp32 master and the
        optimizer's regions; in fp32 the parameters are the master) into `staging`; returns
        the tickets to wait. Values still in checkpoint files are read from there (then
        `_master_from_values`)."""
        self._check_staging(chunk)
        image = chunk.nvme
        if image.values is None:
            start = image.layout.state_offset()
            return [self._submit(image.pool, image.slot, staging.image(image.layout)[start:],
                                 write=False, skip=start)]
        names = [r.name for r in image.layout.states.state_regions]
        tickets: list[int | list[int]] = [
            self._read_files(image.values, staging.image(image.layout))]
        if names:
            start = image.layout.regions[names[0]].offset
            try:
                tickets.append(self._submit(image.pool, image.slot,
                                            staging.image(image.layout)[start:], write=False,
                                            skip=start))
            except BaseException:
                self._drain(tickets[0])
                raise
        return tickets

    def submit_write_image(self, chunk: Chunk, staging: StagingSlot) -> tuple[int, int]:
        """Starts writing `staging` as the chunk's new image into a spare slot; returns
        (ticket, slot). `commit` makes it the chunk's image once the ticket is waited."""
        image = chunk.nvme
        if image.pool is None:  # a frozen chunk read from its files gets an image of its own
            image.pool = self._pool_of(chunk)
        slot = image.pool.take()
        try:
            return self._submit(image.pool, slot, staging.image(image.layout), write=True), slot
        except BaseException:
            image.pool.give(slot)
            raise

    def commit(self, chunk: Chunk, slot: int) -> None:
        image = chunk.nvme
        old, image.slot = image.slot, slot
        image.values = None  # the new image was written whole
        if old is not None:
            image.pool.give(old)

    def abandon(self, chunk: Chunk, slot: int) -> None:
        chunk.nvme.pool.give(slot)

    def load(self, chunk: Chunk, slot_index: int = 0) -> dict[str, torch.Tensor]:
        """Reads the chunk's whole image into staging slot `slot_index`; returns views by
        region name, valid until that slot is used again (`store` writes changes back)."""
        self.reserve_staging()
        self._check_staging(chunk)
        staging = self.slots[slot_index]
        image = chunk.nvme
        with self.staging_lock:
            if image.slot is not None:
                self._wait(self._submit(image.pool, image.slot, staging.image(image.layout),
                                        write=False))
            if image.values is not None:
                self._wait(self._read_files(image.values, staging.image(image.layout)))
                self._master_from_values(chunk, staging)
        return {name: staging.view(name, chunk.host_len, image.layout)
                for name in image.layout.regions}

    def store(self, chunk: Chunk, slot_index: int = 0) -> None:
        """Writes staging slot `slot_index` (filled by `load` and changed) as the chunk's new
        image, atomically: into a spare slot, then committed (a chunk whose values were read
        from checkpoint files has them in its own image from then on: the files are never
        written)."""
        ticket, slot = self.submit_write_image(chunk, self.slots[slot_index])
        try:
            self._wait(ticket)
        except BaseException:
            self.abandon(chunk, slot)
            raise
        self.commit(chunk, slot)

    # ------------------------------------------------------------------ spilled gradients

    def spill_grads(self, chunk: Chunk, grads: torch.Tensor, sq_norms: dict[int, float]) -> None:
        """Writes `grads` (the chunk's gradients, compute dtype or fp32) to a gradient slot."""
        pool = self.pool("grads")
        if chunk.grad_spill is None:
            slot = pool.take()
        else:
            slot = chunk.grad_spill.slot
        raw = grads.view(torch.uint8)
        nbytes = aligned(raw.numel())
        if raw.numel() != nbytes or raw.data_ptr() % ALIGN:
            padded = aligned_empty(nbytes)
            padded[: raw.numel()].copy_(raw)
            raw = padded
        try:
            self._wait(self._submit(pool, slot, raw, write=True))
        except BaseException:
            if chunk.grad_spill is None:
                pool.give(slot)
            raise
        chunk.grad_spill = SpilledGrads(slot, grads.dtype, grads.numel(), sq_norms)

    def submit_read_grads(self, chunk: Chunk, staging: StagingSlot) -> int:
        spill = chunk.grad_spill
        view = staging.grads(spill.dtype, spill.used).view(torch.uint8)
        raw = staging.buffer[staging.grad_offset:staging.grad_offset + aligned(view.numel())]
        return self._submit(self.pool("grads"), spill.slot, raw, write=False)

    def drop_grads(self, chunk: Chunk) -> None:
        if chunk.grad_spill is not None:
            self.pool("grads").give(chunk.grad_spill.slot)
            chunk.grad_spill = None

    def release_spilled_space(self) -> None:
        """After a step: the gradients file goes back to empty if no chunk has any there."""
        if "grads" in self._pools:
            self._pools["grads"].shrink_if_unused()

    # ------------------------------------------------------------------ the optimizer step

    def step(self, chunks: list[Chunk],
             update: Callable[[Chunk, StagingSlot], None],
             committed: Callable[[Chunk, StagingSlot], None],
             agree: Callable[[BaseException | None], BaseException | None] | None = None
             ) -> None:
        """Updates the images of `chunks` in a pipeline: read each chunk's states (and spilled
        gradients) ahead into free staging slots, `update(chunk, staging)` there, write the
        new image into a spare slot, and commit it once written, calling
        `committed(chunk, staging)` (before the staging slot is reused). A failure stops the
        pipeline (after all I/O has stopped) and raises: the chunks committed by then keep
        their new images, every other chunk its old one.

        `agree` (sharded models) is called with this rank's outcome once every write is done,
        and returns the error to raise, its own or another rank's; commits wait for it, so
        either every rank commits every chunk or none commits any. The staging slots are
        reused meanwhile, so `committed` then gets None instead of the slot."""
        error = None
        pending: list[tuple[Chunk, int]] = []  # written, not yet committed (agree)
        try:
            with self.staging_lock:
                self._step(chunks, update, committed, pending if agree is not None else None)
        except BaseException as exc:  # noqa: BLE001  (raised below, after agreeing)
            error = exc
        if agree is not None:
            error = agree(error)
            for chunk, slot in pending:
                if error is None:
                    self.commit(chunk, slot)
                    committed(chunk, None)
                else:
                    self.abandon(chunk, slot)
        if error is not None:
            raise error

    def _step(self, chunks: list[Chunk], update, committed, deferred: list | None) -> None:
        if not chunks:
            return
        self.reserve_staging()
        free = deque(range(len(self.slots)))
        reads: deque[tuple[Chunk, int, list[int]]] = deque()
        writes: deque[tuple[Chunk, int, int, int]] = deque()  # chunk, staging, slot, ticket
        next_read = 0

        def read_next() -> None:
            nonlocal next_read
            staging = free.popleft()
            target = chunks[next_read]
            next_read += 1
            tickets = self.submit_read_states(target, self.slots[staging])
            if target.grad_spill is not None:
                tickets.append(self.submit_read_grads(target, self.slots[staging]))
            reads.append((target, staging, tickets))

        def finish_write() -> None:
            chunk, staging, slot, ticket = writes.popleft()
            try:
                self._wait(ticket)
            except BaseException:
                self.abandon(chunk, slot)
                raise
            if deferred is not None:
                deferred.append((chunk, slot))  # sharded: committed once every rank agrees
            else:
                self.commit(chunk, slot)
                committed(chunk, self.slots[staging])
            free.append(staging)

        try:
            for i, chunk in enumerate(chunks):
                if next_read <= i:  # this chunk's read is not in flight yet: free a slot
                    while not free:
                        finish_write()
                    read_next()
                while next_read < len(chunks) and free:  # read ahead into every free slot
                    read_next()
                target, staging, tickets = reads.popleft()
                assert target is chunk
                for ticket in tickets:
                    self._wait(ticket)
                self._master_from_values(chunk, self.slots[staging])
                update(chunk, self.slots[staging])
                ticket, slot = self.submit_write_image(chunk, self.slots[staging])
                writes.append((chunk, staging, slot, ticket))
            while writes:
                finish_write()
        except BaseException:
            # Let every request in flight finish before the slots (and the caller's state)
            # are touched again; their own errors are secondary to the first one.
            for _, _, tickets in reads:
                for ticket in tickets:
                    self._drain(ticket)
            for chunk, _, slot, ticket in writes:
                self._drain(ticket)
                self.abandon(chunk, slot)
            raise

    def _drain(self, ticket: int | list[int]) -> None:
        for t in ticket if isinstance(ticket, list) else [ticket]:
            try:
                self.engine.wait(t)
            except OSError:
                pass

    # ------------------------------------------------------------------ lifetime

    def remove_pools(self) -> None:
        """Deletes every pool file (no chunk has an image any more) and frees its disk."""
        for pool in self._pools.values():
            pool.close()
            self.tier.release(pool.count * pool.slot_bytes)
            os.unlink(pool.path)
        self._pools.clear()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self.sources.close()
        self.engine.shutdown()
        self._cleanup()


def check_nvme_dir(nvme_dir: object, needed: int) -> str:
    """Validates `nvme_dir` up front: an existing writable directory with room for `needed`
    bytes. Returns it as a string."""
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
                          f"nvme_dir={path!r} has {format_bytes(free)} free but the chunks "
                          f"planned for it need {format_bytes(needed)}; free space, choose "
                          "another nvme_dir, or raise host_memory", what="chunk images")
    return path
