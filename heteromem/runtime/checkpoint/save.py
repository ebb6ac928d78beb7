"""`hm.save_checkpoint`: the whole training state as large sequential writes, published
atomically; with `blocking=False` a snapshot taken between steps is persisted on a background
thread while training goes on (a "flash" checkpoint).

Chunk files are written by a few threads at once (file writes and xxh3 release the GIL), each
straight from the chunk's host buffers. Chunks whose state is on NVMe are read through the
staging pool one at a time, so they never pass through RAM all at once; in a flash save they
are written before `save_checkpoint` returns, because the next optimizer steps rewrite their
files.

Sharded over ranks, every rank calls `save_checkpoint` and writes its parts of the chunks at
the same time into one folder that rank 0 created; rank 0 writes the manifest and publishes
once every rank reports its files written (collectives on the checkpoint's own gloo group,
so a flash save's background threads never interleave with training's collectives). If any
rank fails, every rank raises and the previous checkpoint stays the published one.
"""

from __future__ import annotations

import copy
import errno
import io
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from heteromem.errors import storage_error
from heteromem.memory.chunk import Chunk
from heteromem.runtime.checkpoint import layout
from heteromem.runtime.checkpoint.state import (buffers, check_optimizer, check_quiet, describe,
                                                live_tensors, regions, rng_state, wrap_state)

WRITERS = 4


