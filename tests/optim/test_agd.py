"""heteromem.optim.AGD: against a float64 reference written from the paper's rule (30 steps,
the floor binding for part of the elements in part of the steps), param groups and LR
schedulers, state_dict round trips, errors, CUDA."""

from __future__ import annotations

import io

import pytest
import torch

from agd_paper import agd_paper, gradients
from heteromem.optim import AGD

LR, BETAS, DELTA, WD = 1e-2, (0.9, 0.99), 1e-3, 0.05


def test_matches_the_paper_rule_over_30_steps_with_the_floor_binding():
    n, steps = 10_000, 30
    param = torch.nn.Parameter(torch.randn(n))
    start = param.detach().clone()
    grads = gradients(n, steps)
    opt = AGD([param], lr=LR, betas=BETAS, delta=DELTA, weight_decay=WD)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expect, floored = agd_paper(start, grads, lr=LR, betas=BETAS, delta=DELTA, weight_decay=WD)
    err = ((param.detach().double() - expect).norm() / (expect - start.double()).norm()).item()
    assert err < 1e-5, err
    share = torch.stack(floored).double().mean().item()
    assert 0.1 < share < 0.9, f"the floor bound {share:.0%} of the updates"
    # Per element too: off by no more than float32 rounding of the values (16 ulps over 30
    # steps) and 1e-4 of the element's own movement.
    moved = (expect - start.double()).abs()
    bound = 1e-4 * moved + 2e-6 * expect.abs()
    assert ((param.detach().double() - expect).abs() <= bound).all()


def test_param_groups_and_lr_scheduler():
    """Each group steps with its own hyper-parameters, and a scheduler's lr is the one used."""
    a, b = torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(500))
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = AGD([{"params": [a]}, {"params": [b], "delta": 1e-1, "weight_decay": 0.1}], lr=LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ga, gb = gradients(300, 5, seed=1), gradients(500, 5, seed=2)
    for t in range(5):
        a.grad, b.grad = ga[t].clone(), gb[t].clone()
        opt.step()
        sched.step()
    # The paper reference cannot change lr mid-run; replay with the op and the schedule.
    from heteromem import ops
    for p0, grads, delta, wd, got in ((a0, ga, 1e-5, 0.0, a), (b0, gb, 1e-1, 0.1, b)):
        p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
        for t in range(5):
            ops.agd_step_(p, grads[t], m, v, step=t + 1, lr=LR * 0.5 ** (t // 2), delta=delta,
                          weight_decay=wd)
        assert torch.equal(got.detach(), p)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 20, generator=gen)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def test_state_dict_round_trip_is_exact():
    """Save after 5 steps, load into a fresh optimizer of a copy of the model, train both 5
    more steps on the same data: the parameters agree bit for bit."""
    model = make_model()
    opt = AGD(model.parameters(), lr=LR, weight_decay=WD)
    train(model, opt, 5, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    copy = make_model()
    copy.load_state_dict(saved["model"])
    copy_opt = AGD(copy.parameters(), lr=1.0)  # the hyper-parameters come from the state dict
    copy_opt.load_state_dict(saved["opt"])
    train(model, opt, 5, seed=2)
    train(copy, copy_opt, 5, seed=2)
    for p, q in zip(model.parameters(), copy.parameters()):
        assert torch.equal(p, q)


def test_load_refuses_another_optimizers_state():
    model = make_model()
    adamw = torch.optim.AdamW(model.parameters())
    train(model, adamw, 1, seed=0)
    opt = AGD(model.parameters())
    train(model, opt, 1, seed=0)
    before = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()
              if torch.is_tensor(v)}
    # AdamW's state has AGD's keys (its exp_avg_sq means something else): refused on its step.
    with pytest.raises(ValueError, match="parameter 0: step must be an int.*another optimizer"):
        opt.load_state_dict(adamw.state_dict())
    after = opt.state[next(model.parameters())]
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("kwargs,exc,fragment", [
    (dict(lr=-1.0), ValueError, "AGD: lr must be finite and >= 0"),
    (dict(betas=(1.0, 0.999)), ValueError, r"AGD: betas\[0\] must be"),
    (dict(delta=-1e-5), ValueError, "AGD: delta must be finite and >= 0"),
    (dict(weight_decay=float("nan")), ValueError, "AGD: weight_decay must be finite"),
])
def test_bad_hyper_parameter_is_named(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        AGD([torch.nn.Parameter(torch.zeros(3))], **kwargs)
    opt = AGD([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(exc, match=fragment):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], **kwargs})


def test_low_precision_parameter_is_refused_with_advice():
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    p.grad = torch.ones(8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="parameter 0 of param group 0 is bfloat16.*hm.wrap"):
        AGD([p]).step()


def test_closure_loss_is_returned():
    p = torch.nn.Parameter(torch.ones(4))
    opt = AGD([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss
    assert opt.step(closure).item() == 4.0
    assert (p < 1).all()


@pytest.mark.cuda
def test_cuda_parameters_match_cpu_bit_for_bit():
    cpu, gpu = make_model(), make_model().cuda()
    opt_cpu, opt_gpu = AGD(cpu.parameters(), lr=LR), AGD(gpu.parameters(), lr=LR)
    for t, g in enumerate(gradients(sum(p.numel() for p in cpu.parameters()), 10)):
        offset = 0
        for p, q in zip(cpu.parameters(), gpu.parameters()):
            p.grad = g[offset:offset + p.numel()].view_as(p).clone()
            q.grad = p.grad.cuda()
            offset += p.numel()
        opt_cpu.step()
        opt_gpu.step()
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        assert torch.equal(p, q.cpu())
