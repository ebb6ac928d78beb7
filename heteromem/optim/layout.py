"""An optimizer's per-parameter state described as data: which flat buffers ("regions") a
parameter of n elements needs, of what dtype and size, so that whoever stores the state (the
standalone optimizer's ``self.state``, hm.wrap's chunks, the NVMe tier's files, checkpoints,
the planner) can allocate, page and save it without knowing the optimizer's maths.

Every region is laid out like the parameter: item ``i // per`` of a region with
``elements_per_item=per`` belongs to parameter elements ``[per*i, per*(i+1))``. So a
contiguous run ``[start, start + length)`` of a chunk is updated by one fused call on the
regions' slices (``StateLayout.views``), provided ``start`` is a multiple of ``align``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class StateRegion:
    """One flat buffer of optimizer state.

    Attributes:
        name: the key in the optimizer's per-parameter state (``"master"`` is the fp32
            parameter itself, held by the caller: the standalone optimizers update the
            parameter in place; hm.wrap keeps a master chunk).
        dtype: element type (``torch.float32`` for fp32 moments and block scales,
            ``torch.uint8`` for 8-bit codes).
        elements_per_item: how many parameter elements one item covers: 1 for a value per
            element, 256 for one scale per block of 256 elements.
    """

    name: str
    dtype: torch.dtype
    elements_per_item: int = 1

    def items(self, numel: int) -> int:
        """Items this region holds for `numel` parameter elements."""
        return _ceil_div(numel, self.elements_per_item)

    def nbytes(self, numel: int) -> int:
        """Bytes this region takes for `numel` parameter elements."""
        return self.items(numel) * torch.empty((), dtype=self.dtype).element_size()

    def item_slice(self, start: int, stop: int) -> slice:
        """The items holding elements ``[start, stop)`` of a buffer laid out like the
        parameters (a chunk's, a checkpoint part's); `start` must begin an item.

        Raises:
            ValueError: `start` is inside an item.
        """
        if start % self.elements_per_item:
            raise ValueError(f"region {self.name!r}: elements from {start} do not begin an item "
                             f"of {self.elements_per_item}; ranges of block-scaled state must "
                             f"start at multiples of {self.elements_per_item}")
        return slice(start // self.elements_per_item, self.items(stop))


@dataclass(frozen=True)
class StateLayout:
    """The regions of one optimizer, in the order its fused op takes them, ``master`` first.

    Attributes:
        regions: the regions.
        align: a run's first element must be at a multiple of this many elements of its
            chunk (and of its parameter) so that block regions line up; a chunk packed for
            this optimizer starts every parameter at such a multiple, which also makes a
            chunk's state equal, parameter by parameter, to the standalone optimizer's.
    """

    regions: tuple[StateRegion, ...]
    align: int = 1

    @property
    def state_regions(self) -> tuple[StateRegion, ...]:
        """The regions other than ``master``: what ``optimizer.state[p]`` holds besides step."""
        return tuple(r for r in self.regions if r.name != "master")

    def region(self, name: str) -> StateRegion:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(f"no state region {name!r}; regions: {[r.name for r in self.regions]}")

    def nbytes(self, numel: int, *, master: bool = True) -> int:
        """Bytes of state for `numel` parameters (with the fp32 master unless master=False)."""
        return sum(r.nbytes(numel) for r in self.regions if master or r.name != "master")

    def bytes_per_param(self, *, master: bool = True) -> float:
        """Average bytes of state per parameter for large parameters."""
        return sum(torch.empty((), dtype=r.dtype).element_size() / r.elements_per_item
                   for r in self.regions if master or r.name != "master")

    def zeros(self, numel: int,
              device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Fresh state (all zero is every optimizer's initial state) for `numel` elements,
        one flat tensor per region other than ``master``."""
        return {r.name: torch.zeros(r.items(numel), dtype=r.dtype, device=device)
                for r in self.state_regions}

    def views(self, buffers: Mapping[str, torch.Tensor], start: int,
              length: int) -> dict[str, torch.Tensor]:
        """The slices of flat, chunk-sized region buffers (``zeros(capacity)``, and a
        ``master`` one when present) that hold elements ``[start, start + length)``: the
        ``state`` to pass to the optimizer's ``update_`` for that run.

        Raises:
            ValueError: `start` is not a multiple of ``align``, or a buffer is too short.
        """
        if start % self.align:
            raise ValueError(f"a run of this optimizer's state must start at a multiple of "
                             f"{self.align} elements, got {start}; pack parameters at offsets "
                             f"aligned to StateLayout.align")
        out: dict[str, torch.Tensor] = {}
        for r in self.regions:
            if r.name not in buffers:
                continue
            first = start // r.elements_per_item
            count = r.items(start + length) - first
            buffer = buffers[r.name]
            if first + count > buffer.numel():
                raise ValueError(f"region {r.name!r} has {buffer.numel()} items but elements "
                                 f"up to {start + length} need {first + count}")
            out[r.name] = buffer.view(-1)[first:first + count]
        return out


QUANT_BLOCK = 256
"""Elements per block scale of the 8-bit moments (as bitsandbytes and torchao)."""

FP32_MOMENTS = StateLayout(regions=(
    StateRegion("master", torch.float32),
    StateRegion("exp_avg", torch.float32),
    StateRegion("exp_avg_sq", torch.float32),
))
"""torch.optim.Adam/AdamW and heteromem.optim.AGD: 12 bytes per parameter."""

INT8_MOMENTS = StateLayout(regions=(
    StateRegion("master", torch.float32),
    StateRegion("exp_avg", torch.uint8),
    StateRegion("exp_avg_scale", torch.float32, QUANT_BLOCK),
    StateRegion("exp_avg_sq", torch.uint8),
    StateRegion("exp_avg_sq_scale", torch.float32, QUANT_BLOCK),
), align=QUANT_BLOCK)
"""AdamW8bit and Adam8bit: 6.03 bytes per parameter."""
