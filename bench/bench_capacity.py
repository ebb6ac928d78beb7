"""Capacity: a GPT whose training state is at least twice the machine's RAM, built on the meta
device, trained with a small `host_memory` and every chunk that does not fit on NVMe.

    .venv/bin/python bench/bench_capacity.py --nvme-dir /mnt/nvme [--params 3.4e9]
        [--host-memory 8GB] [--steps 2] [--step-in-backward] [--json PATH]
    HETEROMEM_BENCH_QUICK=1 .venv/bin/pytest bench/bench_capacity.py --benchmark-disable  # smoke

What it records (the issue's measure): the model's training state against RAM, peak RSS
against `host_memory` + 2 GiB (everything the process holds: the interpreter and torch, the
CPU "device" tier's working set, activations), the disk used against the state (target: at most 1.15x, one copy), whether the
loss falls, and each step's time against the pure I/O time of the bytes it moved through
the engine (target: at most 1.3x). The pure I/O time comes from the same run: the engine
moves the same number of bytes through the same files at the same queue depth, reads then
writes, right after training.

On a 2-core CPU-only machine the "device" is the CPU itself, so compute (forward and backward
of a 3.4B model on two cores) adds to the I/O; the ratio against pure I/O is the one a GPU
machine would show only where its compute hides under the I/O.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time

import psutil
import pytest
import torch
from torch import nn

import heteromem as hm
from heteromem.memory.nvme import staging_bytes
from heteromem.memory.sizes import parse_size
from heteromem.models import GPT, GPTConfig

RSS_SLACK = 2 * 2**30   # the bound: peak RSS <= host_memory + 2 GiB


def _quick() -> bool:
    return os.environ.get("HETEROMEM_BENCH_QUICK", "") not in ("", "0")


def gpt_config(params: float) -> GPTConfig:
    """A GPT of about `params` parameters: width 3200 (25 heads of 128), a modest vocabulary
    so the chunk size (at least the largest parameter) stays 64 MiB of bf16."""
    if params < 1e8:  # the smoke size
        return GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128)
    width = 3200
    per_layer = 12 * width * width + 13 * width
    layers = max(1, round((params - 8192 * width) / per_layer))
    return GPTConfig(vocab_size=8192, block_size=128, n_layer=layers, n_head=width // 128,
                     n_embd=width)


def init(module: nn.Module) -> None:
    """GPT-2's initialisation, module by module (hm.wrap calls it as chunks fill)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        module.reset_parameters()


