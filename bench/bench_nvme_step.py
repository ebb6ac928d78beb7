"""Optimizer step with every chunk on the NVMe tier vs the pure I/O time of the bytes that
step must move, same run, same files.

    .venv/bin/pytest bench/bench_nvme_step.py --benchmark-json=/tmp/nvme_step.json
    HETEROMEM_BENCH_QUICK=1 .venv/bin/pytest bench/bench_nvme_step.py --benchmark-disable -q

A stack of bf16 Linear layers (HETEROMEM_BENCH_SIZES parameters) is wrapped with a host budget
of a staging pool and a small host cache, so every chunk's image (parameters and fp32 states)
lives on NVMe and each `opt.step()` reads every chunk's fp32 master + moments (and the
gradients the cache spilled to disk), updates them (CPU Adam) and writes the new image into a
spare slot. The baseline is the same requests through the engine alone, at the same queue depth
(one request per staging slot in flight): all reads, then all writes.
Target (issue: NVMe tier): step time <= 1.3x that pure I/O time.

Files go under $HETEROMEM_BENCH_DIR (default build/bench in the repository): it should be
on the drive you care about. extra_info records whether the files were opened with O_DIRECT
(on tmpfs they are not, and the figures then measure memory, not a disk).
"""

from __future__ import annotations

import shutil
import statistics
import time

import pytest
import torch

import heteromem as hm
from heteromem.memory.host_plan import cache_floor
from heteromem.memory.nvme import aligned, staging_bytes
from conftest import quick_mode, scratch_dir

WIDTH = 1024


@pytest.fixture(scope="module")
def folder():
    """Where the wrapped model's state files go (wrap makes and removes its own subfolder)."""
    path = scratch_dir("nvme-step")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _requests(nvme, chunks) -> tuple[list, list, int]:
    """(reads, writes, bytes) a step issues: each chunk's state regions and spilled
    gradients, then its whole new image; as (pool, offset, nbytes) triples."""
    reads, writes = [], []
    for chunk in chunks:
        image = chunk.nvme
        start = image.layout.state_offset()
        reads.append((image.pool, image.pool.offset(image.slot) + start,
                      image.layout.nbytes - start))
        if chunk.grad_spill is not None:
            grads = nvme.pool("grads")
            nbytes = aligned(chunk.grad_spill.used * chunk.grad_spill.dtype.itemsize)
            reads.append((grads, grads.offset(chunk.grad_spill.slot), nbytes))
        writes.append((image.pool, None, image.layout.nbytes))
    moved = sum(n for _, _, n in reads) + sum(n for _, _, n in writes)
    return reads, writes, moved


def _pure_io_seconds(nvme, chunks) -> float:
    """All of the step's reads, then all of its writes (into spare slots), through the engine
    alone, with as many requests in flight as the step pipeline has staging slots."""
    slots = [s.buffer for s in nvme.slots]
    reads, writes, _ = _requests(nvme, chunks)
    total = 0.0
    for write, requests in ((False, reads), (True, writes)):
        start = time.perf_counter()
        in_flight: list[tuple[int, object, int | None]] = []
        for k, (pool, offset, nbytes) in enumerate(requests):
            if len(in_flight) == len(slots):
                ticket, spare_pool, spare = in_flight.pop(0)
                nvme.engine.wait(ticket)
                if spare is not None:
                    spare_pool.give(spare)
            buf = slots[k % len(slots)][:nbytes]
            spare = None
            if write:
                spare = pool.take()
                offset = pool.offset(spare)
            submit = nvme.engine.submit_write if write else nvme.engine.submit_read
            in_flight.append((submit(pool.file, offset, buf), pool, spare))
        for ticket, spare_pool, spare in in_flight:
            nvme.engine.wait(ticket)
            if spare is not None:
                spare_pool.give(spare)
        total += time.perf_counter() - start
    return total


def test_nvme_step(benchmark, numel, size_tag, folder):
    benchmark.group = f"nvme-step-{size_tag}"
    # Quick mode: 16 tiny layers, so the states still outweigh the staging pool.
    width = WIDTH if not quick_mode() else 64
    layers = max(16, numel // (width * width)) if quick_mode() else max(2, numel // (width * width))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))
    n = sum(p.numel() for p in model.parameters())
    chunk_elems = width * width * max(1, layers // 8)
    slab = chunk_elems * 2
    staging = staging_bytes(chunk_elems, 4, torch.bfloat16)
    model, opt = hm.wrap(model, lr=1e-4, device="cpu", dtype=torch.bfloat16,
                         chunk_mb=slab / 2**20, device_memory=3 * slab,
                         host_memory=staging + cache_floor(chunk_elems, torch.bfloat16, 2),
                         nvme_dir=str(folder), nvme_staging=staging)
    nvme = model._heteromem.manager.nvme
    chunks = [c for c in model._heteromem.manager.chunks if c.nvme is not None]
    assert chunks and all(c.nvme is not None for c in model._heteromem.manager.chunks)
    x = torch.randn(4, width, dtype=torch.bfloat16)

    def backward() -> tuple[tuple, dict]:
        model(x).float().pow(2).mean().backward()
        return (), {}

    for _ in range(2):  # warm-up, and the first iteration's placement
        backward()
        opt.step()
    backward()  # the gradients a step sees (some spilled to disk): the bytes it moves
    _, _, moved = _requests(nvme, chunks)
    io = [_pure_io_seconds(nvme, chunks) for _ in range(3 if quick_mode() else 5)]
    opt.zero_grad()
    benchmark.pedantic(opt.step, setup=backward, rounds=3 if quick_mode() else 7,
                       warmup_rounds=0, iterations=1)
    io_median = statistics.median(io)
    step_median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(dict(
        params=n, chunks_on_nvme=len(chunks), bytes_moved_per_step=moved,
        o_direct=all(c.nvme.pool.file.direct for c in chunks), engine=nvme.engine.backend,
        pure_io_seconds_median=io_median,
        pure_io_seconds_spread=[min(io), max(io)],
        pure_io_gb_per_s=moved / io_median / 1e9,
        step_gb_per_s=moved / step_median / 1e9 if step_median else None,
        step_over_pure_io=step_median / io_median if io_median else None,
        target_step_over_pure_io=1.3, directory=str(folder)))
