"""Dropping the last reference to a wrapped model and its optimizer frees everything heteromem
holds for it: host and device chunks, the update worker, the NVMe engine's threads, its files
and folder. A sweep, a notebook or a test suite that wraps again and again stays flat."""

from __future__ import annotations

import gc
import glob
import os
import threading
import time
import weakref

import psutil
import pytest
import torch

import heteromem as hm
from heteromem.models import GPT, GPTConfig
from wrap_helpers import nvme_host_budget

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _gpt(n_embd: int = 32) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=4, n_head=2, n_embd=n_embd))


def _train(model, opt, steps: int = 2) -> None:
    device = model._heteromem.manager.device
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        t = torch.randint(0, 256, (2, 17), generator=g).to(device)
        loss = model(t[:, :-1], t[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settle(baseline_threads: int, timeout: float = 5.0) -> None:
    """Waits for the update worker (which lingers a moment once idle) to end."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and (threading.active_count() > 1 or _threads() > baseline_threads):
        time.sleep(0.02)
    gc.collect()


def _variants(tmp_path):
    return {
        "paged": dict(device_memory="120KB", chunk_mb=0.05),
        "nvme": dict(device_memory="120KB", chunk_mb=0.05, dtype=torch.float32,
                     nvme_dir=str(tmp_path),
                     **nvme_host_budget(_gpt(), torch.float32, 0.05, 0.0)),
        "step_in_backward": dict(device_memory="120KB", chunk_mb=0.05, step_in_backward=True),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["paged", "nvme", "step_in_backward"])
def test_a_dropped_model_is_freed_with_everything_it_held(tmp_path, variant, device):
    kwargs = _variants(tmp_path)[variant]
    # Once per process, torch starts its OpenMP pool (and CUDA its own threads): a first
    # model, dropped, leaves those and nothing of its own.
    model, opt = hm.wrap(_gpt(), device=device, lr=1e-3, **kwargs)
    _train(model, opt, 2)
    del model, opt
    _settle(1 << 30, timeout=0.5)
    threads, fds = _threads(), _fds()
    model, opt = hm.wrap(_gpt(), device=device, lr=1e-3, **kwargs)
    _train(model, opt, 3)
    # A flash save's snapshot buffers belong to the model too (NVMe: no room for them).
    hm.save_checkpoint(tmp_path / "ckpt", model, opt, blocking=variant == "nvme")
    hm.wait_checkpoint()
    if variant == "nvme":
        assert hm.report(model).tiers["nvme"].current_bytes > 0
        assert glob.glob(str(tmp_path / "heteromem-*" / "*"))
    refs = [weakref.ref(o) for o in (model, opt, model._heteromem, model._heteromem.manager)]
    refs += [weakref.ref(c.host) for c in model._heteromem.manager.chunks]
    del model, opt
    _settle(threads)
    assert [r() is None for r in refs] == [True] * len(refs)
    assert glob.glob(str(tmp_path / "heteromem-*")) == []
    assert _threads() <= threads and _fds() <= fds


def test_wrapping_and_dropping_many_models_keeps_memory_flat(tmp_path):
    """RSS after the fourth wrap-train-drop is within a fraction of one model's training state
    of RSS after the first (it was 3 models higher when models were never freed)."""
    def cycle() -> int:
        model, opt = hm.wrap(_gpt(n_embd=128), device="cpu", dtype=torch.float32, lr=1e-3,
                             device_memory="1MB", chunk_mb=0.3)
        _train(model, opt, 2)
        state = hm.report(model).tiers["host"].peak_bytes
        del model, opt
        _settle(threads)
        return state

    threads = _threads()
    state = cycle()
    first = psutil.Process().memory_info().rss
    for _ in range(3):
        cycle()
    grown = psutil.Process().memory_info().rss - first
    assert state > 8 * 2**20  # the model is large enough for a leak to show
    assert grown < 0.5 * state, f"RSS grew {grown / 2**20:.1f} MiB over 3 models of {state / 2**20:.1f} MiB"


@pytest.mark.cuda
def test_pinned_host_memory_and_device_slabs_are_released():
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model, opt = hm.wrap(_gpt(n_embd=128), device="cuda", lr=1e-3, device_memory="1MB",
                         chunk_mb=0.3)
    _train(model, opt, 2)
    assert torch.cuda.memory_allocated() > before
    ref = weakref.ref(model._heteromem.manager.chunks[0].host)
    del model, opt
    _settle(_threads())
    torch.cuda.synchronize()
    assert ref() is None
    assert torch.cuda.memory_allocated() == before
