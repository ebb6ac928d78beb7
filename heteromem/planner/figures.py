"""The machine figures the planner's step-time bound uses, and `plan --calibrate`, which
measures them here and stores them (HETEROMEM_CACHE_DIR, default ~/.cache/heteromem).

Without a calibration the figures are conservative defaults for a PCIe 4 server, and the plan
says so. A calibration measures: the CPU Adam rate (heteromem's own op, bf16 path, all
threads), pinned host<->device copy bandwidth and bf16 matmul TFLOP/s when a GPU is visible,
and sequential NVMe write/read speed when a directory is given.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

# name -> (memory in bytes, sustained dense bf16 TFLOP/s a training step can expect)
GPUS: dict[str, tuple[int, float]] = {
    "rtx3090": (24 * 2**30, 70.0), "rtx4090": (24 * 2**30, 150.0),
    "a10g": (24 * 2**30, 60.0), "l40s": (48 * 2**30, 300.0),
    "a100-40gb": (40 * 2**30, 250.0), "a100-80gb": (80 * 2**30, 250.0),
    "h100": (80 * 2**30, 600.0), "h200": (141 * 2**30, 600.0),
}


@dataclass
class Figures:
    h2d_gbps: float = 25.0          # pinned host -> device, GB/s
    d2h_gbps: float = 25.0
    cpu_adam_gparams: float = 1.5   # fused CPU Adam, 1e9 parameters per second (whole host)
    nvme_read_gbps: float = 3.0
    nvme_write_gbps: float = 2.0
    gpu_tflops: float = 250.0
    # Collective bandwidth between GPUs (all-gather / reduce-scatter, per rank, NCCL "bus"
    # GB/s); not calibrated (one GPU cannot measure it): a PCIe-class default, set it for
    # NVLink machines.
    comm_gbps: float = 20.0
    source: str = "defaults (no calibration on this machine; run `python -m heteromem plan --calibrate`)"


def cache_path() -> str:
    base = os.environ.get("HETEROMEM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "heteromem")
    return os.path.join(base, "calibration.json")


def load_figures() -> Figures:
    """The stored calibration of this machine, else defaults."""
    try:
        with open(cache_path(), encoding="utf-8") as f:
            data = json.load(f)
        fields = {f.name for f in dataclasses.fields(Figures)}
        return Figures(**{k: v for k, v in data.items() if k in fields})
    except (OSError, ValueError, TypeError):
        return Figures()


def _median_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(nvme_dir: str | None = None, *, params: int = 32_000_000) -> Figures:
    """Measures this machine's figures, stores them, returns them."""
    import heteromem.ops as ops

    fig = Figures()
    master = torch.randn(params)
    m, v = torch.zeros(params), torch.zeros(params)
    grad = torch.randn(params).to(torch.bfloat16)
    lowp = torch.empty(params, dtype=torch.bfloat16)
    step = iter(range(1, 10**6))
    fig.cpu_adam_gparams = params / _median_seconds(lambda: ops.adam_step_(
        master, grad, m, v, step=next(step), lr=1e-4, param_lowp=lowp)) / 1e9
    if torch.cuda.is_available():
        n = 256 * 2**20
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")

        def copy(dst, src):
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
        fig.h2d_gbps = n / _median_seconds(lambda: copy(dev, host)) / 1e9
        fig.d2h_gbps = n / _median_seconds(lambda: copy(host, dev)) / 1e9
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

        def matmuls():
            for _ in range(10):
                a @ a
            torch.cuda.synchronize()
        fig.gpu_tflops = 10 * 2 * 4096**3 / _median_seconds(matmuls) / 1e12
    if nvme_dir is not None:
        from heteromem.io import IoEngine, aligned_empty

        n = 256 * 2**20
        buf = aligned_empty(n)
        buf.copy_(torch.randint(0, 255, (n,), dtype=torch.uint8))
        with tempfile.TemporaryDirectory(dir=nvme_dir) as tmp, IoEngine() as engine:
            f = engine.open(os.path.join(tmp, "calibrate.bin"), create=True)
            engine.set_size(f, n)

            def write():
                engine.write(f, 0, buf)
                engine.fsync(f)
            fig.nvme_write_gbps = n / _median_seconds(write, 3) / 1e9
            fig.nvme_read_gbps = n / _median_seconds(lambda: engine.read(f, 0, buf), 3) / 1e9
            engine.close(f)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    fig.source = f"calibrated {now} on {platform.node()} ({os.cpu_count()} CPUs, {gpu})"
    path = cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(fig), f, indent=1)
    return fig
