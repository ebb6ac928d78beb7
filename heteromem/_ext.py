"""Loading of the compiled extension ``heteromem._C``, and what to do without it.

Importing heteromem imports ``_C`` (which only registers operators: no CUDA initialisation,
no compilation). When it is missing, fails to load (e.g. built against another torch), or
``HETEROMEM_DISABLE_EXT=1`` is set, every op falls back to its pure-PyTorch reference in
``heteromem.ops.reference`` and says so once, with the reason.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field

import torch

from heteromem._version import __version__


class HeteromemWarning(UserWarning):
    """A heteromem notice that changes behaviour or speed, e.g. a reference-op fallback."""


def _load() -> tuple[bool, str]:
    if os.environ.get("HETEROMEM_DISABLE_EXT", "") not in ("", "0"):
        return False, "HETEROMEM_DISABLE_EXT is set"
    try:
        from heteromem import _C  # noqa: F401  (import registers torch.ops.heteromem.*)
    except (ImportError, OSError) as exc:
        return False, (f"heteromem._C could not be loaded ({exc}); build it with "
                       "`pip install --no-build-isolation -e .` against the installed torch")
    return True, ""


LOADED, LOAD_ERROR = _load()
_warned: set[str] = set()


def warn_once(seen: set[str], key: str, message: str, stacklevel: int = 2) -> None:
    """Warns `message` (a HeteromemWarning) unless `key` is already in `seen`, the caller's
    set of what it has said (one per module, so tests can reset it)."""
    if key in seen:
        return
    seen.add(key)
    warnings.warn(message, HeteromemWarning, stacklevel=stacklevel + 1)


def warn_fallback(reason: str, stacklevel: int = 3) -> None:
    """Warns once per distinct reason that ops run their pure-PyTorch reference."""
    warn_once(_warned, reason, "heteromem: using the pure-PyTorch reference ops, which are "
              f"slower: {reason}", stacklevel=stacklevel)


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, device_type: str) -> bool:
    """Whether torch.ops.heteromem.<op> has a compiled kernel for this device type (cached:
    the answer cannot change after import, and ops are called once per chunk)."""
    if not LOADED:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"heteromem::{op}", key)


def use_kernel(op: str, device_type: str) -> bool:
    """Whether to call torch.ops.heteromem.<op>; when not, warns once why its pure-PyTorch
    reference runs instead (no warning for meta tensors, which only trace)."""
    if has_kernel(op, device_type):
        return True
    if device_type != "meta":
        # stacklevel: the warning points at the code that called the typed op.
        warn_fallback(LOAD_ERROR if not LOADED else
                      f"this build has no {device_type} kernel for {op} "
                      "(rebuild with the CUDA toolkit to get one)", stacklevel=4)
    return False


@dataclass(frozen=True)
class BuildInfo:
    """What heteromem was built with and what it uses on this machine."""

    version: str
    torch_version: str
    extension_loaded: bool
    extension_error: str
    cuda_kernels: bool
    cuda_archs: list[str] = field(default_factory=list)
    cpu_simd: str = "none"
    cpu_simd_detected: str = "none"
    num_threads: int = 1

    def __str__(self) -> str:
        rows = [
            ("heteromem", self.version),
            ("torch", self.torch_version),
            ("extension", "loaded" if self.extension_loaded else f"not loaded: {self.extension_error}"),
            ("CUDA kernels", ", ".join(self.cuda_archs) if self.cuda_kernels else "not compiled"),
            ("CPU SIMD path", self.cpu_simd + ("" if self.cpu_simd == self.cpu_simd_detected
                                               else f" (CPU supports {self.cpu_simd_detected})")),
            ("threads", str(self.num_threads)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def build_info() -> BuildInfo:
    """Version, torch version, compiled CUDA archs, the CPU SIMD path in use and thread count."""
    if not LOADED:
        return BuildInfo(__version__, torch.__version__, False, LOAD_ERROR, False,
                         num_threads=torch.get_num_threads())
    fields = dict(line.split("=", 1) for line in torch.ops.heteromem.build_info().splitlines())
    if "cpu_capability_error" in fields:
        raise ValueError(fields["cpu_capability_error"])
    archs = [a for a in fields["cuda_archs"].split(";") if a]
    return BuildInfo(
        version=__version__,
        torch_version=torch.__version__,
        extension_loaded=True,
        extension_error="",
        cuda_kernels=fields["cuda"] == "1",
        cuda_archs=archs,
        cpu_simd=fields["cpu_capability"],
        cpu_simd_detected=fields["cpu_capability_detected"],
        num_threads=int(fields["threads"]),
    )
