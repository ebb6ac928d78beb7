"""Training-step time of a model trained plainly vs wrapped by hm.wrap, same run, same model.

    .venv/bin/pytest bench/bench_wrap.py                     # CPU group (and CUDA on a GPU)
    HETEROMEM_BENCH_QUICK=1 .venv/bin/pytest bench/bench_wrap.py --benchmark-disable   # smoke

Group `wrap-cuda-<tokens>` (marker cuda): a GPT that fits the GPU, at 16k and 32k tokens per
step, trained (i) plainly (fp32 master on the GPU, bf16 autocast, torch fused AdamW) and (ii)
wrapped in bf16 with a device budget of one third of its bf16 parameter bytes, so at least two
thirds of the parameters live off the device; (iii) is (ii) with `step_in_backward=True`
(updates start during backward; same numbers). Target: (ii) or (iii) >= 0.8x the throughput
of (i) at >= 16k tokens per step. The CPU Adam costs the same per step at any token count, so
the 32k group shows how much of the gap is that fixed cost.
Group `wrap-cpu`: the same comparison at a small size on the CPU "device" tier (copies are
memcpy), both in fp32, to show the paging overhead where no GPU exists.
Clipping variants (both groups): `wrapped-clip` clips after backward; `wrapped-step-in-
backward-clip` updates during backward speculatively and redoes when clipping fires; on the
CPU group also with a max_grad_norm that always fires and one that never does, recording the
redo rate and the seconds per step spent putting updates back (extra_info), so a GPU run can
be read against them.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import heteromem as hm
from heteromem.models import GPT, GPTConfig

from conftest import quick_mode


VARIANTS = ["plain", "wrapped", "wrapped-step-in-backward"]
# Clipping, as fine-tuning does: after backward, and during backward speculatively (redone when
# clipping fires; both ways measured: a tiny max_grad_norm fires every step, a huge one never).
CLIP_VARIANTS = {"wrapped-clip": (False, 1.0), "wrapped-step-in-backward-clip": (True, 1.0),
                 "wrapped-step-in-backward-clip-fires": (True, 1e-3),
                 "wrapped-step-in-backward-clip-idle": (True, 1e6)}


def _config(device: str, tokens_k: int = 16) -> tuple[GPTConfig, int]:
    if quick_mode():
        return GPTConfig(vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=64), 2
    if device == "cuda":
        # ~160M parameters; batch x 1024 = `tokens_k` thousand tokens per step. A modest
        # vocabulary keeps the embedding (the largest parameter, so the chunk size) small next
        # to the budget.
        cfg = GPTConfig(vocab_size=8192, block_size=1024, n_layer=12, n_head=16, n_embd=1024)
        return cfg, tokens_k
    return GPTConfig(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=256), 8


def _step_fn(model, opt, batch, autocast: bool, device: str, losses: list):
    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if device == "cuda":
            torch.cuda.synchronize()
    return step


def _check_trained(model, opt, variant: str, losses: list) -> None:
    """What was timed really trained: every step's loss is finite, it falls on the repeated
    batch, and every trainable parameter took every step."""
    values = [float(x) for x in losses]
    assert values and all(math.isfinite(v) for v in values), values
    if len(values) > 2:
        assert values[-1] < values[0], values
    if variant == "plain":
        steps = {int(s["step"]) for s in opt.state.values()}
    else:
        opt.synchronize()
        steps = {s.step for s in model._heteromem.slots if s.trainable}
    assert steps == {len(values)}, (steps, len(values))


def _run(benchmark, device: str, variant: str, tokens_k: int = 16) -> None:
    torch.manual_seed(0)
    cfg, batch_size = _config(device, tokens_k)
    base = GPT(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    batch = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size + 1), device=device)
    losses: list[torch.Tensor] = []
    if variant == "plain":
        model = copy.deepcopy(base).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        step = _step_fn(model, opt, batch, autocast=device == "cuda", device=device,
                        losses=losses)
        budget = None
    else:
        # On the CPU both variants compute in fp32 (plain has no autocast there, and bf16
        # matmuls are slow on CPUs without bf16 units), so the ratio is the paging overhead.
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        # A third of the parameter bytes, in chunks the size of the largest parameter (at
        # least 4 of them: the tied embedding stays pinned through backward).
        chunk_bytes = int(max(p.numel() for p in base.parameters()) * dtype.itemsize * 1.01)
        budget = max(n_params * dtype.itemsize // 3, 4 * chunk_bytes)
        in_backward, clip = CLIP_VARIANTS.get(
            variant, (variant == "wrapped-step-in-backward", None))
        model, opt = hm.wrap(copy.deepcopy(base), lr=1e-4, device=device, dtype=dtype,
                             device_memory=budget, chunk_mb=chunk_bytes / 2**20,
                             step_in_backward=in_backward, max_grad_norm=clip)
        step = _step_fn(model, opt, batch, autocast=False, device=device, losses=losses)
    rounds = 3 if quick_mode() else 10
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=2, iterations=1)
    tokens = batch_size * cfg.block_size
    median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(dict(params=n_params, tokens_per_step=tokens, device_budget=budget,
                                     tokens_per_s=tokens / median if median else None,
                                     baseline="plain" if variant == "plain" else None))
    if variant != "plain":
        benchmark.extra_info["report"] = str(hm.report(model))
    if getattr(opt, "in_backward", None) is not None:
        benchmark.extra_info["chunks_updated_in_backward"] = opt.in_backward.chunks_updated
        if len(losses) > 1:  # the first step has no expectation: it updates in opt.step()
            assert opt.in_backward.chunks_updated > 0
        report = hm.report(model)
        if report.speculative_updates:
            steps = len(losses)
            benchmark.extra_info.update(
                speculative_updates=report.speculative_updates,
                updates_redone=report.updates_redone,
                redo_rate=report.updates_redone / report.speculative_updates,
                redo_seconds_per_step=report.redo_seconds / steps)
    _check_trained(model, opt, variant, losses)


@pytest.mark.parametrize("variant", VARIANTS + list(CLIP_VARIANTS))
def test_wrap_cpu(benchmark, variant):
    benchmark.group = "wrap-cpu"
    _run(benchmark, "cpu", variant)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens_k", [16, 32])
@pytest.mark.parametrize("variant", VARIANTS + ["wrapped-clip", "wrapped-step-in-backward-clip"])
def test_wrap_cuda(benchmark, variant, tokens_k):
    benchmark.group = f"wrap-cuda-{tokens_k}k-tokens"
    _run(benchmark, "cuda", variant, tokens_k)
