"""heteromem: train PyTorch models whose training state is far larger than GPU memory.

Importing heteromem never initialises CUDA and never compiles anything; see
``heteromem.build_info()`` for what the installed extension provides.
"""

from heteromem._ext import BuildInfo, HeteromemWarning, build_info
from heteromem._version import __version__
from heteromem import ops

__all__ = ["BuildInfo", "HeteromemWarning", "__version__", "build_info", "ops"]
