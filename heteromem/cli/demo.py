"""``python -m heteromem demo``: the README's main job.

Trains a GPT-style model written in this package (no downloads) whose training state is
several times the device budget, on a synthetic but learnable token stream, and shows the
loss falling, tokens/s and the memory report, and draws the memory timeline of the last
iteration (`--plot`, default memory.png). Defaults finish in about a minute on a 2-core
CPU machine; on a GPU pass --device cuda and larger sizes.

Under torchrun (`torchrun --nproc-per-node 2 -m heteromem demo`) every rank trains its own
batches of the same model, sharded over the ranks (gloo on CPU, NCCL on GPUs); rank 0 prints
the mean loss over the ranks and its report.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import heteromem as hm
from heteromem.distributed.shard import reduce_buffer_bytes, shardable_capacity
from heteromem.errors import format_bytes
from heteromem.memory.host_plan import cache_floor
from heteromem.memory.nvme import staging_bytes
from heteromem.models import GPT, GPTConfig
from heteromem.runtime.wrap import chunk_capacity

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The fewest chunks the device budget holds, whatever --budget-fraction says (see run()).
MIN_DEVICE_CHUNKS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks (default 6)")
    parser.add_argument("--width", type=int, default=256, help="embedding width (default 256)")
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary size (default 512)")
    parser.add_argument("--seq", type=int, default=64, help="sequence length (default 64)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--budget-fraction", type=float, default=0.5,
                        help="device budget as a fraction of the parameters' bytes (default 0.5)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="compute dtype")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--nvme-dir", default=None,
                        help="keep the training state in files under this directory, with a "
                             "host budget of a few chunks (a staging pool and a host cache)")
    parser.add_argument("--step-in-backward", action="store_true",
                        help="start the optimizer updates during backward (hm.wrap's "
                             "step_in_backward; no gradient clipping then, bf16 or fp32)")
    parser.add_argument("--plot", default="memory.png", metavar="PATH",
                        help="draw the memory timeline of the last iteration here (default "
                             "memory.png in the current directory; needs matplotlib)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the memory timeline")


def synthetic_batch(batch: int, seq: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Arithmetic sequences modulo vocab with a random start and stride: easy to learn, so
    the loss visibly falls within a minute, and nothing to download."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    stride = torch.randint(1, 8, (batch, 1), generator=gen)
    return (start + stride * torch.arange(seq + 1)) % vocab


def _start_distributed(device: str | None) -> tuple[int, int, str | None]:
    """(rank, world size, device) under torchrun; (0, 1, device) otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device or "cpu"


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=_cpu_group())
    return t.item() / world


_CPU_GROUP = []


def _cpu_group():
    """A gloo group for the loss printout (NCCL would need a device tensor)."""
    import torch.distributed as dist

    if not _CPU_GROUP:
        _CPU_GROUP.append(dist.new_group(backend="gloo"))
    return _CPU_GROUP[0]


