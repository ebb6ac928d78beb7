"""Integrations with other libraries: `heteromem.integrations.HeteromemTrainer` (transformers).

Importing this package imports nothing else; `transformers` is imported when its integration is
first used (`heteromem.integrations.hf`).
"""

from __future__ import annotations

__all__ = ["CHECKPOINT_DIR", "HeteromemTrainer", "hf"]


def __getattr__(name: str):
    if name in __all__:
        import importlib
        hf = importlib.import_module("heteromem.integrations.hf")
        return hf if name == "hf" else getattr(hf, name)
    raise AttributeError(f"module 'heteromem.integrations' has no attribute {name!r}")
