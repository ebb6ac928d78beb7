"""``python -m heteromem demo``: the README's main job.

Until ``hm.wrap`` lands (chunk memory), the demo runs the fused Adam step that every later
capability builds on, against ``torch.optim.AdamW(fused=True)`` on the same parameters, and
prints the throughput of each in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import heteromem as hm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=float, default=20e6,
                        help="parameters in the optimizer step (default 20e6)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def _time(fn: Callable[[], None], steps: int, device: torch.device) -> list[float]:
    fn()  # warm-up: first-touch page faults, lazy init
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def run(args: argparse.Namespace) -> int:
    n = int(args.params)
    if n <= 0:
        raise ValueError(f"--params must be > 0, got {args.params}")
    if args.steps <= 0:
        raise ValueError(f"--steps must be > 0, got {args.steps}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    print("heteromem demo: training with hm.wrap arrives with the chunk-memory issue; until then")
    print("this demo runs the fused Adam step (bf16 gradients, bf16 parameter copy) against")
    print(f"torch.optim.AdamW(fused=True) plus the casts it needs, {n / 1e6:.0f}M parameters on {device}.\n")
    print(hm.build_info(), "\n")

    master = torch.randn(n, device=device)
    exp_avg, exp_avg_sq = torch.zeros_like(master), torch.zeros_like(master)
    grad_bf16 = torch.randn(n, device=device).to(torch.bfloat16)
    param_bf16 = torch.empty(n, device=device, dtype=torch.bfloat16)
    step = [0]

    def ours() -> None:
        step[0] += 1
        hm.ops.adam_step_(master, grad_bf16, exp_avg, exp_avg_sq, step=step[0], lr=1e-4,
                          weight_decay=0.01, param_lowp=param_bf16)

    torch_master = torch.nn.Parameter(master.clone())
    torch_master.grad = torch.empty_like(master)
    opt = torch.optim.AdamW([torch_master], lr=1e-4, weight_decay=0.01, fused=True)

    def baseline() -> None:
        torch_master.grad.copy_(grad_bf16)  # upcast the low-precision gradient
        opt.step()
        param_bf16.copy_(torch_master.detach())  # round the master back to bf16

    rows = []
    for name, fn in (("heteromem adam_step_ (one pass)", ours),
                     ("torch fused AdamW + casts", baseline)):
        times = _time(fn, args.steps, device)
        med = statistics.median(times)
        rows.append((name, med, min(times), max(times)))
    base = rows[1][1]
    print(f"{'variant':<34}{'median ms':>10}{'min..max ms':>18}{'Gparam/s':>10}{'GB/s@28B':>10}{'speedup':>9}")
    for name, med, lo, hi in rows:
        print(f"{name:<34}{med * 1e3:>10.1f}{f'{lo * 1e3:.1f}..{hi * 1e3:.1f}':>18}"
              f"{n / med / 1e9:>10.3f}{28 * n / med / 1e9:>10.2f}{base / med:>8.2f}x")
    return 0
