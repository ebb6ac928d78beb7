"""Chunks read straight from the checkpoint files they were loaded from.

A chunk that `hm.wrap(..., weights=...)` / `hm.from_pretrained` puts on the NVMe tier needs
no copy of its values when the files hold its parameters in the compute dtype: the tier reads
them from the safetensors files at the tensors' offsets (one read per tensor; the alignment
gaps between them are zeros). A frozen chunk's image is those files for good (`FileImage`);
a trainable chunk's image (`NvmeImage.values`) has them there until its first update writes
a whole image, its fp32 master being their exact upcast, as the wrap would have written it.
So a load onto NVMe reads only the headers and writes nothing (the optimizer's regions start
as the zeros of fresh pool slots), and the disk holds no second copy of a frozen base.

The files are opened read-only and stay open while the model lives (a file replaced by a new
one, as a download or an export does, keeps the old one readable); a file changed in place
since the wrap is refused at the next read (`hm.StorageError`, ESTALE), naming it. The reads are buffered (safetensors
offsets are not 4096-aligned, and the page cache serves a base read every step), on two
threads of their own, so they overlap the host -> device copies like the tier's other reads.

A frozen chunk that must be written (a checkpoint loaded into it) gets an ordinary image in
the frozen pool first (`NvmeTier.store`).
"""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from heteromem.errors import storage_error


class FileSpan(NamedTuple):
    """`nbytes` of `path` from byte `offset` hold the chunk's parameter bytes from byte `at`."""

    path: str
    offset: int
    at: int
    nbytes: int


@dataclass(eq=False)
class FileImage:
    """Where a chunk's parameter values are in the checkpoint files; `gaps` are the byte
    ranges of its parameter region no span covers (zeros). A frozen chunk's whole image."""

    spans: list[FileSpan]
    gaps: list[tuple[int, int]]
    layout: object  # the chunk's ImageLayout

    @staticmethod
    def of(spans: list[FileSpan], nbytes: int, layout: object) -> FileImage:
        """The image of a chunk whose parameter region is `nbytes` long."""
        spans = sorted(spans, key=lambda s: s.at)
        gaps, done = [], 0
        for s in spans:
            if s.at > done:
                gaps.append((done, s.at))
            done = max(done, s.at + s.nbytes)
        if done < nbytes:
            gaps.append((done, nbytes))
        return FileImage(spans, gaps, layout)


class _Source:
    """One checkpoint file, open read-only, and what it was when the model was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115  (closed with the tier)
        st = os.fstat(self.file.fileno())
        self.seen = (st.st_size, st.st_mtime_ns)

    def check(self) -> None:
        st = os.fstat(self.file.fileno())
        if (st.st_size, st.st_mtime_ns) != self.seen:
            raise storage_error(
                errno.ESTALE, f"heteromem: checkpoint file {self.path} changed since the model "
                "was loaded from it (parameter values are read from it); keep the files of a "
                "loaded model unchanged (write new ones elsewhere), or load the model again",
                self.path)


class SourceFiles:
    """The checkpoint files frozen chunks are read from, and the threads that read them."""

    THREADS = 2

    def __init__(self) -> None:
        self._files: dict[str, _Source] = {}
        self._pool: ThreadPoolExecutor | None = None
        # The training thread (host cache) and the update worker (steps) both submit.
        self._lock = threading.Lock()
        self.bytes_read = 0

    def open(self, paths: set[str]) -> None:
        """Opens every file not open yet (raises OSError naming one that cannot be)."""
        for path in sorted(paths):
            if path not in self._files:
                self._files[path] = _Source(path)

    def submit_read(self, image: FileImage, into: torch.Tensor,
                    then: Callable[[], None] | None = None) -> Future:
        """Starts reading the image's parameter bytes into the front of `into` (a uint8 host
        buffer at least as long), gaps zeroed, then calls `then()` on the reader thread;
        `result()` raises OSError naming the file."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.THREADS,
                                                thread_name_prefix="heteromem-ckpt")
            self.bytes_read += sum(s.nbytes for s in image.spans)
            return self._pool.submit(self._read, image, into, then)

    def _read(self, image: FileImage, into: torch.Tensor, then: Callable[[], None] | None) -> None:
        view = memoryview(into.numpy()).cast("B")
        for lo, hi in image.gaps:
            into[lo:hi].zero_()
        for span in image.spans:
            source = self._files[span.path]
            source.check()
            done = 0
            while done < span.nbytes:
                try:
                    n = os.preadv(source.file.fileno(),
                                  [view[span.at + done:span.at + span.nbytes]],
                                  span.offset + done)
                except OSError as exc:
                    raise storage_error(exc.errno, f"heteromem: reading {span.nbytes} bytes at "
                                        f"offset {span.offset} of checkpoint file {span.path} "
                                        f"failed: {os.strerror(exc.errno)}", span.path) from None
                if n == 0:
                    raise storage_error(errno.EIO, f"heteromem: checkpoint file {span.path} "
                                        f"ends before offset {span.offset + span.nbytes}: it "
                                        "was truncated since the model was loaded from it; "
                                        "load the model again", span.path)
                done += n
        if then is not None:
            then()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for source in self._files.values():
            source.file.close()
        self._files.clear()
