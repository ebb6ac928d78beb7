"""heteromem.optim.AdamW8bit / Adam8bit: the first step is torch's, training tracks fp32 AdamW,
the state is 8-bit (bytes counted), state_dict round trips exactly and refuses foreign state,
CUDA matches the CPU."""

from __future__ import annotations

import io

import pytest
import torch

from heteromem.optim import Adam8bit, AdamW8bit


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("ours,theirs", [(AdamW8bit, torch.optim.AdamW),
                                         (Adam8bit, torch.optim.Adam)])
def test_first_step_matches_torch(ours, theirs):
    """From the zero state nothing has been quantised yet: torch's update to float precision."""
    p = torch.nn.Parameter(torch.randn(10_000))
    q = torch.nn.Parameter(p.detach().clone())
    grad = torch.randn(10_000)
    a, b = ours([p], lr=1e-2, weight_decay=0.1), theirs([q], lr=1e-2, weight_decay=0.1)
    p.grad, q.grad = grad.clone(), grad.clone()
    a.step()
    b.step()
    assert rel_err(p.detach(), q.detach()) < 1e-6


def regression(steps: int, make_opt, seed: int = 0) -> tuple[list[float], torch.Tensor]:
    """A two-layer regression (a noisy teacher): losses and final weights."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 4))
    teacher = torch.nn.Linear(32, 4)
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 32, generator=gen)
        with torch.no_grad():
            y = teacher(x).tanh() + 0.01 * torch.randn(64, 4, generator=gen)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, torch.cat([p.detach().view(-1) for p in model.parameters()])


def test_training_tracks_fp32_adamw():
    steps = 300
    ref, ref_w = regression(steps, lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.01))
    got, got_w = regression(steps, lambda ps: AdamW8bit(ps, lr=3e-3, weight_decay=0.01))
    final_ref, final_got = sum(ref[-30:]) / 30, sum(got[-30:]) / 30
    assert final_ref < 0.2 * ref[0]  # the task is learnt
    assert abs(final_got - final_ref) <= 0.05 * final_ref, (final_got, final_ref)
    assert rel_err(got_w, ref_w) < 0.05


def test_state_is_8_bit():
    """2 bytes per parameter plus a scale per 256 (AdamW: 8), besides the fp32 parameter."""
    p = torch.nn.Parameter(torch.randn(1_000_000))
    p.grad = torch.randn(1_000_000)
    opt = AdamW8bit([p])
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for t in opt.state[p].values()
                      if torch.is_tensor(t))
    assert state_bytes == 2 * 1_000_000 + 2 * 4 * 3907
    assert AdamW8bit.layout.bytes_per_param() == 4 + 2 + 8 / 256


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 300), torch.nn.Tanh(), torch.nn.Linear(300, 1))


def train(model, opt, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 20, generator=gen)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("cls", [AdamW8bit, Adam8bit])
def test_state_dict_round_trip_is_exact(cls):
    model = make_model()
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.01)
    train(model, opt, 5, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    copy = make_model()
    copy.load_state_dict(saved["model"])
    copy_opt = cls(copy.parameters())
    copy_opt.load_state_dict(saved["opt"])
    state = copy_opt.state[next(copy.parameters())]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_scale"].dtype == torch.float32
    train(model, opt, 5, seed=2)
    train(copy, copy_opt, 5, seed=2)
    for p, q in zip(model.parameters(), copy.parameters()):
        assert torch.equal(p, q)


def test_load_refuses_fp32_adamw_state():
    model = make_model()
    adamw = torch.optim.AdamW(model.parameters())
    train(model, adamw, 1, seed=0)
    opt = AdamW8bit(model.parameters())
    with pytest.raises(ValueError, match=r"keys \['exp_avg', 'exp_avg_sq', 'step'\], expected "
                                         r".*was it saved by another optimizer"):
        opt.load_state_dict(adamw.state_dict())
    assert not opt.state


def test_load_refuses_a_state_of_the_wrong_size():
    small, big = torch.nn.Linear(10, 10), torch.nn.Linear(10, 30)
    a = AdamW8bit(small.parameters())
    small(torch.randn(2, 10)).sum().backward()
    a.step()
    b = AdamW8bit(big.parameters())
    with pytest.raises(ValueError, match="exp_avg is torch.uint8 with 100 elements, expected "
                                         "torch.uint8 with 300"):
        b.load_state_dict(a.state_dict())


def test_bad_hyper_parameter_is_named():
    with pytest.raises(ValueError, match="AdamW8bit: eps must be finite and >= 0"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))], eps=-1.0)
    with pytest.raises(TypeError, match="Adam8bit: lr must be a real number"):
        Adam8bit([torch.nn.Parameter(torch.zeros(3))], lr="0.1")


@pytest.mark.cuda
@pytest.mark.parametrize("cls", [AdamW8bit, Adam8bit])
def test_cuda_matches_cpu_bit_for_bit(cls):
    cpu, gpu = make_model(), make_model().cuda()
    opt_cpu, opt_gpu = cls(cpu.parameters(), lr=1e-2), cls(gpu.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        for p, q in zip(cpu.parameters(), gpu.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.cuda()
        opt_cpu.step()
        opt_gpu.step()
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        assert torch.equal(p, q.cpu())
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        for k, v in opt_cpu.state[p].items():
            if torch.is_tensor(v):
                assert torch.equal(v, opt_gpu.state[q][k].cpu())
