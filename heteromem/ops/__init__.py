"""Typed Python entry points of heteromem's operators (``torch.ops.heteromem.*``).

Each falls back to its pure-PyTorch reference (``heteromem.ops.reference``) when the compiled
kernel is unavailable, and says so once.
"""

from heteromem.ops.adam import adam_step_
from heteromem.ops.adam8bit import adam8bit_step_
from heteromem.ops.agd import agd_step_
from heteromem.ops.attention import attention

__all__ = ["adam8bit_step_", "adam_step_", "agd_step_", "attention"]
