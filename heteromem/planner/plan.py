"""`hm.plan`: will this model train on this machine, where would each byte live, and how fast
could a step be at best. On paper: nothing is allocated, so it plans a 70B model on one 24 GB
GPU or 1T parameters on 8 GPUs as readily as a toy.

The placement follows what `hm.wrap` does: parameters (compute dtype) live in host chunks and
page through a device working set; the device memory left after the working set and the
activations holds optimizer states of whole chunks (updated on the GPU, no copies); the other
states stay on the host (CPU Adam) and what the host cannot hold goes to NVMe, as two copies
(the double-buffered files that keep a failed step harmless). With several GPUs the state is
sharded: each rank holds 1/N of it, and the host (one node) holds all ranks' shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from heteromem.distributed.shard import reduce_buffer_bytes
from heteromem.errors import format_bytes
from heteromem.memory.manager import PREFETCH_CHUNKS
from heteromem.memory.nvme import staging_bytes
from heteromem.memory.sizes import parse_size
from heteromem.planner.figures import GPUS, Figures, load_figures
from heteromem.planner.models import ModelSpec, describe_model
from heteromem.runtime.wrap import chunk_capacity

GiB = 2**30
CUDA_RESERVE = 1 * GiB                # CUDA context, cuBLAS workspace, allocator slack
ACT_PER_TOKEN_LAYER = 34              # bytes per token and hidden unit of one layer (bf16,
                                      # fused attention): the Megatron-LM activation count


@dataclass
class TierPlan:
    budget: int | None
    needed: int
    parts: dict[str, int] = field(default_factory=dict)


@dataclass
class Plan:
    """What `hm.plan` found. `fits` is False when a tier overflows: `overflow` names the
    first one (device, host, nvme) and by how many bytes."""

    model: ModelSpec
    gpus: int
    dtype: torch.dtype
    fits: bool
    overflow: tuple[str, int] | None
    tiers: dict[str, TierPlan]
    chunk_bytes: int
    working_chunks: int
    state_params: dict[str, int]       # parameters whose optimizer state is on each tier
    step_seconds: dict[str, float]     # lower bound of each resource's time per step
    bound: str                         # the resource that bounds the step
    figures: Figures
    notes: list[str] = field(default_factory=list)

    @property
    def step_time_lower_bound(self) -> float:
        return self.step_seconds[self.bound]

    def __str__(self) -> str:
        m = self.model
        lines = [f"model      {m.name}: {m.params / 1e9:.3f}B parameters, {self.gpus} GPU(s), "
                 f"{str(self.dtype).removeprefix('torch.')}",
                 "fits       " + ("yes" if self.fits else
                                  f"NO: the {self.overflow[0]} tier is short by "
                                  f"{format_bytes(self.overflow[1])}"),
                 f"chunks     {format_bytes(self.chunk_bytes)} each, {self.working_chunks} in the "
                 "device working set", f"{'tier':<10}{'budget':>14}{'needed':>14}  made of"]
        for name, t in self.tiers.items():
            budget = "unbounded" if t.budget is None else format_bytes(t.budget)
            parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in t.parts.items() if v)
            lines.append(f"{name:<10}{budget:>14}{format_bytes(t.needed):>14}  {parts}")
        share = ", ".join(f"{k} {v / 1e9:.3f}B" for k, v in self.state_params.items())
        lines.append(f"optimizer state of parameters: {share}")
        terms = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.step_seconds.items())
        lines.append(f"step time  >= {self.step_time_lower_bound * 1e3:.1f} ms "
                     f"(bound by {self.bound}; {terms})")
        lines.append(f"figures    {self.figures.source}")
        lines += [f"note       {n}" for n in self.notes]
        return "\n".join(lines)


def _activations(m: ModelSpec, batch: int, seq: int, checkpointing: bool) -> int | None:
    if m.hidden is None or m.layers is None:
        return None
    tokens = batch * seq
    layer = ACT_PER_TOKEN_LAYER * tokens * m.hidden
    kept = m.layers * (2 * tokens * m.hidden if checkpointing else layer)
    # The logits in bf16 plus their fp32 copy for the loss, and one layer being recomputed.
    logits = tokens * (m.vocab or 0) * 6
    return kept + (layer if checkpointing else 0) + logits


def plan(model: object = None, *, params: int | None = None, gpu: str | None = None,
         gpu_memory: object = None, host_memory: object = None, nvme: object = None,
         gpus: int = 1, dtype: torch.dtype = torch.bfloat16, seq_len: int = 2048,
         batch: int = 1, grad_accumulation: int = 1, checkpointing: bool = True,
         chunk_mb: float | None = None, figures: Figures | None = None) -> Plan:
    """Plans training `model` (preset name, transformers config or config.json path, torch
    module, or `params=N`) on `gpus` GPUs of `gpu_memory` each (or a named `gpu`), a host
    with `host_memory` and optionally `nvme` bytes of disk. Sizes are ints or strings
    ("24GiB"). `batch` is sequences per GPU per micro-batch."""
    m = describe_model(model, params=params)
    if gpu is not None:
        if gpu.lower() not in GPUS:
            raise ValueError(f"hm.plan: unknown gpu {gpu!r}; use one of {sorted(GPUS)} or gpu_memory=")
        gpu_mem_default, tflops = GPUS[gpu.lower()]
    else:
        gpu_mem_default, tflops = None, None
    gpu_mem = parse_size(gpu_memory, "gpu_memory") or gpu_mem_default
    if gpu_mem is None:
        raise ValueError("hm.plan: give gpu_memory= (e.g. '24GiB') or gpu= (e.g. 'h100')")
    host = parse_size(host_memory, "host_memory")
    if host is None:
        raise ValueError("hm.plan: give host_memory= (e.g. '512GiB')")
    disk = parse_size(nvme, "nvme")
    if isinstance(gpus, bool) or int(gpus) < 1:
        raise ValueError(f"hm.plan: gpus must be a positive count, got {gpus!r}")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"hm.plan: dtype {dtype} is not supported; use bf16, fp16 or fp32")
    fig = figures or load_figures()
    if tflops is not None and fig.source.startswith("defaults"):
        fig = Figures(**{**fig.__dict__, "gpu_tflops": tflops})
    elem = torch.empty((), dtype=dtype).element_size()
    notes: list[str] = []

    # Chunks and the device working set.
    # A given chunk_mb must hold the largest parameter in wrap too (it refuses otherwise).
    chunk_elems = max(chunk_capacity(m.params, m.largest, chunk_mb, elem), m.largest)
    chunk_bytes = chunk_elems * elem
    layer = (m.params - (m.vocab or 0) * (m.hidden or 0)) // m.layers if m.layers else m.largest
    working = math.ceil(max(layer, m.largest) / chunk_elems) + PREFETCH_CHUNKS + 1
    acts = _activations(m, batch, seq_len, checkpointing)
    if acts is None:
        acts = 0
        notes.append("activations not counted: the model's shape is unknown (give a config or "
                     "preset)")
    # Sharded (gpus > 1): reducing one chunk's gradients needs its fp32 sum and the rank's
    # part on the device (wrap reserves that room once).
    reduce = reduce_buffer_bytes(chunk_elems, gpus) if gpus > 1 else 0
    device_fixed = working * chunk_bytes + acts + CUDA_RESERVE + reduce

    # Optimizer state per parameter: fp32 master (the parameter itself in fp32), 2 moments.
    state_elem = 8 if dtype == torch.float32 else 12
    rank_params = math.ceil(m.params / gpus)
    left = max(0, gpu_mem - device_fixed)
    # A chunk keeping its state on the device also stays resident: its parameters count too.
    # Sharded, every rank's part of the states stays on the host (as hm.wrap does).
    on_device = min(rank_params, left // (state_elem + elem)) if left >= chunk_bytes else 0
    on_device = on_device // chunk_elems * chunk_elems if on_device < rank_params else on_device
    if gpus > 1:
        on_device = 0
        notes.append(f"sharded over {gpus} GPUs: each rank keeps its part of the parameters, "
                     "optimizer states and reduced fp32 gradients on the host")
    host_params = m.params * elem                       # every rank's parameter shard
    # fp32 gradients on the host: sharded, every rank's reduced part; else the accumulation
    # buffer when gradients accumulate.
    acc = m.params * 4 if grad_accumulation > 1 or gpus > 1 else 0
    host_room = host - host_params - acc
    states_left = (rank_params - on_device) * gpus
    # Each rank stages its shard of a chunk's three fp32 states per slot.
    staging = staging_bytes(math.ceil(chunk_elems / gpus)) * gpus
    on_host = min(states_left, max(0, host_room) // state_elem)
    on_nvme = states_left - on_host
    if on_nvme and disk is not None:
        on_host = min(states_left, max(0, host_room - staging) // state_elem)
        on_nvme = states_left - on_host
    tiers = {
        "device": TierPlan(gpu_mem, device_fixed + on_device * (state_elem + elem), dict(
            **{"working set": working * chunk_bytes, "activations": acts,
               "gradient reduction": reduce,
               "CUDA reserve": CUDA_RESERVE, "states kept on GPU": on_device * (state_elem + elem)})),
        "host": TierPlan(host, host_params + acc + on_host * state_elem +
                         (staging if on_nvme else 0), {
            "parameters": host_params, "fp32 gradients": acc, "optimizer states": on_host * state_elem,
            "NVMe staging": staging if on_nvme else 0}),
        "nvme": TierPlan(disk, on_nvme * state_elem * 2, {"optimizer states (2 copies)":
                                                          on_nvme * state_elem * 2}),
    }
    overflow = None
    if tiers["device"].needed - on_device * (state_elem + elem) > gpu_mem:
        overflow = ("device", device_fixed - gpu_mem)
        notes.append("the device cannot hold the working set and activations: lower batch or "
                     "seq_len, use activation checkpointing, or a smaller chunk_mb")
    elif host_params + acc > host:
        overflow = ("host", host_params + acc - host)
        notes.append("parameters stay in host memory (NVMe holds optimizer states only)")
    elif on_nvme and disk is None:
        overflow = ("host", on_nvme * state_elem - max(0, host_room - on_host * state_elem))
        notes.append("optimizer states do not fit host memory: give nvme= (disk for them)")
    elif on_nvme and tiers["nvme"].needed > disk:
        overflow = ("nvme", tiers["nvme"].needed - disk)

    # Step-time lower bound: every resource's time for one optimizer step (all micro-batches).
    tokens = batch * seq_len * grad_accumulation              # per GPU
    flops = (8 if checkpointing else 6) * m.params * tokens
    paged = rank_params - on_device                           # parameters paged per rank
    step = {
        "GPU compute": flops / (fig.gpu_tflops * 1e12),
        "host->GPU copies": 2 * paged * elem * grad_accumulation / (fig.h2d_gbps * 1e9),
        # Sharded, each rank sends home its fp32 part of the reduced gradients.
        "GPU->host copies": paged * (4 if gpus > 1 else elem) * grad_accumulation
        / (fig.d2h_gbps * 1e9),
        # Sharded: per rank and micro-batch, (N-1)/N of the parameters gathered for forward
        # and again for backward, and of the fp32 gradients reduce-scattered.
        "collectives": (gpus - 1) / gpus * m.params * (2 * elem + 4) * grad_accumulation
        / (fig.comm_gbps * 1e9),
        "CPU Adam": (on_host + on_nvme) / (fig.cpu_adam_gparams * 1e9),
        "NVMe": on_nvme * state_elem * (1 / (fig.nvme_read_gbps * 1e9)
                                        + 1 / (fig.nvme_write_gbps * 1e9)),
    }
    bound = max(step, key=step.get)
    return Plan(m, gpus, dtype, overflow is None, overflow, tiers, chunk_bytes, working,
                {"device": on_device * gpus, "host": on_host, "nvme": on_nvme}, step, bound,
                fig, notes)
