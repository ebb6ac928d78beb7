"""heteromem's exceptions."""

from __future__ import annotations


class OutOfMemory(RuntimeError):
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


class DistributedError(RuntimeError):
    """A collective of a sharded model failed: another rank died, raised, or timed out."""


class StepInBackwardError(RuntimeError):
    """A training loop broke the contract of `hm.wrap(step_in_backward=True)`: every backward
    pass is followed by `opt.step()`, with the same gradient pattern as the step before."""
