"""Soak: a long paged run with every chunk (parameters and optimizer states) on NVMe, a
checkpoint every 100 steps, and the model dropped and wrapped anew every 250 steps. RSS, pinned host bytes, open files and
threads must stay flat: a leak of any of them shows as a rise from one phase to the next.

    .venv/bin/python bench/bench_soak.py [--steps 1000] [--device cpu|cuda] [--json PATH]
    .venv/bin/pytest bench/bench_soak.py            # the same 1000 steps as a benchmark
    HETEROMEM_BENCH_QUICK=1 .venv/bin/pytest bench/bench_soak.py --benchmark-disable  # smoke

Every `CHECKPOINT_EVERY` steps (after the save) and right after each re-wrap, one sample is
taken: (step, RSS, pinned host bytes, open file descriptors, threads). The figures of a run go
in docs/nvme.md ("Soak").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import psutil
import pytest
import torch

import heteromem as hm
from heteromem.models import GPT, GPTConfig

CHECKPOINT_EVERY = 100
REWRAP_EVERY = 250
# A phase is the run between two re-wraps; the first one warms up (allocator pools, the
# OpenMP and I/O threads, page cache) and is left out of the flatness check.
RSS_SLACK = 64 * 2**20


def _quick() -> bool:
    return os.environ.get("HETEROMEM_BENCH_QUICK", "") not in ("", "0")


def _model() -> GPT:
    torch.manual_seed(0)
    if _quick():
        return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    return GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128))


def _wrap(device: str, nvme_dir: str):
    from heteromem.memory.host_plan import cache_floor
    from heteromem.memory.nvme import staging_bytes

    model = _model()
    n = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    chunk_mb = largest * 4 * 1.01 / 2**20
    capacity = int(chunk_mb * 2**20) // 4
    staging = staging_bytes(capacity, 2, torch.float32)
    # Host: the staging pool and a cache of a few chunks, nothing resident: every chunk's
    # parameters and optimizer states live in its NVMe image. Device: 40% of the parameters.
    host = staging + cache_floor(capacity, torch.float32, 3)
    model, opt = hm.wrap(model, device=device, dtype=torch.float32, lr=1e-3, chunk_mb=chunk_mb,
                         device_memory=max(int(n * 4 * 0.4), 3 * largest * 4 + 4096),
                         host_memory=host, nvme_dir=nvme_dir, nvme_staging=staging)
    assert hm.report(model).nvme_chunks > 0, "the chunks must be on NVMe"
    return model, opt


def _pinned_bytes() -> int:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    stats = torch.cuda.host_memory_stats()
    return int(stats.get("allocated_bytes.current", stats.get("allocated.current", 0)))


def _sample(step: int) -> dict:
    gc.collect()
    return dict(step=step, rss=psutil.Process().memory_info().rss, pinned=_pinned_bytes(),
                fds=len(os.listdir("/proc/self/fd")), threads=len(os.listdir("/proc/self/task")))


def soak(steps: int, device: str) -> dict:
    """Runs the soak; returns the samples, the state size and the seconds per step."""
    samples = []
    with tempfile.TemporaryDirectory(prefix="heteromem-soak-") as scratch:
        nvme_dir, ckpt = os.path.join(scratch, "nvme"), os.path.join(scratch, "ckpt")
        os.mkdir(nvme_dir)
        model, opt = _wrap(device, nvme_dir)
        state_bytes = sum(p.numel() for p in _model().parameters()) * 16
        cfg = model.cfg
        gen = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            data = torch.randint(0, cfg.vocab_size, (4, cfg.block_size + 1), generator=gen)
            data = data.to(device)
            loss = model(data[:, :-1], data[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            if not torch.isfinite(loss):
                raise AssertionError(f"step {step}: loss {loss.item()}")
            if step % CHECKPOINT_EVERY == 0:
                hm.save_checkpoint(ckpt, model, opt)
                samples.append(dict(_sample(step), event="checkpoint"))
            if step % REWRAP_EVERY == 0 and step < steps:
                # The old model goes, a new one resumes from the checkpoint. (The loss goes too:
                # its autograd graph reaches the parameters, as in plain PyTorch.)
                del model, opt, loss
                model, opt = _wrap(device, nvme_dir)
                hm.load_checkpoint(ckpt, model, opt)
                samples.append(dict(_sample(step), event="rewrap"))
        seconds = time.perf_counter() - start
        folders = len(os.listdir(nvme_dir))
        del model, opt, loss
        gc.collect()
        samples.append(dict(_sample(steps), event="dropped"))
        left = len(os.listdir(nvme_dir))
    return dict(samples=samples, state_bytes=state_bytes, seconds_per_step=seconds / steps,
                nvme_folders_while_wrapped=folders, nvme_folders_after_drop=left,
                device=device, steps=steps, torch=torch.__version__)


def check_flat(result: dict) -> None:
    """After the first phase, every figure stays where it was (RSS within a slack)."""
    samples = [s for s in result["samples"] if s["event"] != "dropped"]
    later = [s for s in samples if s["step"] > REWRAP_EVERY] or samples[-2:]
    for key in ("fds", "threads"):
        values = {s[key] for s in later}
        assert len(values) <= 2 and max(values) - min(values) <= 1, (key, later)
    rss = [s["rss"] for s in later]
    assert max(rss) - min(rss) <= RSS_SLACK + result["state_bytes"] // 2, rss
    pinned = [s["pinned"] for s in later]
    assert max(pinned) - min(pinned) <= result["state_bytes"], pinned
    assert result["nvme_folders_while_wrapped"] == 1 and result["nvme_folders_after_drop"] == 0


@pytest.mark.slow
def test_soak(benchmark):
    steps = 120 if _quick() else 1000
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if _quick():  # phases shrink with the run, so the smoke run still re-wraps
        global CHECKPOINT_EVERY, REWRAP_EVERY
        CHECKPOINT_EVERY, REWRAP_EVERY = 20, 50
    benchmark.group = f"soak-{device}"
    result = benchmark.pedantic(soak, args=(steps, device), rounds=1, iterations=1)
    check_flat(result)
    benchmark.extra_info.update(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the samples here")
    args = parser.parse_args()
    result = soak(args.steps, args.device)
    print(f"{args.steps} steps on {args.device}, {result['seconds_per_step'] * 1e3:.1f} ms a "
          f"step, training state {result['state_bytes'] / 2**20:.1f} MiB")
    print(f"{'step':>6} {'event':>10} {'RSS MiB':>9} {'pinned MiB':>11} {'fds':>5} {'threads':>8}")
    for s in result["samples"]:
        print(f"{s['step']:>6} {s['event']:>10} {s['rss'] / 2**20:>9.1f} "
              f"{s['pinned'] / 2**20:>11.1f} {s['fds']:>5} {s['threads']:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    check_flat(result)
    print("flat: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
