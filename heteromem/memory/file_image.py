"""Chunks read straight from the checkpoint files they were loaded from.

A chunk that `hm.wrap(..., weights=...)` / `hm.from_pretrained` puts on the NVMe tier needs
no copy of its values when the files hold its parameters in the compute dtype: the tier reads
them from the safetensors files at the tensors' offsets (one read per tensor; the alignment
gaps between them are zeros): its `NvmeImage.values`. A frozen chunk has no slot in the
pools (its image is those files); a trainable chunk reads them from there until its first
update writes a whole image, its fp32 master being their exact upcast, as the wrap would
have written it.
So a load onto NVMe reads only the headers and writes nothing (the optimizer's regions start
as the zeros of fresh pool slots), and the disk holds no second copy of a frozen base.

The files are opened read-only and stay open while the model lives (a file replaced by a new
one, as a download or an export does, keeps the old one readable); a file changed in place
since the wrap is refused at the next read (`hm.StorageError`, ESTALE), naming it. The reads
go through the tier's `IoEngine` like its other reads, buffered (safetensors offsets are not
4096-aligned, and the page cache serves a base read every step).

A frozen chunk that must be written (a checkpoint loaded into it) gets a slot in the frozen
pool then, like any image written anew (`NvmeTier.submit_write_image`).
"""

from __future__ import annotations

import errno
import io
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from heteromem.errors import storage_error
from heteromem.io import IoEngine, IoFile


class FileSpan(NamedTuple):
    """`nbytes` of `path` from byte `offset` hold the chunk's parameter bytes from byte `at`."""

    path: str
    offset: int
    at: int
    nbytes: int


@dataclass(eq=False)
class FileImage:
    """Where a chunk's parameter values are in the checkpoint files; `gaps` are the byte
    ranges of its parameter region no span covers (zeros)."""

    spans: list[FileSpan]
    gaps: list[tuple[int, int]]

    @staticmethod
    def of(spans: list[FileSpan], nbytes: int) -> FileImage:
        """The image of a chunk whose parameter region is `nbytes` long."""
        spans = sorted(spans, key=lambda s: s.at)
        gaps, done = [], 0
        for s in spans:
            if s.at > done:
                gaps.append((done, s.at))
            done = max(done, s.at + s.nbytes)
        if done < nbytes:
            gaps.append((done, nbytes))
        return FileImage(spans, gaps)


class SourceFiles:
    """The checkpoint files chunks read their values from, opened read-only (buffered) on the
    NVMe tier's `IoEngine`, so those reads share its threads, its errors and its test faults.

    NOTE: each file is also open as a Python file object, for `fstat`: a path can name another
    file by now (a download renamed over it), so the check looks at the file that was opened;
    and a file object closes itself when the model is collected without `close()`."""

    def __init__(self, engine: IoEngine) -> None:
        self.engine = engine
        self._files: dict[str, tuple[IoFile, io.FileIO, tuple[int, int]]] = {}

    def open(self, paths: set[str]) -> None:
        """Opens every file not open yet (raises OSError naming one that cannot be)."""
        for path in sorted(paths):
            if path in self._files:
                continue
            f = self.engine.open(path, create=False, readonly=True)
            try:
                handle = io.FileIO(path, "r")
            except BaseException:
                self.engine.close(f)
                raise
            st = os.fstat(handle.fileno())
            self._files[path] = (f, handle, (st.st_size, st.st_mtime_ns))

    def _check(self, path: str) -> IoFile:
        f, handle, seen = self._files[path]
        st = os.fstat(handle.fileno())
        if (st.st_size, st.st_mtime_ns) != seen:
            raise storage_error(
                errno.ESTALE, f"heteromem: checkpoint file {path} changed since the model "
                "was loaded from it (parameter values are read from it); keep the files of a "
                "loaded model unchanged (write new ones elsewhere), or load the model again",
                path)
        return f

    def submit_read(self, image: FileImage, into: torch.Tensor) -> list[int]:
        """Zeroes the image's gaps in `into` (a uint8 host buffer at least as long as its
        parameter bytes) and starts reading each span into its place; returns the engine's
        tickets, to wait in order (`NvmeTier.wait`)."""
        for lo, hi in image.gaps:
            into[lo:hi].zero_()
        tickets: list[int] = []
        try:
            for span in image.spans:
                f = self._check(span.path)
                tickets.append(self.engine.submit_read(f, span.offset,
                                                       into[span.at:span.at + span.nbytes]))
        except BaseException:
            for ticket in tickets:
                try:
                    self.engine.wait(ticket)
                except OSError:
                    pass
            raise
        return tickets

    def close(self) -> None:
        for f, handle, _ in self._files.values():
            self.engine.close(f)
            handle.close()
        self._files.clear()
