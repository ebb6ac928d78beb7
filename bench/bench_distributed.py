"""Bytes a sharded wrapped model communicates per step, per rank, against the minimum of the
scheme: every chunk all-gathered once (its parameters, compute dtype) and its gradients
reduce-scattered once (fp32), (N-1)/N of each per rank.

    .venv/bin/pytest bench/bench_distributed.py --benchmark-json=/tmp/dist.json
    HETEROMEM_BENCH_QUICK=1 .venv/bin/pytest bench/bench_distributed.py --benchmark-disable -q

Each case starts N gloo ranks on this machine (device="cpu"), trains a GPT for a few steps
and reads every rank's `hm.report` after the first step (warm-up: tracing, first gathers)
and after the last. Two device budgets: "fits" (every chunk stays on the device between
uses, so a chunk is gathered once per step: after the update) and "paged" (the budget holds
a fraction of the parameters, so chunks evicted after forward are gathered again for
backward). extra_info holds, per rank, bytes per step, the minimum and their ratio, and the
wall time per step; the pytest-benchmark time is the whole run, process start included.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import quick_mode, scratch_dir

HERE = Path(__file__).resolve()


def _model_config() -> dict:
    if quick_mode():
        return dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    return dict(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=256)


def _launch(world: int, budget: str, out: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(HERE), budget, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for rank, (proc, text) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            raise RuntimeError(f"rank {rank} failed:\n{text[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("budget", ["fits", "paged"])
@pytest.mark.parametrize("world", [2] if quick_mode() else [2, 3])
def test_bytes_per_step_against_the_minimum(benchmark, world, budget):
    out = scratch_dir(f"dist-{world}-{budget}")
    benchmark.group = "distributed-bytes"
    ranks = benchmark.pedantic(_launch, args=(world, budget, out), rounds=1, iterations=1)
    for r in ranks:
        assert r["bytes_per_step"] >= r["minimum"] > 0  # the minimum is a floor by definition
    benchmark.extra_info.update(
        world=world, budget=budget, params=ranks[0]["params"],
        per_rank=[{k: r[k] for k in ("rank", "bytes_per_step", "minimum", "ratio",
                                     "seconds_per_step")} for r in ranks])


# ---------------------------------------------------------------- one rank (run as a script)

def _rank_main(budget: str, out: Path) -> None:
    import torch.distributed as dist

    import heteromem as hm
    from heteromem.models import GPT, GPTConfig

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = GPTConfig(**_model_config())
    model = GPT(cfg)
    params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    chunk_mb = largest * 2 * 1.01 / 2**20
    # "paged": 40% of the bf16 parameters, plus the room reserved to reduce one chunk's
    # gradients in fp32 (about two bf16 chunks).
    device_memory = None if budget == "fits" else int(params * 2 * 0.4 + largest * 2 * 4)
    model, opt = hm.wrap(model, device="cpu", dtype=torch.bfloat16, chunk_mb=chunk_mb,
                         device_memory=device_memory, lr=1e-3)
    chunks = model._heteromem.manager.chunks
    # The scheme's floor: each chunk gathered once (compute dtype) and reduced once (fp32).
    minimum = sum(c.used * (2 + 4) for c in chunks) * (world - 1) // world
    steps = 2 if quick_mode() else 5
    gen = torch.Generator().manual_seed(rank)
    data = torch.randint(0, cfg.vocab_size, (steps + 1, 2, cfg.block_size + 1), generator=gen)

    def step(i: int) -> None:
        loss = model(data[i, :, :-1], data[i, :, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()

    step(0)  # warm-up: the first iteration traces the order of use
    before = hm.report(model)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    seconds = (time.perf_counter() - start) / steps
    after = hm.report(model)
    moved = (after.bytes_sent + after.bytes_received - before.bytes_sent
             - before.bytes_received) / 2 / steps  # sent and received are equal shares
    (out / f"rank{rank}.json").write_text(json.dumps(dict(
        rank=rank, params=params, bytes_per_step=moved, minimum=minimum,
        ratio=moved / minimum, seconds_per_step=seconds)))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(sys.argv[1], Path(sys.argv[2]))
