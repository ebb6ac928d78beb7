"""Checkpoints of wrapped models: save/load of the whole training state, and export."""

from heteromem.runtime.checkpoint.export import export_safetensors
from heteromem.runtime.checkpoint.layout import CheckpointError
from heteromem.runtime.checkpoint.load import load_checkpoint
from heteromem.runtime.checkpoint.save import save_checkpoint, wait_checkpoint

__all__ = ["CheckpointError", "export_safetensors", "load_checkpoint", "save_checkpoint",
           "wait_checkpoint"]
