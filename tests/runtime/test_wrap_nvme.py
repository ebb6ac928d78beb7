"""The NVMe tier under hm.wrap: optimizer states that do not fit `host_memory` live in files
under `nvme_dir` and are streamed through a bounded staging pool. fp32 parity with torch
AdamW, bit-exactness against the same wrap without NVMe, file lifetime, and faults (ENOSPC /
EIO in the middle of a step) that leave the state from before the step intact."""

from __future__ import annotations

import copy
import errno
import gc
import glob
import os
import subprocess
import sys

import pytest
import torch

import heteromem as hm
from wrap_helpers import (assert_losses_close, assert_params_close, gpt_batches, gpt_pair,
                          nvme_host_budget, paging_kwargs, train_accumulating)

STAGING_SLOTS = 2
# On a GPU the same paths run with the device tier in GPU memory and pinned host buffers.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _on(batches: list[tuple], device: str) -> list[tuple]:
    return [(idx.to(device), tgt.to(device)) for idx, tgt in batches]


def _nvme_kwargs(ref: torch.nn.Module, tmp_path, element_size: int, host_state_fraction: float,
                 dtype: torch.dtype, device: str = "cpu") -> dict:
    """Device budget 40% of the parameters; host budget: the staging pool, a small cache for
    the NVMe chunks, and `host_state_fraction` of what the chunks need on the host; the other
    chunks (parameters and optimizer states) go to NVMe."""
    kwargs = paging_kwargs(ref, element_size)
    budget = nvme_host_budget(ref, dtype, kwargs["chunk_mb"], host_state_fraction,
                              staging_slots=STAGING_SLOTS)
    return dict(kwargs, **budget, nvme_dir=str(tmp_path), dtype=dtype, device=device)


def _host_state_fraction(model: torch.nn.Module) -> float:
    chunks = [c for c in model._heteromem.manager.chunks if c.trainable]
    on_host = sum(c.used for c in chunks if c.nvme is None and not c.states_on_device)
    return on_host / sum(c.used for c in chunks)


def _train(model, opt, batches, accumulate: int = 1) -> list[float]:
    return train_accumulating(model, opt, batches, accumulate)


_TIGHT_BUDGET = nvme_host_budget(torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(4))),
                                 torch.float32, 64 * 65 * 4 / 2**20, 0.0)


def _state_dirs(tmp_path) -> list[str]:
    return glob.glob(os.path.join(str(tmp_path), "heteromem-*"))


@pytest.mark.parametrize("fraction", [0.25, 0.0], ids=["some-on-host", "all-on-nvme"])
def test_fp32_parity_with_torch_adamw_clipping_accumulation_and_a_schedule(tmp_path, fraction):
    """Chunks on NVMe (parameters and states), some or all: 10 steps of clipped, accumulated
    (2 micro-batches) training under an LR schedule equal torch AdamW within 1e-5."""
    cfg, ref, model = gpt_pair()
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, opt, max_grad_norm=0.5,
                         **_nvme_kwargs(ref, tmp_path, 4, fraction, torch.float32))
    if fraction:
        assert 0.1 <= _host_state_fraction(model) <= 0.45  # a part on the host, the rest on NVMe
    else:
        assert _host_state_fraction(model) <= 0.1
    assert sum(c.nvme is not None for c in model._heteromem.manager.chunks) >= 3
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))
    rsched = torch.optim.lr_scheduler.LambdaLR(ropt, lambda s: 1.0 / (1 + 0.3 * s))
    batches = gpt_batches(cfg, 10, batch=4)
    ours = []
    for batch in batches:
        ours += _train(model, opt, [batch], accumulate=2)
        sched.step()
    want = []
    for idx, tgt in batches:
        total = 0.0
        for sl in (slice(0, 2), slice(2, 4)):
            loss = ref(idx[sl], tgt[sl]) / 2
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ropt.step()
        ropt.zero_grad()
        rsched.step()
        want.append(total)
    assert_losses_close(ours, want)
    assert_params_close(model.state_dict(), ref.state_dict())
    report = hm.report(model)
    nvme = report.tiers["nvme"]
    assert nvme.current_bytes > 0 and nvme.budget_bytes > nvme.current_bytes
    assert report.details["nvme staging pool (host)"] == _nvme_kwargs(
        ref, tmp_path, 4, fraction, torch.float32)["nvme_staging"]
    assert report.nvme_chunks >= 3 and report.nvme_bytes_per_step[1] > 0
    assert 0 <= report.host_cache_hit_rate <= 1
    assert report.details["nvme read"] > 0 and report.details["nvme written"] > 0
    assert report.tiers["host"].peak_bytes <= report.tiers["host"].budget_bytes