class PeakRss:
    """Samples the process's RSS on a thread (the kernel's peak, ru_maxrss, includes the
    interpreter's start-up; this tracks the run)."""

    def __init__(self, every: float = 0.05) -> None:
        self.peak = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        proc = psutil.Process()
        while not self._stop.wait(every):
            self.peak = max(self.peak, proc.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _disk_bytes(root: str) -> int:
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _pure_io_seconds(nvme, read_bytes: int, write_bytes: int) -> float:
    """The engine alone moving the same bytes through the trainable pool file, a staging slot
    at a time with as many requests in flight as the step has staging slots."""
    pool = nvme.pool("trainable")
    slots = [s.buffer for s in nvme.slots]
    size = slots[0].numel()
    total = 0.0
    for write, nbytes in ((False, read_bytes), (True, write_bytes)):
        start = time.perf_counter()
        in_flight: list[int] = []
        offset = 0
        limit = pool.count * pool.slot_bytes
        done = 0
        k = 0
        while done < nbytes:
            n = min(size, nbytes - done) // 4096 * 4096 or 4096
            if len(in_flight) == len(slots):
                nvme.engine.wait(in_flight.pop(0))
            if offset + n > limit:
                offset = 0
            buf = slots[k % len(slots)][:n]
            # NOTE: writes go over the pool's slots, which the run no longer needs.
            submit = nvme.engine.submit_write if write else nvme.engine.submit_read
            in_flight.append(submit(pool.file, offset, buf))
            offset += n
            done += n
            k += 1
        for ticket in in_flight:
            nvme.engine.wait(ticket)
        total += time.perf_counter() - start
    return total


def run(params: float, host_memory: int, nvme_dir: str, steps: int, step_in_backward: bool,
        batch: int = 1) -> dict:
    cfg = gpt_config(params)
    torch.manual_seed(0)
    rss = PeakRss()
    rss_start = psutil.Process().memory_info().rss
    with torch.device("meta"):
        model = GPT(cfg)
    n = sum(p.numel() for p in model.parameters())
    state = n * (2 + 12)
    largest = max(p.numel() for p in model.parameters())
    # Chunks of about 2.5 of the largest parameter (a 3200x12800 matrix), so that a layer's
    # matrices pack into few, well-filled chunks (a chunk exactly one matrix large leaves the
    # next layer's small parameters a chunk of their own).
    chunk = max(largest, min(32 * 2**20, -(-n // 8))) if n < 1e8 else int(largest * 2.5)
    staging = staging_bytes(chunk, 2, torch.bfloat16)
    start = time.perf_counter()
    model, opt = hm.wrap(model, init=init, device="cpu", dtype=torch.bfloat16, lr=3e-4,
                         weight_decay=0.0, device_memory=5 * chunk * 2,
                         chunk_mb=chunk * 2 / 2**20,
                         host_memory=host_memory, nvme_dir=nvme_dir, nvme_staging=staging,
                         step_in_backward=step_in_backward)
    wrap_seconds = time.perf_counter() - start
    manager = model._heteromem.manager
    nvme = manager.nvme
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=gen)
    losses, times, moved = [], [], []
    for _ in range(steps):
        read0, written0 = nvme.bytes_read, nvme.bytes_written
        t0 = time.perf_counter()
        loss = model(data[:, :-1], data[:, 1:])  # the same batch: the loss must fall
        loss.backward()
        opt.step()
        opt.zero_grad()
        opt.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        moved.append((nvme.bytes_read - read0, nvme.bytes_written - written0))
        del loss
    report = hm.report(model)
    disk = _disk_bytes(nvme.root)
    pure = [_pure_io_seconds(nvme, r, w) for r, w in moved[-1:]]
    peak = rss.stop()
    result = dict(
        params=n, layers=cfg.n_layer, width=cfg.n_embd, training_state_bytes=state,
        ram_bytes=psutil.virtual_memory().total, state_over_ram=state / psutil.virtual_memory().total,
        host_memory=host_memory, device_memory=5 * chunk * 2, chunk_elements=chunk,
        peak_rss_bytes=peak, rss_at_start=rss_start,
        rss_bound=host_memory + RSS_SLACK,
        disk_bytes=disk, disk_over_state=disk / state, nvme_chunks=report.nvme_chunks,
        disk_peak_bytes=report.tiers["nvme"].peak_bytes,
        disk_peak_over_state=report.tiers["nvme"].peak_bytes / state,
        wrap_seconds=wrap_seconds, losses=losses, step_seconds=times,
        bytes_moved_last_step=moved[-1], pure_io_seconds_last_step=pure[0],
        last_step_over_pure_io=times[-1] / pure[0] if pure[0] else None,
        host_cache_hit_rate=report.host_cache_hit_rate, step_in_backward=step_in_backward,
        torch=torch.__version__, cpus=os.cpu_count(),
        date=time.strftime("%Y-%m-%d"), nvme_dir=nvme_dir, report=str(report))
    del model, opt
    gc.collect()
    return result


def check(result: dict) -> None:
    """The issue's bounds that hold at any size."""
    assert result["losses"][-1] < result["losses"][0], result["losses"]
    assert result["peak_rss_bytes"] <= result["rss_bound"], (
        result["peak_rss_bytes"], result["rss_bound"])


@pytest.mark.slow
def test_capacity_smoke(benchmark, tmp_path):
    """A tiny GPT at a host budget far below its state: it trains, within the budget."""
    if not _quick():
        pytest.skip("the full-size run is `python bench/bench_capacity.py` (hours of disk I/O "
                    "on a CI-sized machine)")
    n = sum(p.numel() for p in GPT(gpt_config(0)).parameters())
    host = int(n * 14 * 0.5)
    result = benchmark.pedantic(run, args=(0, host, str(tmp_path), 3, False), rounds=1,
                                iterations=1)
    assert result["nvme_chunks"] > 0
    check(result)
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "report"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvme-dir", required=True)
    parser.add_argument("--params", type=float, default=3.7e9)
    parser.add_argument("--host-memory", default="8GB")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--step-in-backward", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="capacity-", dir=args.nvme_dir)
    result = run(args.params, parse_size(args.host_memory, "--host-memory"), folder, args.steps,
                 args.step_in_backward)
    print(result["report"])
    gib = 2**30
    print(f"{result['params'] / 1e9:.2f}B parameters, training state "
          f"{result['training_state_bytes'] / gib:.1f} GiB = {result['state_over_ram']:.2f}x RAM")
    print(f"peak RSS {result['peak_rss_bytes'] / gib:.2f} GiB (bound "
          f"{result['rss_bound'] / gib:.2f} GiB); disk {result['disk_bytes'] / gib:.1f} GiB = "
          f"{result['disk_over_state']:.3f}x the state (peak {result['disk_peak_over_state']:.3f}x); "
          f"wrap {result['wrap_seconds']:.0f} s")
    print(f"losses {result['losses']}; step seconds {[round(t, 1) for t in result['step_seconds']]}")
    print(f"last step moved {[round(b / gib, 1) for b in result['bytes_moved_last_step']]} GiB "
          f"(read, written); pure I/O {result['pure_io_seconds_last_step']:.1f} s; step / pure "
          f"I/O {result['last_step_over_pure_io']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in result.items()}, f, indent=1)
    check(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
