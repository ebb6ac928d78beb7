"""Asynchronous file I/O for the NVMe tier: :class:`IoEngine` (native C++ thread pool, or a
pure-Python fallback with the same behaviour), :class:`IoFile` and :func:`aligned_empty`."""

from heteromem.io.engine import IoEngine, IoFile, aligned_empty

__all__ = ["IoEngine", "IoFile", "aligned_empty"]
