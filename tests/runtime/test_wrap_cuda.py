"""hm.wrap on a CUDA device (marker `cuda`): the copy stream, events, pinned host buffers and
prefetching must give the same numbers as plain PyTorch, within the device budget."""

from __future__ import annotations

import copy

import pytest
import torch

import heteromem as hm
from heteromem.models import GPT, GPTConfig

pytestmark = pytest.mark.cuda


def _models(checkpoint: bool):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128,
                    checkpoint=checkpoint)
    ref = GPT(cfg)
    return cfg, ref, copy.deepcopy(ref)


def _param_bytes(model: torch.nn.Module, elem: int) -> int:
    return sum(p.numel() for p in model.parameters()) * elem


def _train_both(cfg, ref, ropt, model, opt, seed: int, steps: int = 10) -> list[tuple[float, float]]:
    """Trains the reference and the wrapped model on the same batches; (ours, ref) losses."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        data = torch.randint(0, cfg.vocab_size, (4, cfg.block_size + 1), generator=gen).cuda()
        pair = []
        for m, o in ((model, opt), (ref, ropt)):
            loss = m(data[:, :-1], data[:, 1:])
            loss.backward()
            o.step()
            o.zero_grad()
            pair.append(loss.item())
        losses.append((pair[0], pair[1]))
    return losses


@pytest.mark.parametrize("checkpoint", [False, True])
def test_fp32_parity_on_cuda(checkpoint):
    cfg, ref, model = _models(checkpoint)
    budget = int(_param_bytes(ref, 4) * 0.4)
    ref = ref.cuda()
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    largest_mb = max(p.numel() for p in model.parameters()) * 4 / 2**20
    model, opt = hm.wrap(model, opt, device="cuda", dtype=torch.float32, device_memory=budget,
                         chunk_mb=largest_mb * 1.01)
    assert len(model._heteromem.manager.chunks) >= 4
    for ours, expect in _train_both(cfg, ref, ropt, model, opt, seed=1):
        assert abs(ours - expect) <= 1e-5 * abs(expect)
    report = hm.report(model)
    assert report.tiers["device"].peak_bytes <= budget
    assert report.bytes_h2d > 0 and report.bytes_d2h > 0
    got = model.state_dict()
    for name, value in ref.state_dict().items():
        if name.endswith("qkv.bias"):
            # The key third of the attention bias has a zero true gradient: rounding noise,
            # amplified by Adam, differs between any two correct implementations.
            n = value.numel() // 3
            value, other = torch.cat([value[:n], value[2 * n:]]), torch.cat([got[name][:n], got[name][2 * n:]])
        else:
            other = got[name]
        err = ((other.cuda().float() - value.float()).norm() / value.float().norm()).item()
        assert err <= 1e-5, (name, err)


def test_bf16_tracks_fp32_on_cuda():
    cfg, ref, model = _models(False)
    ref = ref.cuda()
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    budget = int(_param_bytes(model, 2) * 0.4)
    largest_mb = max(p.numel() for p in model.parameters()) * 2 / 2**20
    model, opt = hm.wrap(model, lr=1e-3, device="cuda", device_memory=budget,
                         chunk_mb=largest_mb * 1.01)
    losses = _train_both(cfg, ref, ropt, model, opt, seed=2)
    assert all(abs(a - b) <= 0.05 * b for a, b in losses), losses
    assert hm.report(model).tiers["device"].peak_bytes <= budget


@pytest.mark.parametrize("fraction", [0.4, 6.0], ids=["paged", "states-on-device"])
def test_step_in_backward_is_bit_identical_on_cuda(fraction):
    """Updates queued from the backward hooks (the copy home waited for on the worker, or GPU
    Adam on the backward's stream) give exactly the numbers of updating after backward."""
    cfg, _, model = _models(True)
    other = copy.deepcopy(model)
    largest_mb = max(p.numel() for p in model.parameters()) * 2 / 2**20
    kwargs = dict(lr=1e-3, device="cuda", device_memory=int(_param_bytes(model, 2) * fraction),
                  chunk_mb=largest_mb * 1.01)
    early, eopt = hm.wrap(model, step_in_backward=True, **kwargs)
    late, lopt = hm.wrap(other, **kwargs)
    losses = _train_both(cfg, late, lopt, early, eopt, seed=3)
    assert all(a == b for a, b in losses), losses
    for (name, a), (_, b) in zip(early.state_dict().items(), late.state_dict().items()):
        assert torch.equal(a, b), name
    assert eopt.in_backward.chunks_updated > 0
    if fraction > 1:
        assert any(c.states_on_device for c in early._heteromem.manager.chunks)
