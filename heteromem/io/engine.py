"""``IoEngine``: asynchronous reads and writes of CPU tensors' bytes at (file, offset), for the
NVMe tier.

The native backend is ``torch.classes.heteromem.IoEngine`` (csrc/io: a C++ thread pool with
pread/pwrite); without ``heteromem._C`` (not built, or ``HETEROMEM_DISABLE_EXT=1``) a
pure-Python backend with the same behaviour runs instead (``_python_engine.py``). Either way:

- files are opened with ``O_DIRECT`` (no page cache) where the filesystem allows it; one that
  refuses it is opened buffered, with a warning once per folder;
- a request is split into ``block_bytes`` blocks spread over the worker threads, so one large
  request keeps several blocks in flight; its ticket completes when every block has;
- failures raise ``OSError(errno, message)`` whose message names the operation, the path, the
  offset, the length and ``strerror``; a read that hits the end of the file is a short read
  (``EIO``);
- ``wait`` blocks without holding the GIL, so other Python threads keep running.
"""

from __future__ import annotations

import functools
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from heteromem import _ext
from heteromem.errors import storage_error
from heteromem.io._python_engine import DIRECT_ALIGN, PythonEngine

Backend = Literal["native", "python"]


@functools.lru_cache(maxsize=None)
def native_unavailable_reason() -> str:
    """Why the native engine cannot be used here ("" when it can)."""
    if not _ext.LOADED:
        return _ext.LOAD_ERROR
    try:
        torch.classes.heteromem.IoEngine  # noqa: B018  (raises when the class is not registered)
    except RuntimeError:
        return ("heteromem._C was built without csrc/io (torch.classes.heteromem.IoEngine is "
                "missing); rebuild with `pip install --no-build-isolation -e .`")
    return ""


_python_backend_warned = False


def _warn_python_backend(reason: str) -> None:
    global _python_backend_warned
    if _python_backend_warned:
        return
    _python_backend_warned = True
    warnings.warn(f"heteromem: IoEngine uses its pure-Python backend (same behaviour, more CPU "
                  f"per request): {reason}", _ext.HeteromemWarning, stacklevel=3)


@dataclass(eq=False)
class IoFile:
    """A file opened by an :class:`IoEngine`. ``direct``: opened with O_DIRECT, so buffers,
    offsets and lengths must be multiples of ``IoEngine.ALIGN``."""

    path: str
    direct: bool
    handle: int


