"""The memory timeline in `hm.report(model)` and `Report.plot`: per-tier bytes over the latest
iteration within the budgets and peaks the report states, stall periods inside it, a PNG
written, and a clear message where matplotlib is missing."""

from __future__ import annotations

import collections
import sys
import threading
import time

import pytest
import torch

import heteromem as hm
from heteromem.memory.manager import ChunkManager
from heteromem.runtime import optimizer
from wrap_helpers import gpt_batches, gpt_pair, nvme_host_budget, paging_kwargs, train_steps

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _trained(steps: int = 3, **extra):
    cfg, _, model = gpt_pair()
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=1e-3,
                         **{**paging_kwargs(model, 4), **extra})
    train_steps(model, opt, gpt_batches(cfg, steps))
    return model


def _assert_well_formed(report: hm.Report) -> None:
    tl = report.timeline
    assert tl is not None and tl.duration > 0
    for name, series in tl.tiers.items():
        times = [t for t, _ in series]
        assert times[0] == 0.0 and times[-1] == pytest.approx(tl.duration)
        assert times == sorted(times)
        assert all(0 <= b <= report.tiers[name].peak_bytes for _, b in series)
        budget = report.tiers[name].budget_bytes
        if budget is not None:
            assert max(b for _, b in series) <= budget
    for start, end, what in tl.stalls:
        assert 0 <= start <= end <= tl.duration and what in ("copy", "update", "nvme")
    assert [p for _, p in tl.phases] == ["forward", "backward", "step"]
    assert all(0 <= t <= tl.duration for t, _ in tl.phases)


def test_timeline_covers_the_last_iteration_within_budget_and_peak():
    cfg, _, model = gpt_pair()
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, **paging_kwargs(model, 4))
    batches = gpt_batches(cfg, 3)
    train_steps(model, opt, batches[:2])
    before_last = time.perf_counter()
    train_steps(model, opt, batches[2:])
    report = hm.report(model)
    # The last iteration only: not the first one, nor the re-packing after it.
    assert report.timeline.duration <= time.perf_counter() - before_last
    _assert_well_formed(report)
    tl = report.timeline
    assert set(tl.tiers) == {"device", "host"}
    device = [b for _, b in tl.tiers["device"]]
    # The device tier pages: chunks come and go within the iteration, up to its peak.
    assert len(set(device)) > 1
    assert max(device) <= report.tiers["device"].peak_bytes <= report.tiers["device"].budget_bytes
    assert max(b for _, b in tl.tiers["host"]) == report.tiers["host"].peak_bytes


def test_timeline_between_iterations_is_the_last_complete_one():
    cfg, _, model = gpt_pair()
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, **paging_kwargs(model, 4))
    train_steps(model, opt, gpt_batches(cfg, 2))
    with torch.no_grad():  # an evaluation forward starts an iteration that never steps
        model(*gpt_batches(cfg, 1, seed=5)[0])
    _assert_well_formed(hm.report(model))


def test_update_stalls_are_marked_inside_the_iteration(monkeypatch):
    """Updates still running when the next forward needs their chunk make it wait: those
    waits are stalls. (Each update here holds back until the training thread waits for its
    chunk, so the forward surely meets updates in flight, however fast the machine.)"""
    waited: dict[int, threading.Event] = collections.defaultdict(threading.Event)
    wait_update, update_chunk = ChunkManager._wait_update, optimizer.update_chunk

    def noting_wait(self, chunk):
        if chunk.update is not None:
            waited[id(chunk)].set()
        return wait_update(self, chunk)

    released = threading.Event()  # set at the end: the last step's updates go free

    def held_update(chunk, *args, **kwargs):
        event = waited[id(chunk)]
        if not released.is_set():
            event.wait(timeout=2.0)  # (a safety net: the training thread waits in chunk order)
        event.clear()
        return update_chunk(chunk, *args, **kwargs)

    monkeypatch.setattr(ChunkManager, "_wait_update", noting_wait)
    monkeypatch.setattr(optimizer, "update_chunk", held_update)
    model = _trained()
    report = hm.report(model)
    released.set()
    for event in list(waited.values()):
        event.set()
    model._heteromem.synchronize()
    _assert_well_formed(report)
    stalls = [s for s in report.timeline.stalls if s[2] == "update"]
    assert stalls and all(end > start for start, end, _ in stalls)
    assert report.stall_seconds >= sum(end - start for start, end, _ in stalls)


def test_nvme_tier_and_its_waits_join_the_timeline(tmp_path):
    cfg, ref, _ = gpt_pair()
    kwargs = paging_kwargs(ref, 4)
    # Only the staging pool and a small cache on the host: every chunk goes to NVMe.
    budget = nvme_host_budget(ref, torch.float32, kwargs["chunk_mb"], 0.0)
    report = hm.report(_trained(nvme_dir=str(tmp_path), **budget))
    _assert_well_formed(report)
    assert set(report.timeline.tiers) == {"device", "host", "nvme"}
    assert any(what == "nvme" for _, _, what in report.timeline.stalls)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    report = hm.report(_trained(steps=2))
    path = tmp_path / "memory.png"
    assert report.plot(path, title="tiny GPT") == path
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    report = hm.report(_trained(steps=1))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        report.plot(tmp_path / "memory.png")
    assert not (tmp_path / "memory.png").exists()
