"""heteromem's exceptions: one family under `HeteromemError`.

Each class also keeps the built-in base a user would catch for that kind of failure
(`MemoryError`/`RuntimeError` for a full tier, `ValueError` for a checkpoint that does not fit,
`OSError` for a failed read or write, ...), so `except OSError:` and `except hm.HeteromemError:`
both work.
"""

from __future__ import annotations


class HeteromemError(Exception):
    """The base of every exception heteromem raises on purpose (bad arguments excepted: those
    are plain `ValueError` / `TypeError` naming the argument)."""


class OutOfMemory(HeteromemError, RuntimeError, MemoryError):
    """A memory tier cannot hold what was asked of it.

    Attributes name the tier ("device", "host" or "nvme"), the bytes asked, the bytes left
    under the tier's budget, and what to change.
    """

    def __init__(self, tier: str, asked: int, left: int, advice: str, what: str = "") -> None:
        self.tier, self.asked, self.left, self.advice = tier, asked, left, advice
        subject = f" for {what}" if what else ""
        super().__init__(
            f"heteromem: the {tier} tier is out of memory{subject}: asked {format_bytes(asked)}, "
            f"{format_bytes(left)} left of its budget. {advice}")


def format_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


class NotWrappedError(HeteromemError, TypeError, ValueError):
    """A function that needs a model returned by `hm.wrap` got another one."""


class CheckpointError(HeteromemError, ValueError):
    """A checkpoint that cannot be loaded into this model (or written to this path)."""


class StorageError(HeteromemError, OSError):
    """A read or write of heteromem's own files (NVMe tier, checkpoints) failed; `errno` and
    `filename` say which and where. Make one with `storage_error`, which also keeps the
    `OSError` subclass the errno has (`FileNotFoundError` for ENOENT, ...)."""


_BY_ERRNO_CLASS: dict[type, type] = {}


def storage_error(code: int | None, message: str, filename: str | None = None) -> StorageError:
    """A StorageError for `code`, also an instance of the built-in `OSError` subclass Python
    gives that errno (so `except FileNotFoundError:` still catches a missing file)."""
    builtin = type(OSError(code, "")) if code is not None else OSError
    cls = StorageError
    if builtin is not OSError:
        cls = _BY_ERRNO_CLASS.get(builtin)
        if cls is None:
            cls = _BY_ERRNO_CLASS[builtin] = type(
                "StorageError", (StorageError, builtin),
                {"__module__": __name__, "__doc__": StorageError.__doc__})
    return cls(code, message) if filename is None else cls(code, message, filename)


class UpdateError(HeteromemError, RuntimeError):
    """An optimizer update failed. The parameters it did not update keep their values and
    their gradients: `opt.step()` finishes the step, `opt.zero_grad()` drops it."""


class DistributedError(HeteromemError, RuntimeError):
    """A collective of a sharded model failed: another rank died, raised, or timed out."""


class StepInBackwardError(HeteromemError, RuntimeError):
    """A training loop broke the contract of `hm.wrap(step_in_backward=True)`: every backward
    pass is followed by `opt.step()`, with the same gradient pattern as the step before."""


class IllegalTransition(HeteromemError, AssertionError):
    """A chunk was asked to move between states that the transition table forbids (a bug in
    heteromem, never the user's input)."""

