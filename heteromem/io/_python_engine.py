"""The pure-Python backend of :class:`heteromem.io.IoEngine`, used when ``heteromem._C`` is not
loaded. It mirrors ``csrc/io`` call for call (same method signatures as
``torch.classes.heteromem.IoEngine``, same block splitting, failpoints and messages), so the
wrapper in ``engine.py`` and the tests treat both backends alike.

Workers are a ``ThreadPoolExecutor``; ``os.preadv``/``os.pwritev`` release the GIL, so blocks
overlap as they do natively, at the cost of some Python per block.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno as errno_codes
import os
import threading
from dataclasses import dataclass, field

import torch

DIRECT_ALIGN = 4096
Status = tuple[int, str]
OK: Status = (0, "")
_FAULT_SITES = ("read", "write", "open_direct")


def describe(write: bool, nbytes: int, offset: int, path: str) -> str:
    """'read of 4096 bytes at offset 8192 in /path', as csrc/io/io_file.cpp writes it."""
    return f"{'write' if write else 'read'} of {nbytes} bytes at offset {offset} in {path}"


def failure(code: int, what: str) -> Status:
    return code, f"{what} failed: {os.strerror(code)}"


def byte_view(buf: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes, whatever its dtype (numpy has no
    bfloat16, so the bytes are taken by address)."""
    if buf.nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * buf.nbytes).from_address(buf.data_ptr())).cast("B")


class _File:
    """An open file; its descriptor closes once it is closed and no block is using it."""

    def __init__(self, fd: int, path: str, direct: bool) -> None:
        self.fd, self.path, self.direct = fd, path, direct
        self.users = 0
        self.closed = False


@dataclass
class _Ticket:
    futures: list[concurrent.futures.Future] = field(default_factory=list)
    status: Status = OK
    buf: torch.Tensor | None = None  # kept alive until waited


