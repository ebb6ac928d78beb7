"""`hm.unwrap`: the wrapped model back as an ordinary module with full CPU tensors, its trained
values kept, everything heteromem held released (even while the old optimizer lives)."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

import heteromem as hm
from heteromem.models import GPT, GPTConfig
from wrap_helpers import nvme_host_budget


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))


def _step(model, opt, dtype=torch.bfloat16) -> None:
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("nvme", [False, True])
def test_unwrap_gives_an_ordinary_module_with_the_trained_values(tmp_path, nvme):
    # (Chunks of a single matrix, so that the staging pool and cache are smaller than the
    # model's state and its chunks go to NVMe.)
    kwargs = dict(nvme_dir=str(tmp_path), dtype=torch.float32, chunk_mb=0.016,
                  **nvme_host_budget(_gpt(), torch.float32, 0.016, 0.0)) if nvme else {}
    model, opt = hm.wrap(_gpt(), device="cpu", lr=1e-2, device_memory="100KB",
                         **{"chunk_mb": 0.03, **kwargs})
    if nvme:
        assert hm.report(model).tiers["nvme"].current_bytes > 0
    _step(model, opt)
    trained = model.state_dict()
    held = [weakref.ref(t) for c in model._heteromem.manager.chunks
            for t in (c.host, *(c.states or {}).values()) if t is not None]
    assert held

    plain = hm.unwrap(model)
    assert plain is model and not hasattr(model, "_heteromem")
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.float32 and p.numel() > 0, name
        assert not hasattr(p, "_heteromem_slot")
    state = model.state_dict()  # torch's own again
    assert set(state) == set(trained)
    assert all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in trained.items())
    gc.collect()
    assert all(ref() is None for ref in held)  # released while `opt` still exists
    if nvme:
        assert os.listdir(tmp_path) == []
    with pytest.raises(hm.NotWrappedError, match="unwrapped by hm.unwrap"):
        opt.step()
    with pytest.raises(hm.NotWrappedError):
        hm.report(model)

    # A plain PyTorch model from here: fp32 inputs, torch's optimizer, or wrapped again.
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx).backward()
    torch_opt.step()
    model, opt = hm.wrap(model, device="cpu", lr=1e-3)
    _step(model, opt)


def test_unwrap_restores_buffer_dtypes_and_refuses_plain_models():
    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("scale", torch.full((4,), 0.5, dtype=torch.float64))

    model, _ = hm.wrap(WithBuffer(), device="cpu", dtype=torch.bfloat16)
    assert model.scale.dtype == torch.bfloat16
    model = hm.unwrap(model)
    assert model.scale.dtype == torch.float64 and model.scale.device.type == "cpu"
    with pytest.raises(hm.NotWrappedError, match="ordinary module already"):
        hm.unwrap(model)
