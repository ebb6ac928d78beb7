"""A step that fails never loses or half-applies training state.

- Impossible hyper-parameters are refused by hm.wrap, and by opt.step() (after an edit of
  param_groups) before any chunk changes; the step can then be taken once they are fixed.
- An exception inside a chunk's update (injected into the fused op) leaves every parameter it
  did not update with its old value and its gradient: opt.step() finishes the step bit for bit
  as if nothing had failed, opt.zero_grad() drops it, and a forward in between is refused.
- A read or write failure on the NVMe tier (injected ENOSPC / EIO, a truncated state file)
  raises an OSError naming the file that says truly what happened; the same choice follows.
"""

from __future__ import annotations

import errno
import glob
import os

import pytest
import torch

import heteromem as hm
import heteromem.ops
from heteromem.models import GPT, GPTConfig
from wrap_helpers import gpt_batches, gpt_pair, nvme_host_budget, paging_kwargs, param_bytes

BAD = [("lr", float("nan")), ("lr", -1.0), ("betas", (1.5, 0.999)), ("betas", (0.9, 1.0000001)),
       ("eps", -1.0), ("weight_decay", float("inf"))]


def _groups(model: torch.nn.Module) -> list[dict]:
    """Two param groups, as a GPT is usually trained: their parameters interleave in chunks,
    so a chunk's update is several fused calls."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def _wrapped(dtype: torch.dtype, **kwargs):
    cfg, ref, model = gpt_pair()
    elem = torch.empty((), dtype=dtype).element_size()
    opt = torch.optim.AdamW(_groups(model), lr=3e-3)
    sizes = dict(paging_kwargs(ref, elem), **kwargs)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=dtype, **sizes)
    return cfg, model, opt


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _step(model, opt, batch) -> float:
    loss = model(*batch)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("key,value", BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_impossible_hyper_parameters_are_refused_by_wrap(key, value):
    model = torch.nn.Linear(8, 8)
    with pytest.raises(ValueError, match=rf"hm.wrap.*{key.split('[')[0]}"):
        hm.wrap(model, device="cpu", **{key: value})
    assert getattr(model, "_heteromem", None) is None
    # Also when they come from a torch optimizer whose param_groups were edited.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=rf"param group 0.*{key}"):
        hm.wrap(model, opt, device="cpu")


@pytest.mark.parametrize("key,value", BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_a_bad_param_group_is_refused_by_step_before_anything_changes(key, value):
    cfg, model, opt = _wrapped(torch.float32)
    cfg, clean, clean_opt = _wrapped(torch.float32)
    batches = gpt_batches(cfg, 3)
    for b in batches[:2]:
        assert _step(model, opt, b) == _step(clean, clean_opt, b)
    before = _state(model)
    good = opt.param_groups[1][key]
    opt.param_groups[1][key] = value
    model(*batches[2]).backward()
    with pytest.raises(ValueError, match=rf"opt.step\(\): param group 1: {key}.*call opt.step\(\) again"):
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(hm.CheckpointError, match="waiting for opt.step"):
        hm.save_checkpoint("unused", model, opt)
    opt.param_groups[1][key] = good
    opt.step()  # the same gradients: the step is taken now
    opt.zero_grad()
    _step(clean, clean_opt, batches[2])
    for k, v in clean.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


class _Flaky:
    """The fused Adam op, raising once on its `fail_at`-th call (1-based) for `model` (updates
    of other models still finishing in the background are left alone)."""

    def __init__(self, fail_at: int, model) -> None:
        self.real, self.fail_at, self.calls = heteromem.ops.adam_step_, fail_at, 0
        self.masters = {c.master.untyped_storage().data_ptr()
                        for c in model._heteromem.manager.chunks if c.master is not None}

    def __call__(self, master, *args, **kwargs):
        if master.untyped_storage().data_ptr() in self.masters:
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("injected failure")
        return self.real(master, *args, **kwargs)


def _fail_one_update(monkeypatch, model, opt, batch, fail_at: int) -> hm.UpdateError:
    """One step whose `fail_at`-th fused call fails; returns the error, wherever the training
    loop meets it (the next forward: updates run in the background)."""
    opt.synchronize()
    monkeypatch.setattr(heteromem.ops, "adam_step_", _Flaky(fail_at, model))
    with pytest.raises(hm.UpdateError, match="injected failure.*opt.step\\(\\) to finish") as info:
        model(*batch).backward()
        opt.step()
        opt.zero_grad()
        opt.synchronize()
    monkeypatch.undo()
    return info.value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fail_at", [1, 2, 7])
def test_a_failed_update_is_finished_by_the_next_step_bit_for_bit(monkeypatch, dtype, fail_at):
    cfg, model, opt = _wrapped(dtype)
    cfg, clean, clean_opt = _wrapped(dtype)
    batches = gpt_batches(cfg, 5)
    for b in batches[:2]:
        assert _step(model, opt, b) == _step(clean, clean_opt, b)
    clean_opt.synchronize()  # its updates must not meet the injected failure
    before = _state(model)
    error = _fail_one_update(monkeypatch, model, opt, batches[2], fail_at)
    assert isinstance(error, RuntimeError) and isinstance(error, hm.HeteromemError)
    now = model.state_dict()
    assert any(not torch.equal(now[k], v) for k, v in before.items()), "nothing was updated"
    assert any(torch.equal(now[k], v) for k, v in before.items()), "nothing was left"
    # Until the step is finished or dropped, a training forward would mix two batches.
    with pytest.raises(hm.UpdateError, match="did not finish"):
        model(*batches[3])
    with torch.no_grad():
        model(*batches[3])  # evaluation is fine
    with pytest.raises(hm.CheckpointError, match="waiting for opt.step"):
        hm.save_checkpoint("unused", model, opt)
    opt.step()
    opt.zero_grad()
    _step(clean, clean_opt, batches[2])
    for b in batches[3:]:
        assert _step(model, opt, b) == _step(clean, clean_opt, b)
    want = clean.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_zero_grad_after_a_failed_update_drops_the_rest_of_the_step(monkeypatch):
    cfg, model, opt = _wrapped(torch.float32)
    batches = gpt_batches(cfg, 4)
    _step(model, opt, batches[0])
    before = _state(model)  # (waits for the updates: the injected failure meets only the next)
    _fail_one_update(monkeypatch, model, opt, batches[1], fail_at=1)
    partial = _state(model)
    opt.zero_grad()
    # Nothing changes by dropping; what was not updated stays as before the step.
    for k, v in model.state_dict().items():
        assert torch.equal(v, partial[k]), k
    assert any(torch.equal(partial[k], v) for k, v in before.items())
    # Training goes on, and the dropped gradients are not added to the next step's.
    losses = [_step(model, opt, b) for b in batches[2:]]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_a_failed_update_of_device_states_raises_from_step(monkeypatch):
    """Chunks whose optimizer state fits the device budget are updated in opt.step() itself
    (on a GPU, by the CUDA kernel): a failure raises there, with the same guarantees."""
    cfg, ref, _ = gpt_pair()
    cfg, model, opt = _wrapped(torch.float32, device_memory=param_bytes(ref, 4) * 6)
    cfg, clean, clean_opt = _wrapped(torch.float32, device_memory=param_bytes(ref, 4) * 6)
    batches = gpt_batches(cfg, 4)
    for b in batches[:2]:
        _step(model, opt, b), _step(clean, clean_opt, b)
    assert hm.report(model).state_chunks_on_device > 0
    clean_opt.synchronize()
    opt.synchronize()
    monkeypatch.setattr(heteromem.ops, "adam_step_", _Flaky(2, model))
    model(*batches[2]).backward()
    with pytest.raises(hm.UpdateError, match="injected failure"):
        opt.step()
    monkeypatch.undo()
    opt.step()
    opt.zero_grad()
    _step(clean, clean_opt, batches[2])
    _step(model, opt, batches[3]), _step(clean, clean_opt, batches[3])
    want = clean.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k


# ---------------------------------------------------------------------- NVMe faults

def _nvme_wrapped(tmp_path, **kwargs):
    """fp32 GPT with every chunk on NVMe (the host: the staging pool and a small cache)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32)
    model = GPT(cfg)
    n = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    chunk_mb = largest * 4 * 1.01 / 2**20
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=3e-3, chunk_mb=chunk_mb,
                         device_memory=int(n * 4 * 0.4), nvme_dir=str(tmp_path),
                         **nvme_host_budget(model, torch.float32, chunk_mb, 0.0), **kwargs)
    assert hm.report(model).tiers["nvme"].current_bytes > 0
    return cfg, model, opt