class _Save:
    """A flash save in flight: its thread, and the error it ended with."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            err, self.error = self.error, None
            raise RuntimeError(f"heteromem: a background checkpoint save to {self.root!r} failed: "
                               f"{err}; the checkpoint there is still the previous complete "
                               "one. Fix the cause and save again") from err


# One entry per wrapped model with a flash save in flight (or failed, not yet reported).
_PENDING: dict[int, _Save] = {}
_PENDING_LOCK = threading.Lock()


def wait_checkpoint(model: torch.nn.Module | None = None) -> None:
    """Waits for the background (blocking=False) save of `model`, or of every model; raises
    if it failed."""
    with _PENDING_LOCK:
        keys = ([id(wrap_state(model, "wait_checkpoint"))] if model is not None
                else list(_PENDING))
        saves = [(k, _PENDING.get(k)) for k in keys]
    for key, save in saves:
        if save is None:
            continue
        try:
            save.wait()
        finally:
            with _PENDING_LOCK:
                if _PENDING.get(key) is save:
                    del _PENDING[key]


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())


def _write_file(path: str, parts: list[torch.Tensor]) -> tuple[int, str]:
    """Writes the tensors back to back, fsyncs; returns (bytes, xxh3-64). A failure is a
    `StorageError` naming the file."""
    h, size = layout.hasher(), 0
    with layout.naming(path), open(path, "wb", buffering=0) as f:
        for part in parts:
            view = _as_bytes(part)
            h.update(view)
            while view:
                written = f.write(view)
                view = view[written:]
                size += written
        os.fsync(f.fileno())
    return size, h.hexdigest()


def _failed(root: str, exc: OSError) -> OSError:
    """A write of a save failed: the error names the file and the checkpoint."""
    return storage_error(exc.errno, f"save_checkpoint: saving to {root!r} failed ({exc}); "
                        "nothing was published: the checkpoint there is still the previous "
                        "complete one. Free space (or raise the file size limit) and save again",
                        exc.filename)


def _write_extra(tmp: str, blob: dict, rank: int | None) -> tuple[int, str]:
    data = io.BytesIO()
    torch.save(blob, data)
    return _write_file(os.path.join(tmp, layout.extra_file(rank)),
                       [torch.frombuffer(bytearray(data.getbuffer()), dtype=torch.uint8)])


def _cpu_parts(manager, chunk: Chunk) -> list[torch.Tensor]:
    live = live_tensors(manager, chunk)
    return [live[r.name].to("cpu") for r in regions(chunk)]


def _snapshot(state, chunks: list[Chunk]) -> dict[int, torch.Tensor]:
    """Copies the host chunks' regions into the model's snapshot buffers (allocated once,
    counted on the host tier, reused by every later flash save)."""
    manager = state.manager
    sizes = {c.index: sum(r.nbytes(c.host_len) for r in regions(c)) for c in chunks}
    snap = getattr(state, "checkpoint_snapshot", None)
    if snap is None or {k: v.numel() for k, v in snap.items()} != sizes:
        # First flash save, or chunks moved tiers since the last one (NVMe or device state).
        if snap is not None:
            manager.host_tier.release(sum(v.numel() for v in snap.values()))
            state.checkpoint_snapshot = None
        manager.host_tier.reserve(sum(sizes.values()), "flash checkpoint snapshot", advice=(
            "raise host_memory, or save with blocking=True (no snapshot needed)"))
        snap = {index: torch.empty(n, dtype=torch.uint8) for index, n in sizes.items()}
        state.checkpoint_snapshot = snap
    for chunk in chunks:
        offset, out = 0, snap[chunk.index]
        for name, tensor in live_tensors(manager, chunk).items():
            raw = tensor.contiguous().view(torch.uint8).reshape(-1)
            out[offset:offset + raw.numel()].copy_(raw)
            offset += raw.numel()
    return snap


def _finish(root: str, tmp: str, manifest: dict, files: dict, comm,
            error: str | None = None) -> None:
    """Publishes the checkpoint once every rank's files are written (sharded: rank 0 writes
    the manifest with every rank's checksums; every rank raises if any rank failed)."""
    if comm is None:
        _publish(root, tmp, manifest, files)
        return
    group = comm.checkpoint_group
    everyone = comm.all_gather_object((files, error), "save_checkpoint: collecting the ranks' "
                                      "files", group=group)
    failed = [(r, e) for r, (_, e) in enumerate(everyone) if e is not None]
    publish_error = None
    if not failed and comm.rank == 0:
        try:
            _publish(root, tmp, manifest, {k: v for f, _ in everyone for k, v in f.items()})
        except Exception as exc:  # noqa: BLE001  (every rank raises it below)
            publish_error = f"{type(exc).__name__}: {exc}"
    if failed:
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        rank, why = failed[0]
        raise RuntimeError(f"save_checkpoint: rank {rank} could not write its part ({why}); "
                           f"the checkpoint at {root!r} is still the previous complete one")
    publish_error = comm.agree(publish_error, "save_checkpoint: publishing", group=group)
    if publish_error is not None:
        raise RuntimeError(f"save_checkpoint: publishing at {root!r} failed on {publish_error}; "
                           "the checkpoint there is still the previous complete one")


def _publish(root: str, tmp: str, manifest: dict, files: dict) -> None:
    manifest["files"] = {name: dict(bytes=n, xxh3_64=digest) for name, (n, digest) in files.items()}
    digest = layout.write_manifest(tmp, manifest)
    layout.publish(root, tmp, digest)
    layout.remove_leftovers(root)


