"""Where a taken-over heteromem.optim optimizer's state lives besides host chunks: checkpoints
(each kind resumes exactly; another optimizer's checkpoint is refused) and the NVMe tier
(8-bit codes and block scales in the chunk images give the same bits as without NVMe).

fp32 runs compare with the standalone optimizer bit for bit (test_wrap_optim.py says why they
can); bf16 runs compare with the same wrap without the tier under test."""

from __future__ import annotations

import json

import pytest
import torch

import heteromem as hm
from heteromem.optim import AGD, Adam8bit, AdamW8bit
from heteromem.runtime.checkpoint import layout
from wrap_helpers import (gpt_batches, gpt_pair, nvme_host_budget, paging_kwargs,
                          train_accumulating, train_steps)

OPTIMIZERS = [AGD, AdamW8bit, Adam8bit]
IDS = [c.__name__ for c in OPTIMIZERS]


def _optimizer(model: torch.nn.Module, cls: type) -> torch.optim.Optimizer:
    """`cls` over two param groups (matrices decay, the rest not)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return cls([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
               lr=1e-3 if cls is AGD else 3e-3)


def _wrapped(cls: type, seed: int, dtype: torch.dtype = torch.float32,
             fraction: float | None = 0.4, **overrides):
    """A paged tiny GPT whose weights are re-drawn from `seed`, wrapped with `cls`
    (`fraction`: the device budget as a share of the parameter bytes; None: no budget, so
    every chunk's state moves to the device tier)."""
    cfg, ref, model = gpt_pair()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    elem = torch.empty((), dtype=dtype).element_size()
    kwargs = paging_kwargs(ref, elem, fraction or 1.0)
    if fraction is None:
        kwargs["device_memory"] = None
    kwargs.update(overrides)
    model, opt = hm.wrap(model, _optimizer(model, cls), device="cpu", dtype=dtype, **kwargs)
    return cfg, model, opt


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _same_optimizer_state(got: dict, want: dict) -> None:
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys() and got["state"]
    for key, state in want["state"].items():
        assert got["state"][key].keys() == state.keys()
        for name, value in state.items():
            same = (torch.equal(got["state"][key][name], value)
                    if isinstance(value, torch.Tensor) else got["state"][key][name] == value)
            assert same, (key, name)


def _manifest(root) -> dict:
    version = layout.read_latest(str(root))["version"]
    return json.loads((root / version / layout.MANIFEST).read_text())


@pytest.mark.parametrize("dtype,fraction", [(torch.float32, 0.4), (torch.bfloat16, None)],
                         ids=["fp32-paged", "bf16-state-on-device"])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_checkpoint_resumes_exactly(tmp_path, cls, dtype, fraction):
    """Train 2 steps, save, train 3 (losses L); a model with another init, wrapped with the same
    optimizer, loads and trains 3: the same losses, parameters and optimizer state, bit for
    bit. The checkpoint records the kind and holds the optimizer's own regions (8-bit codes
    and per-256 scales as they are)."""
    cfg, model, opt = _wrapped(cls, 0, dtype, fraction)
    if fraction is None:
        assert hm.report(model).state_chunks_on_device == 0  # (placed after the 1st step)
    batches = gpt_batches(cfg, 5)
    train_steps(model, opt, batches[:2])
    if fraction is None:
        assert hm.report(model).state_chunks_on_device > 0
    root = tmp_path / "ckpt"
    hm.save_checkpoint(root, model, opt)
    want = train_steps(model, opt, batches[2:])

    manifest = _manifest(root)
    assert manifest["optimizer"]["kind"] == cls.__name__
    regions = {r["name"]: (r["dtype"], r["elements_per_item"])
               for r in manifest["chunks"][0]["regions"]}
    for region in cls.layout.state_regions:
        assert regions[region.name] == (str(region.dtype).removeprefix("torch."),
                                        region.elements_per_item)

    _, other, oopt = _wrapped(cls, 1, dtype, fraction)
    hm.load_checkpoint(root, other, oopt)
    assert train_steps(other, oopt, batches[2:]) == want
    _same_tensors(other.state_dict(), model.state_dict())
    _same_optimizer_state(oopt.state_dict(), opt.state_dict())


@pytest.mark.parametrize("saved,loading", [
    (torch.optim.AdamW, AGD),     # the same state layout (fp32 moments), another update rule
    (AGD, AdamW8bit),             # another layout
    (AdamW8bit, Adam8bit),        # the same 8-bit layout, decoupled or L2 weight decay
])
def test_a_checkpoint_of_another_optimizer_is_refused_with_nothing_changed(tmp_path, saved,
                                                                          loading):
    cfg, model, opt = _wrapped(saved, 0)
    batches = gpt_batches(cfg, 2)
    train_steps(model, opt, batches[:1])
    hm.save_checkpoint(tmp_path / "ckpt", model, opt)
    cfg, other, oopt = _wrapped(loading, 1)
    train_steps(other, oopt, batches[:1])
    params, state = other.state_dict(), oopt.state_dict()
    where = "torch.optim" if saved is torch.optim.AdamW else "heteromem.optim"
    with pytest.raises(hm.CheckpointError, match=(
            rf"holds the state of an {saved.__name__} optimizer \(state exp_avg .*\), but this "
            rf"model was wrapped with {loading.__name__} .*cannot continue as another's; wrap "
            rf"the model with {where}.{saved.__name__} to load it.*Nothing was loaded")):
        hm.load_checkpoint(tmp_path / "ckpt", other, oopt)
    _same_tensors(other.state_dict(), params)
    _same_optimizer_state(oopt.state_dict(), state)
    # Still trains as a model that never saw the checkpoint.
    assert all(torch.isfinite(torch.tensor(train_steps(other, oopt, batches[1:]))))


def _nvme_kwargs(ref: torch.nn.Module, tmp_path, cls: type, dtype: torch.dtype) -> dict:
    """Every chunk's parameters and optimizer state on NVMe: the host holds the staging pool
    (sized for `cls`'s state) and a small cache."""
    elem = torch.empty((), dtype=dtype).element_size()
    kwargs = paging_kwargs(ref, elem)
    kwargs.update(nvme_host_budget(ref, dtype, kwargs["chunk_mb"], 0.0, layout=cls.layout),
                  nvme_dir=str(tmp_path))
    return kwargs


def _on_nvme(model: torch.nn.Module) -> float:
    """The share of trainable elements whose state lives on NVMe."""
    chunks = [c for c in model._heteromem.manager.chunks if c.trainable]
    return sum(c.used for c in chunks if c.nvme is not None) / sum(c.used for c in chunks)


def _plain_kwargs(kwargs: dict) -> dict:
    """The same wrap without the NVMe tier (and without its host budget)."""
    return {k: v for k, v in kwargs.items() if k not in ("nvme_dir", "nvme_staging", "host_memory")}


def _state_through_a_checkpoint(tmp_path, model, opt, cls, dtype, kwargs) -> dict:
    """The optimizer state of a wrap with states on NVMe, seen through a checkpoint loaded
    into the same wrap without NVMe (opt.state_dict() itself refuses there: it would gather
    into host memory what `host_memory` could not hold, see optimizer_state.py)."""
    hm.save_checkpoint(tmp_path / "ckpt", model, opt)
    _, other, oopt = _wrapped(cls, 1, dtype, **_plain_kwargs(kwargs))
    hm.load_checkpoint(tmp_path / "ckpt", other, oopt)
    _same_tensors(other.state_dict(), model.state_dict())
    return oopt.state_dict()


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_states_on_nvme_equal_the_standalone_optimizer_bit_for_bit(tmp_path, cls):
    """fp32, (nearly) every chunk's parameters and state in files: 5 steps give the standalone
    optimizer's losses, parameters and state, bit for bit (the state read back through a
    checkpoint, which streams the images)."""
    cfg, ref, model = gpt_pair()
    ropt = _optimizer(ref, cls)
    (tmp_path / "nvme").mkdir()
    kwargs = _nvme_kwargs(ref, tmp_path / "nvme", cls, torch.float32)
    model, opt = hm.wrap(model, _optimizer(model, cls), device="cpu", dtype=torch.float32,
                         **kwargs)
    assert _on_nvme(model) >= 0.9
    batches = gpt_batches(cfg, 5)
    assert train_steps(model, opt, batches) == train_steps(ref, ropt, batches)
    _same_tensors(model.state_dict(), ref.state_dict())
    report = hm.report(model)
    assert report.nvme_chunks >= 3 and report.details["nvme written"] > 0
    assert report.tiers["host"].peak_bytes <= report.tiers["host"].budget_bytes
    with pytest.raises(hm.OutOfMemory, match="save it with hm.save_checkpoint"):
        opt.state_dict()
    _same_optimizer_state(
        _state_through_a_checkpoint(tmp_path, model, opt, cls, torch.float32, kwargs),
        ropt.state_dict())


def test_bf16_8bit_states_on_nvme_with_accumulation_equal_the_wrap_without_nvme(tmp_path):
    """bf16 AdamW8bit with gradient accumulation: the NVMe run equals the same wrap without
    NVMe bit for bit (losses, parameters, and the state through a checkpoint)."""
    cfg, ref, model = gpt_pair()
    (tmp_path / "nvme").mkdir()
    kwargs = _nvme_kwargs(ref, tmp_path / "nvme", AdamW8bit, torch.bfloat16)
    model, opt = hm.wrap(model, _optimizer(model, AdamW8bit), device="cpu",
                         dtype=torch.bfloat16, **kwargs)
    assert _on_nvme(model) >= 0.9
    plain, popt = hm.wrap(ref, _optimizer(ref, AdamW8bit), device="cpu", dtype=torch.bfloat16,
                          **_plain_kwargs(kwargs))

    batches = gpt_batches(cfg, 4, batch=4)
    assert train_accumulating(model, opt, batches) == train_accumulating(plain, popt, batches)
    _same_tensors(model.state_dict(), plain.state_dict())
    _same_optimizer_state(
        _state_through_a_checkpoint(tmp_path, model, opt, AdamW8bit, torch.bfloat16, kwargs),
        popt.state_dict())