class PythonEngine:
    """Same interface as torch.classes.heteromem.IoEngine (see csrc/io/io_engine_class.cpp)."""

    def __init__(self, threads: int, block_bytes: int) -> None:
        if not 1 <= threads <= 1024:
            raise ValueError(f"IoEngine: threads must be between 1 and 1024, got {threads}")
        if block_bytes <= 0 or block_bytes % DIRECT_ALIGN:
            raise ValueError(f"IoEngine: block_bytes must be a positive multiple of {DIRECT_ALIGN} "
                             f"(O_DIRECT), got {block_bytes}")
        self._block = block_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="heteromem-io")
        self._lock = threading.Lock()
        self._files: dict[int, _File] = {}
        self._tickets: dict[int, _Ticket] = {}
        self._faults: dict[str, list[int]] = {}  # site -> [errno, requests to let pass]
        self._next_handle = 0
        self._next_ticket = 1
        self._stopped = False

    # ------------------------------------------------------------------ files

    def _file(self, handle: int) -> _File:
        f = self._files.get(handle)
        if f is None:
            raise ValueError(f"IoEngine: unknown file handle {handle} (closed, or from another engine)")
        return f

    def _take_fault(self, site: str) -> int:
        fault = self._faults.get(site)
        if fault is None:
            return 0
        if fault[1] > 0:
            fault[1] -= 1
            return 0
        del self._faults[site]
        return fault[0]

    def open(self, path: str, create: bool, readonly: bool = False) -> tuple[int, int, str]:
        with self._lock:
            # A read-only file is buffered by choice: no O_DIRECT attempt to fail.
            direct_fault = 0 if readonly else self._take_fault("open_direct")
        flags = ((os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
                 | (os.O_CREAT if create else 0))
        what = f"open (create) of {path}" if create else f"open of {path}"
        direct = hasattr(os, "O_DIRECT") and not readonly
        fd = -1
        try:
            if direct:
                if direct_fault:
                    raise OSError(direct_fault, os.strerror(direct_fault))
                fd = os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError as exc:
            # EINVAL: this filesystem has no O_DIRECT; anything else fails buffered too.
            if exc.errno != errno_codes.EINVAL:
                return (-1, *failure(exc.errno, what))
            direct = False
        if fd < 0:
            try:
                fd = os.open(path, flags, 0o644)
            except OSError as exc:
                return (-1, *failure(exc.errno, what))
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
            self._files[handle] = _File(fd, path, direct)
        return handle, 0, ""

    def is_direct(self, handle: int) -> bool:
        with self._lock:
            return self._file(handle).direct

    def _use(self, handle: int) -> _File:
        with self._lock:
            f = self._file(handle)
            f.users += 1
            return f

    def _release(self, f: _File) -> Status:
        with self._lock:
            f.users -= 1
            last = f.closed and f.users == 0
        if last:
            try:
                os.close(f.fd)
            except OSError as exc:
                return failure(exc.errno, f"close of {f.path}")
        return OK

    def fsync(self, handle: int) -> Status:
        f = self._use(handle)
        try:
            os.fsync(f.fd)
            return OK
        except OSError as exc:
            return failure(exc.errno, f"fsync of {f.path}")
        finally:
            self._release(f)

    def set_size(self, handle: int, nbytes: int) -> Status:
        if nbytes < 0:
            raise ValueError(f"IoEngine: set_size needs nbytes >= 0, got {nbytes}")
        f = self._use(handle)
        what = f"set_size to {nbytes} bytes of {f.path}"
        try:
            if nbytes > os.fstat(f.fd).st_size:
                try:
                    os.posix_fallocate(f.fd, 0, nbytes)
                    return OK
                except OSError as exc:
                    # NOTE: EINVAL too: glibc emulates a missing fallocate with 1-byte writes,
                    # which an O_DIRECT descriptor refuses; native code gets EOPNOTSUPP there.
                    if exc.errno not in (errno_codes.EOPNOTSUPP, errno_codes.ENOSYS,
                                         errno_codes.EINVAL):
                        return failure(exc.errno, what)
            os.ftruncate(f.fd, nbytes)
            return OK
        except OSError as exc:
            return failure(exc.errno, what)
        finally:
            self._release(f)

    def close(self, handle: int) -> Status:
        with self._lock:
            f = self._file(handle)
            del self._files[handle]
            f.closed = True
            f.users += 1
        return self._release(f)

    # ------------------------------------------------------------------ requests

    def submit(self, handle: int, offset: int, buf: torch.Tensor, write: bool) -> int:
        if buf.device.type != "cpu":
            raise ValueError(f"IoEngine.submit: buf must be a CPU tensor, got one on {buf.device}")
        if not buf.is_contiguous():
            raise ValueError("IoEngine.submit: buf must be contiguous")
        nbytes = buf.nbytes
        with self._lock:
            if self._stopped:
                raise RuntimeError("IoEngine: submit after shutdown()")
            f = self._file(handle)
            if offset < 0:
                raise ValueError(f"IoEngine: offset and length must be >= 0, got offset {offset} "
                                 f"and length {nbytes}")
            if f.direct:
                for value, what in ((buf.data_ptr(), "buffer address"), (offset, "offset"),
                                    (nbytes, "length")):
                    if value % DIRECT_ALIGN:
                        raise ValueError(
                            f"IoEngine: {what} {value} is not a multiple of {DIRECT_ALIGN}, which "
                            f"O_DIRECT file {f.path} needs; allocate buffers with "
                            "heteromem.io.aligned_empty and keep offsets and lengths multiples "
                            "of IoEngine.ALIGN")
            ticket_id = self._next_ticket
            self._next_ticket += 1
            ticket = self._tickets[ticket_id] = _Ticket(buf=buf)
            fault = self._take_fault("write" if write else "read")
            if fault:
                code, message = failure(fault, describe(write, nbytes, offset, f.path))
                ticket.status = (code, message + " (injected fault)")
                return ticket_id
            view = byte_view(buf)
            for start in range(0, nbytes, self._block):
                f.users += 1
                block = view[start:start + self._block]
                ticket.futures.append(self._pool.submit(self._run_block, f, ticket, write,
                                                        offset + start, block))
        return ticket_id

    def _run_block(self, f: _File, ticket: _Ticket, write: bool, offset: int,
                   view: memoryview) -> None:
        try:
            if ticket.status[0]:  # after a ticket's first error its other blocks are skipped
                return
            status = self._transfer(f, write, offset, view)
            if status[0]:
                with self._lock:
                    if not ticket.status[0]:
                        ticket.status = status
        finally:
            self._release(f)

    @staticmethod
    def _transfer(f: _File, write: bool, offset: int, view: memoryview) -> Status:
        nbytes, done = len(view), 0
        while done < nbytes:
            # os.preadv/os.pwritev retry EINTR themselves (PEP 475).
            try:
                if write:
                    n = os.pwritev(f.fd, [view[done:]], offset + done)
                else:
                    n = os.preadv(f.fd, [view[done:]], offset + done)
            except OSError as exc:
                return failure(exc.errno, describe(write, nbytes, offset, f.path))
            if n == 0:
                kind = "write" if write else "read"
                why = "the device accepts no more" if write else "the file ends there"
                return errno_codes.EIO, (f"{describe(write, nbytes, offset, f.path)} failed: short "
                                         f"{kind}: got {done} of {nbytes} bytes ({why})")
            done += n
        return OK

    def wait(self, ticket_id: int) -> Status:
        with self._lock:
            ticket = self._tickets.get(ticket_id)
        if ticket is None:
            raise ValueError(f"IoEngine: unknown ticket {ticket_id} (already waited, or from "
                             "another engine)")
        concurrent.futures.wait(ticket.futures)
        with self._lock:
            # A second waiter of the same ticket may have taken it meanwhile.
            if self._tickets.pop(ticket_id, None) is None:
                raise ValueError(f"IoEngine: unknown ticket {ticket_id} (already waited, or from "
                                 "another engine)")
        return ticket.status

    # ------------------------------------------------------------------ failpoints, lifetime

    def inject_fault(self, op: str, code: int, after: int) -> None:
        if op not in _FAULT_SITES:
            raise ValueError(f'IoEngine.inject_fault: op must be "read", "write" or "open_direct", '
                             f'got "{op}"')
        if code <= 0:
            raise ValueError(f"IoEngine.inject_fault: errno must be a positive errno value, got {code}")
        if after < 0:
            raise ValueError(f"IoEngine.inject_fault: after must be >= 0, got {after}")
        with self._lock:
            self._faults[op] = [code, after]

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
        self._pool.shutdown(wait=True)