def _nvme_and_plain(tmp_path, dtype: torch.dtype, device: str = "cpu"):
    """(cfg, model with every state on NVMe, its optimizer, the same wrap without NVMe, its
    optimizer): identical models and settings but for the host budget and nvme_dir."""
    cfg, ref, model = gpt_pair()
    elem = torch.empty((), dtype=dtype).element_size()
    kwargs = _nvme_kwargs(ref, tmp_path, elem, 0.0, dtype, device)
    model, opt = hm.wrap(model, lr=3e-3, **kwargs)
    assert _host_state_fraction(model) <= 0.1  # (the cache took what was left)
    plain_kwargs = {k: v for k, v in kwargs.items()
                    if k not in ("nvme_dir", "nvme_staging", "host_memory")}
    plain, popt = hm.wrap(ref, lr=3e-3, **plain_kwargs)
    return cfg, model, opt, plain, popt


def _assert_same_state(model, plain) -> None:
    got, want = model.state_dict(), plain.state_dict()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_same_bits_as_the_same_wrap_without_nvme(tmp_path, dtype, device):
    """The NVMe tier only moves bytes: every loss and parameter equals the host-only run,
    with gradient accumulation."""
    cfg, model, opt, plain, popt = _nvme_and_plain(tmp_path, dtype, device)
    batches = _on(gpt_batches(cfg, 6, batch=4), device)
    assert _train(model, opt, batches, accumulate=2) == _train(plain, popt, batches, accumulate=2)
    _assert_same_state(model, plain)


def test_files_live_while_training_and_go_with_the_model(tmp_path):
    cfg, ref, model = gpt_pair()
    model, opt = hm.wrap(model, **_nvme_kwargs(ref, tmp_path, 2, 0.0, torch.bfloat16))
    dirs = _state_dirs(tmp_path)
    assert len(dirs) == 1 and f"-{os.getpid()}-" in os.path.basename(dirs[0])
    files = os.listdir(dirs[0])
    assert files and all(os.path.getsize(os.path.join(dirs[0], f)) > 0 for f in files)
    _train(model, opt, gpt_batches(cfg, 2))
    assert _state_dirs(tmp_path) == dirs
    del model, opt
    gc.collect()
    assert _state_dirs(tmp_path) == []


