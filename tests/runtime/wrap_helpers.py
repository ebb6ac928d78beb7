"""Shared by the hm.wrap tests: tiny models, a device budget that forces paging, and parity
checks against plain PyTorch.

Every parity test runs on device="cpu": the device tier is then a budgeted CPU working set, so
the chunk manager, hooks, eviction and pipelined optimizer run exactly as on a GPU, without one.
"""

from __future__ import annotations

import copy

import torch

import heteromem as hm
from heteromem.models import GPT, GPTConfig
from heteromem.optim import FP32_MOMENTS, StateLayout

# Parity runs give the device tier at most this fraction of the parameter bytes, so most
# chunks live on the host at any time and every step pages.
BUDGET_FRACTION = 0.4
MIN_CHUNKS = 4
TOL = 1e-5


def gpt_pair(**overrides) -> tuple[GPTConfig, GPT, GPT]:
    """A tiny GPT (tied embeddings) and an identical copy: (config, reference, to_wrap).

    Four layers, because with tied embeddings the lm_head chunk stays pinned through backward
    (its weight's gradient completes only at the embedding), so the budget must hold that
    chunk plus the largest module's; with fewer layers 40% of the parameters is too tight.
    """
    torch.manual_seed(0)
    cfg = GPTConfig(**{**dict(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32),
                       **overrides})
    ref = GPT(cfg)
    return cfg, ref, copy.deepcopy(ref)


def param_bytes(model: torch.nn.Module, element_size: int) -> int:
    """Bytes of the model's parameters (tied ones once) at `element_size` bytes each."""
    return sum(p.numel() for p in model.parameters()) * element_size


def paging_kwargs(model: torch.nn.Module, element_size: int,
                  fraction: float = BUDGET_FRACTION) -> dict:
    """hm.wrap sizes that force paging: chunks just above the largest parameter (so the model
    splits into many chunks) and a device budget of `fraction` of the parameter bytes."""
    largest = max(p.numel() for p in model.parameters()) * element_size
    return dict(device_memory=int(param_bytes(model, element_size) * fraction),
                chunk_mb=largest * 1.01 / 2**20)


def assert_pages(model: torch.nn.Module, total_param_bytes: int,
                 fraction: float = BUDGET_FRACTION) -> None:
    """The wrapped model really is split and budgeted as the parity tests claim."""
    report = hm.report(model)
    budget = report.tiers["device"].budget_bytes
    assert budget is not None and budget <= fraction * total_param_bytes
    assert report.chunks >= MIN_CHUNKS


def gpt_batches(cfg: GPTConfig, count: int, seed: int = 1, batch: int = 2) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        data = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=gen)
        out.append((data[:, :-1], data[:, 1:]))
    return out


def assert_losses_close(ours: list[float], ref: list[float], tol: float = TOL) -> None:
    assert len(ours) == len(ref)
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert abs(a - b) <= tol * abs(b), f"step {step}: loss {a} vs reference {b}"


# Attention biases whose middle third (the key bias) has a zero true gradient: softmax over
# keys is invariant to adding the same value to every score of a query, which is all a key
# bias does. Its computed gradient is pure rounding noise, and Adam normalises noise into
# full-size steps, so that slice differs between any two correct implementations (DESIGN.md,
# "Parity tests"). Only that slice is left out; the query and value thirds are compared.
KEY_BIAS_SUFFIXES = ("qkv.bias", "c_attn.bias")


def _without_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    if name.endswith(KEY_BIAS_SUFFIXES):
        n = t.shape[0] // 3
        return torch.cat([t[:n], t[2 * n:]])
    return t


def assert_params_close(got: dict, ref: dict, tol: float = TOL, skip: tuple[str, ...] = ()) -> None:
    """Per-tensor relative Frobenius error of every floating-point state-dict entry."""
    assert set(got) == set(ref), set(got) ^ set(ref)
    checked = 0
    for name, want in ref.items():
        if not want.is_floating_point() or name in skip:
            continue
        have = got[name]
        assert have.shape == want.shape and have.dtype == want.dtype, name
        have, want = _without_key_bias(name, have).double(), _without_key_bias(name, want).double()
        denom = want.norm().item()
        err = (have - want).norm().item() / (denom if denom > 0 else 1.0)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"
        checked += 1
    assert checked > 0


def lm_batches(vocab: int, count: int, seed: int, shape: tuple[int, int] = (2, 16)
               ) -> list[torch.Tensor]:
    """`count` batches of token ids for a transformers causal LM (inputs and labels)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, shape, generator=gen) for _ in range(count)]


def train_lm(model, opt, batches) -> list[float]:
    """One step per batch of token ids on a transformers causal LM (labels = inputs);
    returns the losses."""
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def train_accumulating(model, opt, batches, accumulate: int = 2) -> list[float]:
    """One step per (idx, tgt) batch, its rows split into `accumulate` micro-batches whose
    gradients add up (each loss divided by `accumulate`); returns each step's summed loss."""
    losses = []
    for idx, tgt in batches:
        total = 0.0
        for part in range(accumulate):
            rows = slice(part * idx.shape[0] // accumulate, (part + 1) * idx.shape[0] // accumulate)
            loss = model(idx[rows], tgt[rows]) / accumulate
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def train_steps(model, opt, batches, scheduler=None) -> list[float]:
    """One forward/backward/step per (idx, tgt) batch; returns the losses."""
    losses = []
    for idx, tgt in batches:
        loss = model(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def nvme_host_budget(model: torch.nn.Module, dtype: torch.dtype, chunk_mb: float,
                     resident_fraction: float, staging_slots: int = 2, at_once: int = 2,
                     layout: StateLayout = FP32_MOMENTS) -> dict:
    """host_memory and nvme_staging for `hm.wrap(..., nvme_dir=...)` such that about
    `resident_fraction` of the model's chunks stay on the host and the rest go to NVMe: the
    staging pool, a host cache for `at_once` chunks (as many as one module of the test models
    pins: a Linear's weight and bias), and that
    fraction of what the chunks need on the host (parameters, the optimizer's states as
    `layout` describes them, accumulation room)."""
    from heteromem.memory.host_plan import cache_floor
    from heteromem.memory.layout import slot_align
    from heteromem.memory.nvme import staging_bytes

    elem = torch.empty((), dtype=dtype).element_size()
    capacity = int(chunk_mb * 2**20) // elem
    staging = staging_bytes(capacity, staging_slots, dtype, layout)
    n = sum(p.numel() for p in model.parameters())
    per_param = elem + layout.bytes_per_param(master=dtype != torch.float32) + 4
    padding = len(list(model.parameters())) * slot_align(layout) * per_param
    resident = int(resident_fraction * (n * per_param + padding))
    return dict(host_memory=staging + cache_floor(capacity, dtype, at_once) + resident,
                nvme_staging=staging)