@pytest.mark.parametrize("op,code", [("write", errno.ENOSPC), ("read", errno.EIO)])
def test_an_nvme_fault_keeps_the_gradients_and_the_step_can_be_taken_again(tmp_path, op, code):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    cfg, model, opt = _nvme_wrapped(tmp_path / "a")
    cfg, clean, clean_opt = _nvme_wrapped(tmp_path / "b")
    batches = gpt_batches(cfg, 5)
    for b in batches[:2]:
        assert _step(model, opt, b) == _step(clean, clean_opt, b)
    before = _state(model)
    model(*batches[2]).backward()
    # The first read or write of the step fails: no chunk is committed.
    model._heteromem.manager.nvme.engine.inject_fault(op, code, 0)
    with pytest.raises(hm.StorageError) as info:
        opt.step()
    assert isinstance(info.value, OSError) and info.value.errno == code
    assert "keep their parameters, optimizer states and gradients" in str(info.value)
    assert "restart" not in str(info.value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(hm.UpdateError, match="did not finish"):
        model(*batches[3])
    opt.step()  # the fault was transient: the same step is taken now
    opt.zero_grad()
    _step(clean, clean_opt, batches[2])
    for b in batches[3:]:
        assert _step(model, opt, b) == _step(clean, clean_opt, b)
    want = clean.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_a_truncated_state_file_says_truly_what_changed(tmp_path):
    """The image file loses its end (from the image the step reads first): the step raises
    EIO naming the file, commits nothing, says the chunks keep their state (not that putting
    them back failed), and every chunk whose image is intact reads back as before."""
    cfg, model, opt = _nvme_wrapped(tmp_path)
    batches = gpt_batches(cfg, 3)
    _step(model, opt, batches[0])
    before = _state(model)
    model(*batches[1]).backward()
    manager = model._heteromem.manager
    chunks = [c for c in manager.chunks if c.nvme is not None and c.trainable]
    first = min(chunks, key=opt._priority)  # the chunk the step reads first
    pool = first.nvme.pool
    cut = pool.offset(first.nvme.slot)
    os.truncate(pool.path, cut + 100)
    with pytest.raises(OSError) as info:
        opt.step()
    message = str(info.value)
    assert info.value.errno == errno.EIO and os.path.basename(pool.path) in message
    assert "keep their parameters, optimizer states and gradients" in message
    assert "failed too" not in message
    with pytest.raises(hm.CheckpointError, match="waiting for opt.step"):
        hm.save_checkpoint(tmp_path / "ckpt", model, opt)
    opt.zero_grad()  # drops the step's gradients: a new forward is allowed again
    intact = [c for c in chunks if pool.offset(c.nvme.slot) + pool.slot_bytes <= cut]
    assert intact
    for chunk in intact:
        master = manager.states(chunk)["master"]
        for slot in chunk.slots:
            assert torch.equal(master[slot.range].view(slot.shape), before[slot.name])