def test_files_are_removed_at_interpreter_exit(tmp_path):
    script = f"""
import torch, heteromem as hm
model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(4)))
model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, chunk_mb=64 * 65 * 4 / 2**20,
                     nvme_dir={str(tmp_path)!r}, **{_TIGHT_BUDGET!r})
model(torch.randn(2, 64)).sum().backward()
opt.step()
import glob, os
assert glob.glob(os.path.join({str(tmp_path)!r}, "heteromem-*", "*")), "no state files"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    assert _state_dirs(tmp_path) == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,code,after", [("write", errno.ENOSPC, 2), ("read", errno.EIO, 1),
                                           ("write", errno.EIO, 0)])
@pytest.mark.parametrize("then", ["step", "zero_grad"])
def test_a_fault_in_the_middle_of_a_step_commits_whole_chunks_only(tmp_path, op, code, after,
                                                                   device, then):
    """The step raises OSError naming the file. Each chunk's update is committed whole or not
    at all: the chunks before the fault are updated, the others keep their parameters, states
    and gradients. `opt.step()` then finishes the step, exactly as a run without the fault;
    `opt.zero_grad()` drops the rest, leaving those chunks as before the step."""
    cfg, model, opt, plain, popt = _nvme_and_plain(tmp_path, torch.float32, device)
    batches = _on(gpt_batches(cfg, 6), device)
    assert _train(model, opt, batches[:2]) == _train(plain, popt, batches[:2])
    before = model.state_dict()
    idx, tgt = batches[2]
    failed_loss = model(idx, tgt)
    failed_loss.backward()
    engine = model._heteromem.manager.nvme.engine
    engine.inject_fault(op, code, after)
    with pytest.raises(OSError) as info:
        opt.step()
    assert info.value.errno == code
    assert "heteromem-" in str(info.value) and "from before this step" in str(info.value)
    engine.clear_faults()
    partial = model.state_dict()
    untouched = [n for n in before if torch.equal(partial[n], before[n])]
    assert untouched, "the chunk that failed keeps its values"
    ref_loss = plain(idx, tgt)
    ref_loss.backward()
    assert failed_loss.item() == ref_loss.item()
    if then == "step":
        opt.step()
        popt.step()
    else:
        opt.zero_grad()
        for n in untouched:
            assert torch.equal(model.state_dict()[n], before[n]), n
        return
    opt.zero_grad()
    popt.zero_grad()
    assert _train(model, opt, batches[3:]) == _train(plain, popt, batches[3:])
    _assert_same_state(model, plain)


def test_state_dict_round_trip_with_states_on_nvme(tmp_path):
    cfg, ref, model = gpt_pair()
    model, opt = hm.wrap(model, **_nvme_kwargs(ref, tmp_path, 4, 0.0, torch.float32))
    _train(model, opt, gpt_batches(cfg, 2))
    saved = model.state_dict()
    changed = {k: v + 1 for k, v in saved.items()}
    model.load_state_dict(changed)
    got = model.state_dict()
    for name in saved:
        assert torch.equal(got[name], changed[name]), name
    with torch.no_grad():  # the host copies the model computes with follow
        check = copy.deepcopy(ref)
        check.load_state_dict(changed)
        idx = gpt_batches(cfg, 1)[0][0]
        assert torch.allclose(model(idx), check(idx), rtol=1e-5, atol=1e-6)


def test_states_move_from_nvme_to_the_device_when_the_budget_allows(tmp_path):
    """After the first iteration placement may keep chunks' states on the device: those on
    NVMe are read in and their files removed; numbers do not change."""
    cfg, ref, model = gpt_pair()
    kwargs = _nvme_kwargs(ref, tmp_path, 4, 0.0, torch.float32)
    kwargs["device_memory"] = None
    plain = copy.deepcopy(model)
    model, opt = hm.wrap(model, lr=3e-3, **kwargs)
    plain, popt = hm.wrap(plain, lr=3e-3, device="cpu", dtype=torch.float32,
                          chunk_mb=kwargs["chunk_mb"])
    batches = gpt_batches(cfg, 4)
    assert _train(model, opt, batches) == _train(plain, popt, batches)
    chunks = model._heteromem.manager.chunks
    assert all(c.nvme is None for c in chunks) and any(c.states_on_device for c in chunks)
    assert hm.report(model).tiers["nvme"].current_bytes == 0
    assert os.listdir(_state_dirs(tmp_path)[0]) == []


# ---------------------------------------------------------------------- refused input


def _small():
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(4)))


# Four chunks of 4160 fp32 elements; the host holds a two-slot staging pool and a small cache:
# every chunk goes to NVMe.
_TIGHT = dict(device="cpu", dtype=torch.float32, chunk_mb=64 * 65 * 4 / 2**20,
              **_TIGHT_BUDGET)


def test_missing_nvme_dir_is_refused(tmp_path):
    with pytest.raises(ValueError, match="nvme_dir.*does not exist"):
        hm.wrap(_small(), nvme_dir=str(tmp_path / "missing"), **_TIGHT)


def test_nvme_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="nvme_dir.*not a directory"):
        hm.wrap(_small(), nvme_dir=str(path), **_TIGHT)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_nvme_dir_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="nvme_dir.*not writable"):
        hm.wrap(_small(), nvme_dir=str(ro), **_TIGHT)


def test_nvme_dir_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="nvme_dir"):
        hm.wrap(_small(), nvme_dir=3, **_TIGHT)


def test_not_enough_space_under_nvme_dir_is_refused_up_front(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 4096, 4096))
    model = _small()
    with pytest.raises(hm.OutOfMemory, match="nvme_dir") as info:
        hm.wrap(model, nvme_dir=str(tmp_path), **_TIGHT)
    assert info.value.tier == "nvme"
    assert _state_dirs(tmp_path) == []
    monkeypatch.undo()
    model, opt = hm.wrap(model, nvme_dir=str(tmp_path), **_TIGHT)  # the model is still usable
    model(torch.randn(2, 64)).sum().backward()
    opt.step()


def test_staging_pool_smaller_than_two_chunks_is_refused(tmp_path):
    with pytest.raises(ValueError, match="nvme_staging"):
        hm.wrap(_small(), nvme_dir=str(tmp_path), **{**_TIGHT, "nvme_staging": 3 * 20480})


def test_nvme_staging_without_nvme_dir_is_refused():
    with pytest.raises(ValueError, match="nvme_staging.*nvme_dir"):
        hm.wrap(_small(), **_TIGHT)


def test_host_budget_too_small_without_nvme_dir_suggests_it():
    kwargs = {k: v for k, v in _TIGHT.items() if k != "nvme_staging"}
    with pytest.raises(hm.OutOfMemory, match="nvme_dir") as info:
        hm.wrap(_small(), **kwargs)
    assert info.value.tier == "host"


def test_a_wrap_that_fails_part_way_removes_its_folder_and_leaves_the_model_as_it_was(
        tmp_path, monkeypatch):
    """The disk fails while wrap writes the initial optimizer states: the error comes out,
    the `heteromem-<pid>-*` folder is gone at once (not at exit), and the model is unchanged
    and can be wrapped again."""
    from heteromem.memory.nvme import NvmeTier

    cfg, ref, model = gpt_pair()
    kwargs = _nvme_kwargs(ref, tmp_path, 4, 0.0, torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = NvmeTier.place_staged
    calls = []

    def failing(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(self, *args, **kw)

    monkeypatch.setattr(NvmeTier, "place_staged", failing)
    with pytest.raises(OSError, match="injected"):
        hm.wrap(model, lr=1e-3, **kwargs)
    assert len(calls) == 3
    assert _state_dirs(tmp_path) == []
    assert getattr(model, "_heteromem", None) is None
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    monkeypatch.undo()
    model, opt = hm.wrap(model, lr=1e-3, **kwargs)
    _train(model, opt, gpt_batches(cfg, 1))
    assert len(_state_dirs(tmp_path)) == 1
