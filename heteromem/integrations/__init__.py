"""Integrations with other libraries: `heteromem.integrations.HeteromemTrainer` (transformers'
Trainer, `heteromem.integrations.hf`) and `heteromem.integrations.transformers.register()`
(attn_implementation="heteromem", the fused attention op inside transformers models).

Importing this package imports nothing else; `transformers` is imported when its integration is
first used.
"""

from __future__ import annotations

__all__ = ["CHECKPOINT_DIR", "HeteromemTrainer", "hf"]


def __getattr__(name: str):
    if name in __all__:
        import importlib
        hf = importlib.import_module("heteromem.integrations.hf")
        return hf if name == "hf" else getattr(hf, name)
    raise AttributeError(f"module 'heteromem.integrations' has no attribute {name!r}")
