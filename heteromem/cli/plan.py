"""``python -m heteromem plan``: will a model train here, where would its state live, how fast
could a step be at best. Exit status 0 when it fits, 1 when a tier overflows."""

from __future__ import annotations

import argparse

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="a preset (e.g. llama-7b, llama-70b, dense-1t) or a transformers "
                             "config.json / model folder")
    parser.add_argument("--hf-config", default=None, help="a transformers config.json")
    parser.add_argument("--params", type=float, default=None,
                        help="a parameter count instead of a model (e.g. 7e9)")
    parser.add_argument("--gpu", default=None, help="a GPU by name (h100, a100-80gb, rtx4090, ...)")
    parser.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 24GiB")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (state is sharded across them)")
    parser.add_argument("--host-memory", default=None, help="host memory for heteromem, e.g. 512GiB")
    parser.add_argument("--nvme", default=None,
                        help="disk space for the chunks the host cannot hold, e.g. 4TiB")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1, help="sequences per GPU per micro-batch")
    parser.add_argument("--grad-accumulation", type=int, default=1)
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="plan without activation checkpointing")
    parser.add_argument("--chunk-mb", type=float, default=None)
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="fine-tune LoRA adapters of this rank on every linear layer, the "
                             "base model frozen")
    parser.add_argument("--trainable", type=float, default=None,
                        help="the trainable fraction of the parameters (the rest frozen)")
    # NOTE: the choices are the kinds hm.wrap takes over, so they cannot drift from it.
    from heteromem.runtime.optimizer_kind import KINDS

    parser.add_argument("--optimizer", default="adamw", type=str.lower,
                        choices=sorted(name.lower() for name in KINDS),
                        help="the optimizer hm.wrap would take over; it sets the bytes of "
                             "state per parameter (12 with the fp32 master for adam, adamw "
                             "and agd; 6.03 for adamw8bit and adam8bit)")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure this machine's figures (CPU Adam, copies, GPU, NVMe with "
                             "--nvme-dir) and store them for later plans")
    parser.add_argument("--nvme-dir", default=None, help="directory to measure NVMe speed in")


def run(args: argparse.Namespace) -> int:
    from heteromem.planner import calibrate, plan

    if args.calibrate:
        figures = calibrate(args.nvme_dir)
        print(f"stored: {figures}")
        if args.model is None and args.hf_config is None and args.params is None:
            return 0
    try:
        result = plan(args.hf_config or args.model,
                      params=int(args.params) if args.params is not None else None,
                      gpu=args.gpu, gpu_memory=args.gpu_memory, host_memory=args.host_memory,
                      nvme=args.nvme, gpus=args.gpus, dtype=_DTYPES[args.dtype],
                      seq_len=args.seq_len, batch=args.batch,
                      grad_accumulation=args.grad_accumulation,
                      checkpointing=not args.no_checkpointing, chunk_mb=args.chunk_mb,
                      trainable=args.trainable, lora_rank=args.lora_rank,
                      optimizer=args.optimizer)
    except (ValueError, TypeError) as exc:
        print(f"python -m heteromem plan: {exc}")
        return 2
    print(result)
    return 0 if result.fits else 1
