"""heteromem: train PyTorch models whose training state is far larger than GPU memory.

Importing heteromem never initialises CUDA and never compiles anything; see
``heteromem.build_info()`` for what the installed extension provides.
"""

from heteromem._ext import BuildInfo, HeteromemWarning, build_info
from heteromem._version import __version__
from heteromem import ops, optim
from heteromem.errors import (DistributedError, HeteromemError, IllegalTransition, NotWrappedError,
                              OutOfMemory, StepInBackwardError, StorageError, UpdateError)
from heteromem.runtime.checkpoint import (CheckpointError, export_safetensors, load_checkpoint,
                                          save_checkpoint, wait_checkpoint)
from heteromem.planner import Plan, plan
from heteromem.runtime.report import Report, report
from heteromem.runtime.wrap import wrap
from heteromem.runtime.unwrap import unwrap
from heteromem.runtime.checkpoint.pretrained import export_pretrained
from heteromem.integrations.pretrained import from_pretrained

__all__ = ["BuildInfo", "CheckpointError", "DistributedError", "HeteromemError", "HeteromemWarning",
           "IllegalTransition", "NotWrappedError", "OutOfMemory", "Plan", "Report",
           "StepInBackwardError", "StorageError", "UpdateError", "__version__", "build_info",
           "export_pretrained", "export_safetensors", "from_pretrained", "load_checkpoint", "ops",
           "optim", "plan", "report", "save_checkpoint", "unwrap", "wait_checkpoint", "wrap"]