def _check_int(where: str, name: str, value: object, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{where}: {name} must be >= {low}, got {value}")
    return int(value)


class IoEngine:
    """Thread-pool file I/O of CPU tensors' bytes; see the module docstring.

    ``threads`` workers move ``block_bytes`` blocks (a multiple of ``ALIGN``); ``backend``
    forces "native" or "python" (default: native when the extension is loaded).
    A buffer passed to ``submit_*`` must not be touched until its ticket has been waited.
    """

    ALIGN = DIRECT_ALIGN

    def __init__(self, threads: int = 4, block_bytes: int = 8 << 20, *,
                 backend: Backend | None = None) -> None:
        threads = _check_int("IoEngine", "threads", threads, low=1)
        block_bytes = _check_int("IoEngine", "block_bytes", block_bytes, low=1)
        reason = native_unavailable_reason()
        if backend is None:
            backend = "python" if reason else "native"
            if reason:
                _warn_python_backend(reason)
        elif backend not in ("native", "python"):
            raise ValueError(f'IoEngine: backend must be "native", "python" or None, got {backend!r}')
        elif backend == "native" and reason:
            raise RuntimeError(f"IoEngine: the native backend is unavailable: {reason}")
        self._backend: Backend = backend
        if backend == "native":
            self._impl = torch.classes.heteromem.IoEngine(threads, block_bytes)
        else:
            self._impl = PythonEngine(threads, block_bytes)
        self.threads, self.block_bytes = threads, block_bytes
        self._buffered_dirs: set[str] = set()

    @property
    def backend(self) -> Backend:
        """"native" (csrc/io) or "python"."""
        return self._backend

    # ------------------------------------------------------------------ files

    def open(self, path: str | os.PathLike, *, create: bool, readonly: bool = False) -> IoFile:
        """Opens `path` for reading and writing (created when `create`), with O_DIRECT where
        the filesystem allows it; with `readonly`, for reading only and buffered (a file
        heteromem does not own, at offsets O_DIRECT could not take: a checkpoint). Raises
        OSError naming the path."""
        path = os.fspath(path)
        if not isinstance(path, str):
            raise TypeError("IoEngine.open: path must be a str or os.PathLike, got "
                            f"{type(path).__name__}")
        if readonly and create:
            raise ValueError("IoEngine.open: a read-only file cannot be created; pass "
                             "create=False")
        handle, code, message = self._impl.open(path, bool(create), bool(readonly))
        if code:
            raise storage_error(code, message)
        direct = bool(self._impl.is_direct(handle))
        if not direct and not readonly:
            folder = os.path.dirname(os.path.abspath(path))
            if folder not in self._buffered_dirs:
                self._buffered_dirs.add(folder)
                warnings.warn(f"heteromem: {folder} does not support O_DIRECT (tmpfs?); using "
                              "buffered I/O", _ext.HeteromemWarning, stacklevel=2)
        return IoFile(path, direct, int(handle))

    def set_size(self, f: IoFile, nbytes: int) -> None:
        """Makes the file exactly `nbytes` long, allocating its blocks up front where the
        filesystem can (so a full disk raises OSError(ENOSPC) here, not mid-training)."""
        nbytes = _check_int("IoEngine.set_size", "nbytes", nbytes)
        self._raise(self._impl.set_size(self._handle(f), nbytes))

    def fsync(self, f: IoFile) -> None:
        """Flushes the file's data and metadata to the device."""
        self._raise(self._impl.fsync(self._handle(f)))

    def close(self, f: IoFile) -> None:
        """Forgets the file; requests still in flight on it complete first."""
        self._raise(self._impl.close(self._handle(f)))

    # ------------------------------------------------------------------ requests

    def submit_read(self, f: IoFile, offset: int, buf: torch.Tensor) -> int:
        """Starts reading ``buf.nbytes`` bytes at `offset` into `buf`; returns a ticket."""
        return self._submit(f, offset, buf, write=False)

    def submit_write(self, f: IoFile, offset: int, buf: torch.Tensor) -> int:
        """Starts writing `buf`'s bytes at `offset`; returns a ticket."""
        return self._submit(f, offset, buf, write=True)

    def wait(self, ticket: int) -> None:
        """Blocks (without the GIL) until the request is done; raises OSError if it failed.
        Every ticket must be waited exactly once."""
        ticket = _check_int("IoEngine.wait", "ticket", ticket)
        self._raise(self._impl.wait(ticket))

    def read(self, f: IoFile, offset: int, buf: torch.Tensor) -> None:
        """Reads ``buf.nbytes`` bytes at `offset` into `buf` and waits."""
        self.wait(self.submit_read(f, offset, buf))

    def write(self, f: IoFile, offset: int, buf: torch.Tensor) -> None:
        """Writes `buf`'s bytes at `offset` and waits (not fsynced)."""
        self.wait(self.submit_write(f, offset, buf))

    def _submit(self, f: IoFile, offset: int, buf: torch.Tensor, *, write: bool) -> int:
        where = "IoEngine.submit_write" if write else "IoEngine.submit_read"
        offset = _check_int(where, "offset", offset)
        if not isinstance(buf, torch.Tensor):
            raise ValueError(f"{where}: buf must be a torch.Tensor, got {type(buf).__name__}")
        if buf.device.type != "cpu":
            raise ValueError(f"{where}: buf must be a CPU tensor, got one on {buf.device}; "
                             "stage it through a pinned host buffer")
        if not buf.is_contiguous():
            raise ValueError(f"{where}: buf must be contiguous; call .contiguous() or pass a "
                             "slice of heteromem.io.aligned_empty")
        if f.direct:
            for value, what in ((buf.data_ptr(), "buf's address"), (offset, "offset"),
                                (buf.nbytes, "buf's length in bytes")):
                if value % self.ALIGN:
                    shown = hex(value) if what == "buf's address" else value
                    raise ValueError(
                        f"{where}: {what} ({shown}) is not a multiple of {self.ALIGN}, which "
                        f"O_DIRECT file {f.path} needs; allocate buf with "
                        "heteromem.io.aligned_empty and keep offsets and sizes multiples of "
                        "IoEngine.ALIGN")
        return int(self._impl.submit(self._handle(f), offset, buf, write))

    # ------------------------------------------------------------------ failpoints, lifetime

    def inject_fault(self, op: str, errno: int, after: int = 0) -> None:
        """Test hook: the (after+1)-th *request* (not block) of `op` ("read" or "write")
        submitted from now on fails with `errno` without touching the file; "open_direct"
        makes the O_DIRECT attempt of the (after+1)-th open fail instead (EINVAL exercises the
        buffered fallback). Each fault fires once; ``clear_faults`` disarms them."""
        if op not in ("read", "write", "open_direct"):
            raise ValueError(f'IoEngine.inject_fault: op must be "read", "write" or '
                             f'"open_direct", got {op!r}')
        errno = _check_int("IoEngine.inject_fault", "errno", errno, low=1)
        after = _check_int("IoEngine.inject_fault", "after", after)
        self._impl.inject_fault(op, errno, after)

    def clear_faults(self) -> None:
        """Disarms every injected fault."""
        self._impl.clear_faults()

    def shutdown(self) -> None:
        """Finishes the requests in flight and stops the workers; later submits raise."""
        self._impl.shutdown()

    def __enter__(self) -> IoEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @staticmethod
    def _handle(f: IoFile) -> int:
        if not isinstance(f, IoFile):
            raise TypeError("IoEngine: expected an IoFile from IoEngine.open, got "
                            f"{type(f).__name__}")
        return f.handle

    @staticmethod
    def _raise(status: tuple[int, str]) -> None:
        code, message = status
        if code:
            raise storage_error(code, message)


def aligned_empty(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of `nbytes` whose data_ptr is a multiple of
    ``IoEngine.ALIGN``, as O_DIRECT needs (a slice of a slightly larger allocation). `pin`
    allocates page-locked memory for fast copies to a CUDA device (needs CUDA)."""
    nbytes = _check_int("aligned_empty", "nbytes", nbytes)
    raw = torch.empty(nbytes + DIRECT_ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = -raw.data_ptr() % DIRECT_ALIGN
    return raw[skip:skip + nbytes]