def _tmp_dir(root: str, comm) -> str:
    """The folder this save writes into (sharded: rank 0's, shared by every rank)."""
    if comm is None:
        os.makedirs(root, exist_ok=True)
        layout.remove_leftovers(root)
        return layout.new_tmp_dir(root)
    tmp, error = None, None
    if comm.rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            layout.remove_leftovers(root)
            tmp = layout.new_tmp_dir(root)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
    tmp, error = comm.broadcast_object((tmp, error), "save_checkpoint: starting",
                                       group=comm.checkpoint_group)
    if error is not None:
        raise storage_error(errno.EIO, f"save_checkpoint: rank 0 could not create the "
                            f"checkpoint folder under {root!r}: {error}")
    return tmp


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *, blocking: bool = True,
                    extra: object = None) -> None:
    """Saves parameters, fp32 masters, optimizer states (whatever the optimizer keeps: Adam's
    and AGD's fp32 moments, the 8-bit optimizers' codes and block scales), step counts, param
    groups, loss-scaler state, module buffers and RNG states of a wrapped model into the
    directory `path`.

    `extra` (anything `torch.save` takes, e.g. your LR scheduler's and data loader's state)
    is stored too and returned by `load_checkpoint`. With `blocking=False` the state is
    snapshotted now and written in the background; the next save, `load_checkpoint` and
    `hm.wait_checkpoint()` wait for it and raise if it failed.
    """
    what = "save_checkpoint"
    state = wrap_state(model, what)
    check_optimizer(state, optimizer, what)
    root = layout.check_root(path, what)
    wait_checkpoint(model)
    check_quiet(state, what)
    manager = state.manager
    manifest = describe(model, state)
    # A flash save writes later: `extra` is copied now, as the chunks are.
    blob = dict(buffers=buffers(model), rng=rng_state(),
                extra=extra if blocking else copy.deepcopy(extra))
    comm = state.comm
    rank = comm.rank if comm is not None else None
    tmp = _tmp_dir(root, comm)
    files: dict[str, tuple[int, str]] = {}
    try:
        on_nvme = [c for c in manager.chunks if c.nvme is not None]
        # NVMe chunks first and in this thread: one staging slot, one chunk at a time.
        for chunk in on_nvme:
            name = layout.chunk_file(chunk.index, rank)
            files[name] = _write_file(os.path.join(tmp, name), _cpu_parts(manager, chunk))
        rest = [c for c in manager.chunks if c.nvme is None]
        if blocking:
            # Parts are gathered by the writer threads: a chunk whose state is on the device
            # is copied to the host only when its file is written.
            _write_rest(tmp, files, [(c.index, lambda c=c: _cpu_parts(manager, c))
                                     for c in rest], rank)
            files[layout.extra_file(rank)] = _write_extra(tmp, blob, rank)
        else:
            snap = _snapshot(state, rest)
    except Exception as exc:
        if comm is None:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise _failed(root, exc) from exc
            raise
        # The other ranks wait for this one in _finish: tell them (it raises for all).
        _finish(root, tmp, manifest, {}, comm, error=f"{type(exc).__name__}: {exc}")
        raise
    except BaseException:
        if comm is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if blocking:
        try:
            _finish(root, tmp, manifest, files, comm)
        except OSError as exc:
            if comm is not None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise _failed(root, exc) from exc
        return
    save = _Save(root)

    def persist() -> None:
        error = None
        try:
            _write_rest(tmp, files, [(c.index, lambda c=c: [snap[c.index]]) for c in rest], rank)
            files[layout.extra_file(rank)] = _write_extra(tmp, blob, rank)
        except BaseException as exc:  # noqa: BLE001  (reported at the next save / wait)
            error = exc
        try:
            if comm is None and error is not None:
                raise error
            _finish(root, tmp, manifest, files, comm,
                    error=None if error is None else f"{type(error).__name__}: {error}")
        except BaseException as exc:  # noqa: BLE001
            save.error = exc
            if comm is None:
                shutil.rmtree(tmp, ignore_errors=True)

    # NOTE: not a daemon: an interpreter that exits right after a flash save finishes it.
    save.thread = threading.Thread(target=persist, name="heteromem-checkpoint")
    with _PENDING_LOCK:
        _PENDING[id(state)] = save
    save.thread.start()


def _write_rest(tmp: str, files: dict,
                jobs: list[tuple[int, Callable[[], list[torch.Tensor]]]], rank: int | None) -> None:
    def write(index: int, parts: Callable[[], list[torch.Tensor]]) -> tuple[int, str]:
        return _write_file(os.path.join(tmp, layout.chunk_file(index, rank)), parts())

    with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="heteromem-ckpt") as pool:
        futures = {index: pool.submit(write, index, parts) for index, parts in jobs}
        for index, future in futures.items():
            files[layout.chunk_file(index, rank)] = future.result()
