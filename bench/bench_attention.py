"""heteromem.ops.attention against SDPA's flash and cuDNN backends, each measured in the same run.

    .venv/bin/pytest bench/bench_attention.py --benchmark-json=/tmp/bench_attention.json
    .venv/bin/python bench/summarize.py /tmp/bench_attention.json
    HETEROMEM_BENCH_QUICK=1 .venv/bin/pytest bench/bench_attention.py --benchmark-disable -q

Groups, one per (device, pass, head dim, causal, sequence length), FlashAttention's benchmark
shapes: 16k tokens per batch (batch = 16384 / seq), a 2048-wide model (heads = 2048 / head_dim),
bf16; seq from HETEROMEM_BENCH_ATTN_SEQS (default 512,1024,2048,4096,8192,16384; 256 in
quick mode), head dim 64
and 128, causal and not, the forward alone and forward + backward. Rows: heteromem (subject),
SDPA flash and SDPA cuDNN (baselines; a backend that cannot run a shape is skipped with its
reason). FLOPs count the two matmuls of the forward (4 b h s^2 d, halved when causal) and 2.5x
that for the backward, as FlashAttention does; every row records TFLOP/s of its median in
extra_info. On CPU (HETEROMEM_BENCH_QUICK=1, what CI runs) one tiny shape runs heteromem's CPU
path (SDPA underneath) against SDPA itself, so the code path cannot rot; its timings mean
nothing. Each case runs for about HETEROMEM_BENCH_SECONDS (default 0.5) seconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import heteromem
from conftest import quick_mode
from heteromem.ops.attention import kernel_unsupported

TOKENS, WIDTH = 16384, 2048
CASE_SECONDS = float(os.environ.get("HETEROMEM_BENCH_SECONDS", "") or 0.5)
BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}
LABELS = {"heteromem": "heteromem", "sdpa-flash": "SDPA flash", "sdpa-cudnn": "SDPA cuDNN",
          "sdpa": "SDPA (default backend)"}


def bench_seqs() -> list[int]:
    if quick_mode():
        return [256]
    raw = os.environ.get("HETEROMEM_BENCH_ATTN_SEQS", "") or "512,1024,2048,4096,8192,16384"
    try:
        seqs = [int(s) for s in raw.replace("_", "").split(",")]
    except ValueError:
        seqs = []
    if not seqs or min(seqs) <= 0:
        raise pytest.UsageError(f"HETEROMEM_BENCH_ATTN_SEQS={raw!r}: give positive sequence "
                                "lengths like 512,2048")
    return seqs


def cases() -> list:
    """(device, impl, seq, head_dim): the CPU smoke case in quick mode, the CUDA sweep always
    (its cases carry the `cuda` marker and skip without a GPU)."""
    params = []
    if quick_mode():
        params += [pytest.param("cpu", impl, 128, 64, id=f"cpu-{impl}-s128-d64")
                   for impl in ("heteromem", "sdpa")]
    for seq in bench_seqs():
        for head_dim in (64, 128):
            for impl in ("heteromem", "sdpa-flash", "sdpa-cudnn"):
                params.append(pytest.param("cuda", impl, seq, head_dim, marks=pytest.mark.cuda,
                                           id=f"cuda-{impl}-s{seq}-d{head_dim}"))
    return params


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool,
                    mode: str) -> float:
    forward = 4.0 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    return forward if mode == "fwd" else 3.5 * forward


def make_step(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              mode: str) -> Callable[[], None]:
    """One forward (or forward + backward) of `impl`, waiting for the GPU when there is one."""
    def forward() -> torch.Tensor:
        if impl == "heteromem":
            return heteromem.ops.attention(q, k, v, causal=causal)
        if impl == "sdpa":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(BACKENDS[impl]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    grad = torch.randn_like(q)

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                forward()
        else:
            torch.autograd.grad(forward(), (q, k, v), grad)
        if q.is_cuda:
            torch.cuda.synchronize()
    return step


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("device", "impl", "seq", "head_dim"), cases())
def test_attention(benchmark, device: str, impl: str, seq: int, head_dim: int, causal: bool,
                   mode: str) -> None:
    """Attention over (batch, heads, seq, head_dim) bf16 tensors (fp32 on CPU)."""
    if device == "cpu":
        batch, heads, dtype = 1, 2, torch.float32
    else:
        batch, heads, dtype = max(1, TOKENS // seq), WIDTH // head_dim, torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype,
                           generator=gen).requires_grad_() for _ in range(3))
    if impl == "heteromem" and device == "cuda":
        reason = kernel_unsupported(q, k, v)
        if reason is not None:  # NOTE: timing the fallback would mislead
            pytest.skip(f"heteromem's kernel does not run here: {reason}")
    step = make_step(impl, q, k, v, causal, mode)
    try:
        step()  # warm-up; also finds a backend that cannot take this shape
    except RuntimeError as exc:
        if impl == "heteromem":
            raise  # kernel_unsupported said it runs here: a failure is a bug, not a skip
        pytest.skip(f"{LABELS[impl]} cannot run this case: {str(exc).splitlines()[0]}")
    rounds = 1
    if benchmark.enabled:
        start = time.perf_counter()
        step()
        rounds = max(3, min(200, round(CASE_SECONDS / max(time.perf_counter() - start, 1e-6))))
    benchmark.group = (f"attention-{device}-{mode} d{head_dim} {'causal' if causal else 'full'} "
                       f"seq{seq}")
    flops = attention_flops(batch, heads, seq, head_dim, causal, mode)
    benchmark.extra_info.update(
        device=device, impl=impl, case=LABELS[impl],
        role="subject" if impl == "heteromem" else "baseline", mode=mode, causal=causal,
        batch=batch, heads=heads, seq=seq, head_dim=head_dim, dtype=str(dtype), flops=flops)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # --benchmark-disable: ran once, untimed
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(median_s=median, tflop_per_s=flops / median / 1e12)
