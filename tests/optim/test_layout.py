"""The state layouts of heteromem.optim as hm.wrap will use them: sizes, run views, and the
chunk contract: parameters packed into chunk-sized buffers at `layout.align`-aligned offsets
and updated by one `update_` call over the whole run give, parameter by parameter, the bits
of the standalone optimizer (with a loss scale and a bf16 copy passed through)."""

from __future__ import annotations

import pytest
import torch

from heteromem.optim import (AGD, FP32_MOMENTS, INT8_MOMENTS, QUANT_BLOCK, Adam8bit, AdamW8bit,
                             StateLayout, StateRegion)


def test_sizes():
    assert FP32_MOMENTS.bytes_per_param() == 12 and FP32_MOMENTS.bytes_per_param(master=False) == 8
    assert INT8_MOMENTS.bytes_per_param() == 6 + 8 / QUANT_BLOCK
    assert INT8_MOMENTS.nbytes(1000) == 4000 + 2 * 1000 + 2 * 4 * 4
    zeros = INT8_MOMENTS.zeros(1000)
    assert {k: (v.dtype, v.numel()) for k, v in zeros.items()} == {
        "exp_avg": (torch.uint8, 1000), "exp_avg_scale": (torch.float32, 4),
        "exp_avg_sq": (torch.uint8, 1000), "exp_avg_sq_scale": (torch.float32, 4)}
    assert [r.name for r in INT8_MOMENTS.state_regions] == list(zeros)
    with pytest.raises(KeyError, match="no state region 'exp_avg_max'"):
        INT8_MOMENTS.region("exp_avg_max")


def test_views_cover_a_run_and_check_alignment():
    buffers = INT8_MOMENTS.zeros(4096)
    views = INT8_MOMENTS.views(buffers, 512, 700)
    assert {k: v.numel() for k, v in views.items()} == {
        "exp_avg": 700, "exp_avg_scale": 3, "exp_avg_sq": 700, "exp_avg_sq_scale": 3}
    assert views["exp_avg_scale"].data_ptr() == buffers["exp_avg_scale"][2:].data_ptr()
    with pytest.raises(ValueError, match="must start at a multiple of 256 elements, got 300"):
        INT8_MOMENTS.views(buffers, 300, 10)
    with pytest.raises(ValueError, match="region 'exp_avg' has 4096 items but elements up to "
                                         "5000 need 5000"):
        INT8_MOMENTS.views(buffers, 4096 - 256, 1160)
    custom = StateLayout((StateRegion("master", torch.float32), StateRegion("m", torch.float16)))
    assert custom.views({"m": torch.zeros(10)}, 3, 4)["m"].numel() == 4


def aligned_offsets(sizes: list[int], align: int) -> list[int]:
    offsets, used = [], 0
    for n in sizes:
        used = -(-used // align) * align
        offsets.append(used)
        used += n
    return offsets + [used]


@pytest.mark.parametrize("cls", [AGD, AdamW8bit, Adam8bit])
def test_one_call_per_chunk_run_equals_the_standalone_optimizer(cls):
    """What hm.wrap does with these optimizers: the fp32 masters and every state region of
    several parameters in chunk-sized buffers, one update_ per step over the run holding them,
    a gradient scaled by 1024 with grad_scale=1024, and the bf16 copy written in the same pass."""
    sizes = [300, 17, 1000, 256]
    layout = cls.layout
    offsets = aligned_offsets(sizes, layout.align)
    capacity = offsets[-1] + 40
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes]
    standalone = cls(params, lr=1e-2, weight_decay=0.1)
    master = torch.zeros(capacity)
    for p, offset in zip(params, offsets):
        master[offset:offset + p.numel()] = p.detach()
    chunk_state = layout.zeros(capacity)
    group = dict(standalone.param_groups[0])
    lowp = torch.empty(capacity, dtype=torch.bfloat16)
    start, length = 0, offsets[-1]
    for step in range(1, 6):
        grad = torch.zeros(capacity)
        for p, offset in zip(params, offsets):
            p.grad = torch.randn(p.numel(), generator=gen)
            grad[offset:offset + p.numel()] = p.grad * 1024
        standalone.step()
        cls.update_(group, step, master[start:start + length], grad[start:start + length],
                    layout.views(chunk_state, start, length), grad_scale=1024.0,
                    param_lowp=lowp[start:start + length])
    for i, (p, offset) in enumerate(zip(params, offsets)):
        n = p.numel()
        assert torch.equal(master[offset:offset + n], p.detach()), f"parameter {i}"
        assert torch.equal(lowp[offset:offset + n], p.detach().to(torch.bfloat16))
        own = standalone.state[p]
        for region in layout.state_regions:
            per = region.elements_per_item
            mine = chunk_state[region.name][offset // per:offset // per + region.items(n)]
            assert torch.equal(mine, own[region.name]), f"parameter {i} {region.name}"
