"""`hm.plan`: will this model train on this machine, where would each byte live, and how fast
could a step be at best. On paper: nothing is allocated, so it plans a 70B model on one 24 GB
GPU or 1T parameters on 8 GPUs as readily as a toy.

The placement follows what `hm.wrap` does: chunks page through a device working set; the
device memory left after the working set and the activations holds optimizer states of whole
chunks (updated on the GPU, no copies); the other chunks stay on the host (parameters, states,
room to accumulate gradients; the optimizer's CPU step) and what the host cannot hold goes to
NVMe whole, one copy plus a few spare slots, while the host keeps a staging pool and a cache
for them. The optimizer (`optimizer=`) sets the bytes of state per parameter: 12 for Adam,
AdamW and AGD (fp32 master and two fp32 moments; 8 in fp32, where the parameter is the
master), 6.03 for AdamW8bit and Adam8bit (8-bit moments and a scale per 256). Frozen
parameters (LoRA: `lora_rank`, or `trainable`) have no gradients or states. With several GPUs
the state is sharded: each rank holds 1/N of it, and the host (one node) holds all ranks'
shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from heteromem.distributed.shard import reduce_buffer_bytes
from heteromem.errors import format_bytes
from heteromem.memory.host_plan import cache_floor
from heteromem.memory.manager import PREFETCH_CHUNKS
from heteromem.memory.nvme import staging_bytes
from heteromem.memory.sizes import parse_size
from heteromem.planner.figures import GPUS, Figures, load_figures
from heteromem.planner.models import ModelSpec, describe_model
from heteromem.runtime.optimizer_kind import KINDS, OptimizerKind
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
    trainable_params: int | None = None  # (the rest frozen: LoRA, trainable=)
    optimizer: str = "AdamW"             # the optimizer kind planned for (as wrap names it)
    # Bytes of optimizer state per trainable parameter on the host or NVMe: the fp32 master
    # and the optimizer's regions (in fp32 the parameter is the master and is not counted).
    state_bytes_per_param: float = 12.0

    @property
    def step_time_lower_bound(self) -> float:
        return self.step_seconds[self.bound]

    def __str__(self) -> str:
        m = self.model
        lines = [f"model      {m.name}: {m.params / 1e9:.3f}B parameters, {self.gpus} GPU(s), "
                 f"{str(self.dtype).removeprefix('torch.')}, {self.optimizer} "
                 f"({self.state_bytes_per_param:.4g} bytes of state a parameter)",
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
         chunk_mb: float | None = None, figures: Figures | None = None,
         trainable: float | None = None, lora_rank: int | None = None,
         optimizer: str = "adamw") -> Plan:
    """Plans training `model` (preset name, transformers config or config.json path, torch
    module, or `params=N`) on `gpus` GPUs of `gpu_memory` each (or a named `gpu`), a host
    with `host_memory` and optionally `nvme` bytes of disk. Sizes are ints or strings
    ("24GiB"). `batch` is sequences per GPU per micro-batch. `trainable` (a fraction) or
    `lora_rank` (adapters on every linear layer) plan fine-tuning with the rest frozen.
    `optimizer` names the optimizer hm.wrap would take over ("adam", "adamw", "agd",
    "adamw8bit", "adam8bit"; any case): its state's bytes per parameter."""
    kind = optimizer_kind(optimizer)
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

    # Trainable and frozen parameters (LoRA: the adapters train, the base model is frozen).
    train, frozen, total = _trainable(m, trainable, lora_rank)
    # Optimizer state per trainable parameter: fp32 master (the parameter itself in fp32) and
    # the optimizer's regions (2 fp32 moments; 8-bit codes and block scales); host-resident
    # chunks keep room to accumulate their fp32 gradients. On the device a chunk's master is
    # a copy of its own even in fp32 (its parameters are paged apart).
    state_elem = kind.layout.bytes_per_param(master=dtype != torch.float32)
    device_state_elem = kind.layout.bytes_per_param()
    rank_train = math.ceil(train / gpus)
    left = max(0, gpu_mem - device_fixed)
    # A chunk keeping its state on the device also stays resident: its parameters count too.
    # Sharded, every rank's part of the states stays on the host (as hm.wrap does).
    on_device = (min(rank_train, int(left // (device_state_elem + elem)))
                 if left >= chunk_bytes else 0)
    on_device = on_device // chunk_elems * chunk_elems if on_device < rank_train else on_device
    if gpus > 1:
        on_device = 0
        notes.append(f"sharded over {gpus} GPUs: each rank keeps its part of the parameters, "
                     "optimizer states and reduced fp32 gradients on the host")
    off_device = train - on_device * gpus            # trainable parameters updated on the CPU
    rank_chunk = math.ceil(chunk_elems / gpus)
    # On the host for the whole run: every chunk's parameters, trainable chunks' states and
    # accumulation room (sharded: the reduced fp32 part; whole-chunk sums only briefly).
    per_train = elem + state_elem + 4
    # (A chunk whose states went to the device keeps its parameters' host buffer too.)
    kept_params = on_device * gpus * elem
    resident_all = math.ceil(off_device * per_train) + frozen * elem
    transient = (working + 1) * chunk_elems * 4 * gpus if gpus > 1 else 0
    staging = staging_bytes(rank_chunk, 4, dtype, kind.layout) * gpus
    cache = cache_floor(rank_chunk, dtype, working) * gpus
    on_host_fraction = frozen_on_host = 1.0
    nvme_fixed = 0
    spare_slots = math.ceil(4 * chunk_elems * (elem + state_elem))
    train_bytes = math.ceil(off_device * per_train)
    frozen_staging = staging_bytes(rank_chunk, 2, dtype, trainable=False)
    frozen_cache = (working + 1) * rank_chunk * elem
    if resident_all + transient + kept_params > host and disk is not None:
        if (gpus == 1 and frozen
                and train_bytes + frozen_staging + frozen_cache + kept_params <= host):
            # As hm.wrap plans a frozen base (LoRA): every trainable chunk stays on the host
            # and only frozen chunks go to NVMe, with staging and a cache for their values.
            staging, cache = frozen_staging, frozen_cache
            nvme_fixed = staging + cache
            room = host - nvme_fixed - kept_params - train_bytes
            frozen_on_host = max(0.0, min(1.0, room / (frozen * elem)))
            spare_slots = 2 * chunk_elems * elem
        else:
            # What does not fit goes to NVMe whole (parameters and states); the host keeps a
            # staging pool and a cache of those chunks' values and gradients.
            nvme_fixed = staging + cache
            room = host - nvme_fixed - transient - kept_params
            on_host_fraction = max(0.0, min(1.0, room / resident_all)) if resident_all else 1.0
            frozen_on_host = on_host_fraction
    # Rounded up: the host keeps at most its share, so a plan that fits never needs more host
    # memory than it has, not even by the bytes of a rounded fraction.
    nvme_train = math.ceil(off_device * (1 - on_host_fraction))
    nvme_frozen = math.ceil(frozen * (1 - frozen_on_host))
    host_train, host_frozen = off_device - nvme_train, frozen - nvme_frozen
    image = math.ceil(nvme_train * (elem + state_elem)) + nvme_frozen * elem
    spares = spare_slots if image else 0
    on_device_bytes = math.ceil(on_device * (device_state_elem + elem))
    host_states = math.ceil(host_train * state_elem)
    tiers = {
        "device": TierPlan(gpu_mem, device_fixed + on_device_bytes, dict(
            **{"working set": working * chunk_bytes, "activations": acts,
               "gradient reduction": reduce,
               "CUDA reserve": CUDA_RESERVE, "states kept on GPU": on_device_bytes})),
        "host": TierPlan(host, host_train * (elem + 4) + host_states + host_frozen * elem
                         + transient + kept_params + (nvme_fixed if image else 0), {
            "parameters": (host_train + host_frozen) * elem + kept_params,
            "optimizer states": host_states,
            "fp32 gradients": host_train * 4 + transient,
            "NVMe staging": staging if image else 0,
            "host cache of NVMe chunks": max(0, host - host_train * (elem + 4) - host_states
                                             - host_frozen * elem - transient - kept_params
                                             - staging)
            if image else 0}),
        "nvme": TierPlan(disk, image + spares, {"parameters and optimizer states (one copy)": image,
                                                "spare slots": spares}),
    }
    overflow = None
    if tiers["device"].needed - on_device_bytes > gpu_mem:
        overflow = ("device", device_fixed - gpu_mem)
        notes.append("the device cannot hold the working set and activations: lower batch or "
                     "seq_len, use activation checkpointing, or a smaller chunk_mb")
    elif disk is None and resident_all + transient + kept_params > host:
        overflow = ("host", resident_all + transient + kept_params - host)
        notes.append("the chunks do not fit host memory: give nvme= (disk for the chunks that "
                     "do not fit)")
    elif image and nvme_fixed + transient + kept_params > host:
        overflow = ("host", nvme_fixed + transient + kept_params - host)
        notes.append("with NVMe the host still holds a staging pool and a cache of a few "
                     "chunks: raise host_memory or lower chunk_mb")
    elif image and tiers["nvme"].needed > disk:
        overflow = ("nvme", tiers["nvme"].needed - disk)

    # Step-time lower bound: every resource's time for one optimizer step (all micro-batches).
    tokens = batch * seq_len * grad_accumulation              # per GPU
    flops = (8 if checkpointing else 6) * total * tokens
    paged = math.ceil(total / gpus) - on_device               # parameters paged per rank
    paged_train = rank_train - on_device
    # NVMe: chunks there are read for forward and backward of every micro-batch (their values
    # fall out of the small host cache between), their gradients written and read once, their
    # states read and their new images written once per step.
    nvme_read = ((nvme_train + nvme_frozen) * elem * 2 * grad_accumulation
                 + nvme_train * (elem + state_elem))
    nvme_write = nvme_train * (elem + elem + state_elem)
    # NOTE: one calibrated CPU rate, Adam's (plan --calibrate measures only it), for every
    # optimizer: AGD measured within 5% of Adam's time, the 8-bit step at 0.96-1.19x Adam's
    # speed on 2 cores (docs/optim.md), so Adam's rate is the honest figure we have.
    cpu_step = "CPU Adam" if kind.name in ("Adam", "AdamW") else f"CPU {kind.name}"
    step = {
        "GPU compute": flops / (fig.gpu_tflops * 1e12),
        "host->GPU copies": 2 * paged * elem * grad_accumulation / (fig.h2d_gbps * 1e9),
        # Sharded, each rank sends home its fp32 part of the reduced gradients.
        "GPU->host copies": paged_train * (4 if gpus > 1 else elem) * grad_accumulation
        / (fig.d2h_gbps * 1e9),
        # Sharded: per rank and micro-batch, (N-1)/N of the parameters gathered for forward
        # and again for backward, and of the fp32 gradients reduce-scattered.
        "collectives": (gpus - 1) / gpus * (total * 2 * elem + train * 4) * grad_accumulation
        / (fig.comm_gbps * 1e9),
        cpu_step: off_device / (fig.cpu_adam_gparams * 1e9),
        "NVMe": nvme_read / (fig.nvme_read_gbps * 1e9) + nvme_write / (fig.nvme_write_gbps * 1e9),
    }
    if frozen:
        notes.append(f"{frozen / 1e9:.3f}B frozen parameters (no gradients, no optimizer state), "
                     f"{train / 1e9:.3f}B trainable")
    bound = max(step, key=step.get)
    if cpu_step != "CPU Adam":
        notes.append(f"the {kind.name} CPU step is taken at the calibrated Adam rate")
    return Plan(m, gpus, dtype, overflow is None, overflow, tiers, chunk_bytes, working,
                {"device": on_device * gpus, "host": host_train, "nvme": nvme_train}, step,
                bound, fig, notes, trainable_params=train, optimizer=kind.name,
                state_bytes_per_param=state_elem)


def optimizer_kind(name: object) -> OptimizerKind:
    """The optimizer kind `name` names ("adamw", "AdamW8bit", ...: any case)."""
    by_lower = {k.lower(): v for k, v in KINDS.items()}
    if not isinstance(name, str) or name.lower() not in by_lower:
        raise ValueError(f"hm.plan: unknown optimizer {name!r}; use one of "
                         f"{sorted(by_lower)}")
    return by_lower[name.lower()]


def _trainable(m: ModelSpec, trainable: float | None, lora_rank: int | None
               ) -> tuple[int, int, int]:
    """(trainable, frozen, total) parameters."""
    if trainable is not None and lora_rank is not None:
        raise ValueError("hm.plan: give trainable= or lora_rank=, not both")
    if lora_rank is not None:
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"hm.plan: lora_rank must be a positive int, got {lora_rank!r}")
        adapters = m.lora_params(lora_rank)
        return adapters, m.params, m.params + adapters
    if trainable is not None:
        if isinstance(trainable, bool) or not isinstance(trainable, (int, float)) or not (
                0 < trainable <= 1):
            raise ValueError(f"hm.plan: trainable must be the trainable fraction of the "
                             f"parameters, in (0, 1], got {trainable!r}")
        train = max(1, round(m.params * trainable))
        return train, m.params - train, m.params
    return m.params, 0, m.params