def _check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags, or None."""
    for name in ("layers", "width", "vocab", "seq", "batch", "steps"):
        if getattr(args, name) <= 0:
            return f"--{name} must be > 0, got {getattr(args, name)}"
    if not 0 < args.budget_fraction <= 1:
        return f"--budget-fraction must be in (0, 1], got {args.budget_fraction}"
    if args.step_in_backward and args.dtype == "fp16":
        return ("--step-in-backward needs --dtype bf16 or fp32 (loss scaling needs every "
                "gradient before any update)")
    return None


def run(args: argparse.Namespace) -> int:
    problem = _check_args(args)
    if problem is not None:
        print(f"python -m heteromem demo: {problem}", file=sys.stderr)
        return 2
    dtype = _DTYPES[args.dtype]
    rank, world, args.device = _start_distributed(args.device)
    if world > 1:
        _cpu_group()  # created by every rank, in the same order, before wrap's own groups
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.layers,
                    n_head=max(1, args.width // 64), n_embd=args.width, checkpoint=True)
    model = GPT(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    elem = torch.empty((), dtype=dtype).element_size()
    state_bytes = n_params * (elem + (8 if dtype == torch.float32 else 12))
    param_bytes = n_params * elem
    chunk_mb = max(p.numel() for p in model.parameters()) * 4 / 2**20 * 1.01
    capacity = chunk_capacity(n_params, 0, chunk_mb, elem)  # elements per chunk
    # NOTE: the end of the backward holds the tied token embedding's chunk and the position
    # embedding's at once, and the module running needs its own: a budget of fewer chunks
    # passes wrap's check (no single module needs more) yet runs out mid-step. Tiny models
    # (a few chunks in all) get this floor instead of the fraction.
    budget = max(int(param_bytes * args.budget_fraction),
                 MIN_DEVICE_CHUNKS * capacity * elem)
    if world > 1:
        # Sharded, the device also holds the room to reduce one chunk's gradients in fp32.
        budget += reduce_buffer_bytes(shardable_capacity(capacity, world), world)
    nvme = {}
    if args.nvme_dir is not None:
        # Host: the staging pool and a host cache a little larger than the fewest chunks a
        # step holds at once, so the training state lives on NVMe and pages through.
        nvme = dict(nvme_dir=args.nvme_dir, nvme_staging=staging_bytes(capacity, 2, dtype),
                    host_memory=staging_bytes(capacity, 2, dtype)
                    + cache_floor(capacity, dtype, 2 * MIN_DEVICE_CHUNKS))
    model, opt = hm.wrap(model, lr=args.lr, weight_decay=0.01, device=args.device, dtype=dtype,
                         device_memory=budget, chunk_mb=chunk_mb,
                         max_grad_norm=None if args.step_in_backward else 1.0,
                         step_in_backward=args.step_in_backward, **nvme)
    dev = model._heteromem.manager.device
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"heteromem demo: GPT with {n_params / 1e6:.1f}M parameters, training state "
          f"{format_bytes(state_bytes)} ({args.dtype} + fp32 master and Adam moments), device "
          f"budget {format_bytes(budget)} ({state_bytes / budget:.1f}x smaller, "
          + (f"and only {budget / param_bytes:.0%} of the parameters" if budget < param_bytes
             else f"{MIN_DEVICE_CHUNKS} chunks: the fewest a step holds at once")
          + f"), on {dev}"
          + (f", sharded over {world} ranks ({args.batch} sequences each)" if world > 1 else "")
          + (f"; host budget {format_bytes(nvme['host_memory'])} "
             f"({state_bytes / nvme['host_memory']:.1f}x smaller than the state), the rest on "
             f"NVMe under {args.nvme_dir}" if nvme else ""))
    gen = torch.Generator().manual_seed(1 + rank)
    first_loss = None
    tokens = 0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        data = synthetic_batch(args.batch, args.seq, args.vocab, gen).to(dev)
        loss = model(data[:, :-1], data[:, 1:])
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        value = _mean_over_ranks(loss.item(), world)
        first_loss = value if first_loss is None else first_loss
        tokens += args.batch * args.seq * world
        rate = tokens / (time.perf_counter() - start)
        bar = "#" * (30 * step // args.steps)
        if rank == 0 and (sys.stdout.isatty() or step % 10 == 0 or step == args.steps):
            sys.stdout.write(f"\r[{bar:<30}] step {step}/{args.steps}  loss {value:.3f}  "
                             f"{rate:,.0f} tokens/s" + ("\n" if not sys.stdout.isatty() else ""))
            sys.stdout.flush()
    say(f"\nloss {first_loss:.3f} -> {value:.3f} over {args.steps} steps\n")
    report = hm.report(model)
    say(report)
    if world > 1:
        import torch.distributed as dist

        dist.barrier(group=_cpu_group())
    if not args.no_plot and rank == 0:
        try:
            path = report.plot(args.plot, title=f"heteromem demo: memory over one iteration "
                               f"({args.device or dev.type}, {args.dtype}, budget "
                               f"{format_bytes(budget)})")
        except ImportError as exc:  # the demo's job is training; the plot is a bonus
            print(f"memory timeline not drawn: {exc}")
        else:
            print(f"memory timeline of the last iteration written to {os.path.abspath(path)}")
    return 0
