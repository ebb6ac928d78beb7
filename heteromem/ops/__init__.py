"""Typed Python entry points of heteromem's operators (``torch.ops.heteromem.*``).

Each falls back to its pure-PyTorch reference (``heteromem.ops.reference``) when the compiled
kernel is unavailable, and says so once.
"""

from heteromem.ops.adam import adam_step_
from heteromem.ops.attention import attention

__all__ = ["adam_step_", "attention"]
