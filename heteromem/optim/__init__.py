"""Optimizers beyond fp32 Adam, each a ``torch.optim.Optimizer`` with fused CPU and CUDA
kernels, usable on its own or handed to ``hm.wrap``:

- ``AGD``: the auto-switchable optimizer (Yue et al., NeurIPS 2023), Adam's state size.
- ``AdamW8bit`` / ``Adam8bit``: Adam whose moments are 8-bit codes with block scales.

Each class describes its per-parameter state as data (``layout``: a ``StateLayout`` of
``StateRegion``) and updates a contiguous run of parameters with one call, ``update_``,
which is what hm.wrap needs to keep these states in its chunks. Importable without the
compiled extension (the ops then run their pure-PyTorch references, with one warning).
"""

from heteromem.optim.adam8bit import Adam8bit, AdamW8bit
from heteromem.optim.agd import AGD
from heteromem.optim.fused import FusedOptimizer
from heteromem.optim.layout import (FP32_MOMENTS, INT8_MOMENTS, QUANT_BLOCK, StateLayout,
                                    StateRegion)

__all__ = ["AGD", "Adam8bit", "AdamW8bit", "FP32_MOMENTS", "FusedOptimizer", "INT8_MOMENTS",
           "QUANT_BLOCK", "StateLayout", "StateRegion"]
