"""A frozen base larger than the host budget (LoRA-style fine-tuning) on the NVMe tier: when
every trainable chunk fits on the host, only frozen chunks go to NVMe, and the host holds a
staging pool and cache sized for their images (parameters only) rather than for trainable
images (parameters, master, moments, gradients: nine times as large in bf16). Also: a wrap
writes only the values of each image; the optimizer's regions of fresh slots are left to read
as zeros, which the parity tests (test_wrap_nvme.py) rely on bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

import heteromem as hm
from heteromem.memory.host_plan import cache_floor
from heteromem.memory.nvme import VALUES, aligned, staging_bytes
from wrap_helpers import gpt_batches, gpt_pair, paging_kwargs, train_steps


def _freeze_the_base(model: torch.nn.Module) -> None:
    """Trains what LoRA-style fine-tuning would: a small part (each block's output
    projection and the final norm), the rest frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("proj.weight") or name.startswith("ln_f"))


def _lora_like(dtype: torch.dtype):
    cfg, ref, model = gpt_pair()
    for m in (ref, model):
        _freeze_the_base(m)
    kwargs = paging_kwargs(ref, torch.empty((), dtype=dtype).element_size())
    capacity = int(kwargs["chunk_mb"] * 2**20) // torch.empty((), dtype=dtype).element_size()
    return cfg, ref, model, kwargs, capacity


def _trainable_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Host bytes for the trainable chunks (parameters, master, moments, gradient room), with
    a slot's alignment padding for each parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    return (sum(p.numel() for p in params) + 256 * len(params)) * (dtype.itemsize + 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_frozen_base_goes_to_nvme_with_a_budget_too_small_for_trainable_staging(tmp_path, dtype):
    cfg, ref, model, kwargs, capacity = _lora_like(dtype)
    frozen_staging = staging_bytes(capacity, 2, dtype, trainable=False)
    # The cache holds values only (at most 4 chunks at once here), no gradient room.
    trainable = _trainable_bytes(ref, dtype)
    budget = frozen_staging + 5 * capacity * dtype.itemsize + trainable
    # Before frozen-only staging this was refused: two trainable staging slots and the
    # cache floor alone exceed it.
    assert staging_bytes(capacity, 2, dtype) + cache_floor(capacity, dtype, 2) > budget
    wrapped, opt = hm.wrap(model, device="cpu", lr=1e-3, host_memory=budget,
                           nvme_dir=str(tmp_path), **dict(kwargs, dtype=dtype))
    plain, popt = hm.wrap(ref, device="cpu", lr=1e-3, **dict(kwargs, dtype=dtype))
    chunks = wrapped._heteromem.manager.chunks
    assert all(c.nvme is None for c in chunks if c.trainable)
    assert any(c.nvme is not None for c in chunks if not c.trainable)
    report = hm.report(wrapped)
    assert report.nvme_chunks == sum(1 for c in chunks if c.nvme is not None) > 0
    assert report.details["nvme staging pool (host)"] == frozen_staging
    assert report.tiers["host"].budget_bytes == budget
    batches = gpt_batches(cfg, 5, batch=4)
    assert train_steps(wrapped, opt, batches) == train_steps(plain, popt, batches)
    assert report.tiers["host"].peak_bytes <= budget
    got, want = wrapped.state_dict(), plain.state_dict()
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    # The frozen images are read every step and never rewritten.
    nvme = wrapped._heteromem.manager.nvme
    assert nvme.bytes_read > 0
    assert hm.report(wrapped).host_cache_hit_rate is not None


def test_a_trainable_chunk_that_does_not_fit_beside_frozen_staging_uses_trainable_staging(
        tmp_path):
    """Everything trainable: the plan is the ordinary one, with trainable staging slots."""
    cfg, ref, model = gpt_pair()
    dtype = torch.float32
    kwargs = paging_kwargs(ref, 4)
    capacity = int(kwargs["chunk_mb"] * 2**20) // 4
    staging = staging_bytes(capacity, 2, dtype)
    budget = staging + cache_floor(capacity, dtype, 2)
    wrapped, _ = hm.wrap(model, device="cpu", host_memory=budget, nvme_staging=staging,
                         nvme_dir=str(tmp_path), **dict(kwargs, dtype=dtype))
    assert hm.report(wrapped).details["nvme staging pool (host)"] == staging
    assert all(c.nvme is not None for c in wrapped._heteromem.manager.chunks)


def test_a_wrap_writes_only_the_values_of_each_image(tmp_path):
    cfg, ref, model = gpt_pair()
    dtype = torch.bfloat16
    kwargs = paging_kwargs(ref, 2)
    capacity = int(kwargs["chunk_mb"] * 2**20) // 2
    staging = staging_bytes(capacity, 2, dtype)
    wrapped, _ = hm.wrap(model, device="cpu", host_memory=staging + cache_floor(capacity, dtype, 2),
                         nvme_staging=staging, nvme_dir=str(tmp_path), **dict(kwargs, dtype=dtype))
    nvme = wrapped._heteromem.manager.nvme
    on_nvme = [c for c in wrapped._heteromem.manager.chunks if c.nvme is not None]
    assert on_nvme
    values = sum(aligned(region.nbytes(nvme.capacity)) for c in on_nvme
                 for name, region in c.nvme.layout.regions.items() if name in VALUES)
    whole = sum(c.nvme.layout.nbytes for c in on_nvme)
    assert nvme.bytes_written == values < whole / 2  # bf16: 6 of 14 bytes a parameter


def test_a_sweep_of_budgets_over_a_frozen_base_trains_the_same(tmp_path):
    """Budgets from below the frozen-only plan's minimum up to one that holds everything: once
    a budget wraps, every larger one does too (a larger budget never fails where a smaller one
    works), trains to the same losses, and keeps no more chunks on NVMe; below the minimum the
    error names the frozen-only minimum."""
    dtype = torch.float32
    cfg, ref, model, kwargs, capacity = _lora_like(dtype)
    batches = gpt_batches(cfg, 3, batch=4)
    # Everything on the host: the frozen parameters (4 bytes each in fp32, slot padding
    # aside) and the trainable chunks. (Counted before ref is wrapped.)
    frozen = sum(p.numel() + 256 for p in ref.parameters() if not p.requires_grad)
    whole = frozen * 4 + _trainable_bytes(ref, dtype)
    plain, popt = hm.wrap(ref, device="cpu", lr=1e-3, **dict(kwargs, dtype=dtype))
    want = train_steps(plain, popt, batches)
    estimate = (staging_bytes(capacity, 2, dtype, trainable=False) + 5 * capacity * 4
                + _trainable_bytes(ref, dtype))
    outcomes = []
    for budget in torch.linspace(estimate // 2, whole, 10).long().tolist():
        try:
            wrapped, opt = hm.wrap(copy.deepcopy(model), device="cpu", lr=1e-3,
                                   host_memory=budget, nvme_dir=str(tmp_path),
                                   **dict(kwargs, dtype=dtype))
        except hm.OutOfMemory as exc:
            assert "only frozen" in str(exc), exc
            assert not outcomes or outcomes[-1] == "refused", (budget, outcomes)
            outcomes.append("refused")
            continue
        assert train_steps(wrapped, opt, batches) == want, budget
        outcomes.append(hm.report(wrapped).nvme_chunks)
        del wrapped, opt
    counts = [n for n in outcomes if n != "refused"]
    assert outcomes[0] == "refused" and counts[-1] == 0, outcomes
    assert len([n for n in counts if n > 0]) >= 2, outcomes
    assert counts == sorted(counts, reverse=True), outcomes
