"""hm.wrap in fp32 must train exactly like plain PyTorch (DESIGN.md section 1: "fp32 keeps no
separate master copy and must match torch.optim.AdamW to float tolerance"), while the device
tier holds at most 40% of the parameters, so every step pages chunks in and out."""

from __future__ import annotations

import inspect
import threading

import pytest
import torch

import heteromem as hm
from heteromem.runtime import optimizer
from wrap_helpers import (assert_losses_close, assert_pages, assert_params_close, gpt_batches,
                          gpt_pair, paging_kwargs, param_bytes)

STEPS = 10


def _train(model, opt, batches, *, accum: int = 1, before_step=None,
           scheduler=None) -> list[float]:
    """`len(batches) // accum` optimizer steps of `accum` micro-batches each; returns the mean
    loss of every step. `before_step` runs between the last backward and step() (the
    reference clips there; heteromem clips through wrap's max_grad_norm)."""
    losses = []
    for start in range(0, len(batches), accum):
        total = 0.0
        for idx, tgt in batches[start:start + accum]:
            loss = model(idx, tgt) / accum
            loss.backward()
            total += loss.item()
        if before_step is not None:
            before_step()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(total)
    return losses


@pytest.mark.parametrize("checkpoint,reentrant", [(False, False), (True, False), (True, True)],
                         ids=["no-checkpoint", "checkpoint", "checkpoint-reentrant"])
def test_fp32_matches_adamw_under_a_tight_budget(checkpoint, reentrant):
    cfg, ref, model = gpt_pair(checkpoint=checkpoint, checkpoint_reentrant=reentrant)
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32,
                         **paging_kwargs(ref, 4))
    assert_pages(model, param_bytes(ref, 4))
    batches = gpt_batches(cfg, STEPS)
    assert_losses_close(_train(model, opt, batches), _train(ref, ropt, batches))
    assert_params_close(model.state_dict(), ref.state_dict())
    report = hm.report(model)
    assert report.bytes_h2d > 0 and report.bytes_d2h > 0  # it did page


@pytest.mark.parametrize("checkpoint", [False, True], ids=["no-checkpoint", "checkpoint"])
def test_prefetching_ahead_with_eviction_matches_adamw(checkpoint):
    """Prefetching (on by default on CUDA) runs here on the CPU tier: chunks copied ahead of
    their use, evicting chunks needed later than them, with clipping and accumulation; the
    numbers are torch's and the budget holds."""
    cfg, ref, model = gpt_pair(checkpoint=checkpoint)
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, max_grad_norm=0.05,
                         **paging_kwargs(ref, 4))
    manager = model._heteromem.manager
    manager.prefetch_depth = 2
    ahead = []
    make_resident, prefetch = manager._make_resident, manager._prefetch

    def counting_prefetch() -> None:
        def counted(chunk):
            ahead.append(chunk.index)
            make_resident(chunk)
        manager._make_resident = counted
        try:
            prefetch()
        finally:
            manager._make_resident = make_resident
    manager._prefetch = counting_prefetch
    batches = gpt_batches(cfg, 8)
    clip = lambda: torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)  # noqa: E731
    want = _train(ref, ropt, batches, accum=2, before_step=clip)
    assert_losses_close(_train(model, opt, batches, accum=2), want)
    assert_params_close(model.state_dict(), ref.state_dict())
    assert len(ahead) > 10  # it did prefetch, iteration after iteration
    report = hm.report(model)
    assert report.tiers["device"].peak_bytes <= report.tiers["device"].budget_bytes


def test_step_then_zero_grad_leaves_the_updates_running_for_the_next_forward(monkeypatch):
    """`opt.step(); opt.zero_grad()` returns while the Adam updates still run on the worker
    (the next forward waits per chunk, so they overlap it); the numbers stay torch's."""
    cfg, ref, model = gpt_pair()
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, **paging_kwargs(ref, 4))
    manager = model._heteromem.manager
    gate = threading.Event()
    update = optimizer.update_chunk

    def gated(*args) -> None:  # updates wait until the test has looked
        if not gate.wait(timeout=60):
            raise TimeoutError("test gate never opened")
        update(*args)
    monkeypatch.setattr(optimizer, "update_chunk", gated)
    batches = gpt_batches(cfg, 4)
    losses = []
    for idx, tgt in batches:
        loss = model(idx, tgt)
        loss.backward()
        losses.append(loss.item())
        gate.clear()
        opt.step()
        returned = threading.Event()
        zero = threading.Thread(target=lambda: (opt.zero_grad(), returned.set()))
        zero.start()
        waited = not returned.wait(timeout=10)
        pending = sum(1 for c in manager.chunks if c.update is not None and not c.update.done())
        gate.set()
        zero.join()
        assert not waited, "zero_grad() waited for the optimizer updates"
        assert pending > 0
    assert_losses_close(losses, _train(ref, ropt, batches))
    opt.synchronize()
    assert_params_close(model.state_dict(), ref.state_dict())


@pytest.mark.parametrize("reentrant", [False, True], ids=["checkpoint", "checkpoint-reentrant"])
def test_fp32_clipping_accumulation_and_lr_schedule_match_torch(reentrant):
    """max_grad_norm == clip_grad_norm_, gradients summed over 3 micro-batches as .grad would
    be, and an LR scheduler driving the returned optimizer like a torch one."""
    cfg, ref, model = gpt_pair(checkpoint=True, checkpoint_reentrant=reentrant)
    max_norm = 0.05
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, max_grad_norm=max_norm,
                         **paging_kwargs(ref, 4))
    assert_pages(model, param_bytes(ref, 4))
    assert isinstance(opt, torch.optim.Optimizer)

    def warmup_then_decay(step: int) -> float:
        return min(1.0, (step + 1) / 3) * 0.8 ** max(0, step - 3)

    rsched = torch.optim.lr_scheduler.LambdaLR(ropt, warmup_then_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_decay)

    norms = []  # the reference's norms tell whether clipping actually changed anything

    def clip() -> None:
        norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item())

    batches = gpt_batches(cfg, 3 * 6)
    want = _train(ref, ropt, batches, accum=3, before_step=clip, scheduler=rsched)
    got = _train(model, opt, batches, accum=3, scheduler=sched)
    assert sum(n > max_norm for n in norms) >= len(norms) // 2, norms
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ropt.param_groups]
    assert_losses_close(got, want)
    assert_params_close(model.state_dict(), ref.state_dict())


def test_one_cycle_schedule_cycling_lr_and_betas_matches_torch():
    """OneCycleLR also cycles betas[0] in param_groups: every hyper-parameter is read at
    step()."""
    cfg, ref, model = gpt_pair()
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, **paging_kwargs(ref, 4))
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=8)
              for o in (ropt, opt)]
    batches = gpt_batches(cfg, 8)
    want = _train(ref, ropt, batches, scheduler=scheds[0])
    got = _train(model, opt, batches, scheduler=scheds[1])
    assert opt.param_groups[0]["betas"] == ropt.param_groups[0]["betas"] != (0.9, 0.999)
    assert_losses_close(got, want)
    assert_params_close(model.state_dict(), ref.state_dict())


def _two_groups(model: torch.nn.Module) -> list[dict]:
    """The usual split: decay for matrices, none for biases and LayerNorm weights."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0, lr=1e-3)]


def test_two_param_groups_are_taken_over_from_adamw():
    cfg, ref, model = gpt_pair()
    ropt = torch.optim.AdamW(_two_groups(ref), lr=3e-3, betas=(0.8, 0.95), eps=1e-6)
    opt = torch.optim.AdamW(_two_groups(model), lr=3e-3, betas=(0.8, 0.95), eps=1e-6)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, **paging_kwargs(ref, 4))
    assert_pages(model, param_bytes(ref, 4))
    assert len(opt.param_groups) == 2
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(3e-3, 0.1), (1e-3, 0.0)]
    batches = gpt_batches(cfg, STEPS)
    assert_losses_close(_train(model, opt, batches), _train(ref, ropt, batches))
    assert_params_close(model.state_dict(), ref.state_dict())


def test_changing_a_group_lr_between_steps_takes_effect():
    """Hyper-parameters are read at step(), as torch's optimizers do (manual schedules)."""
    cfg, ref, model = gpt_pair()
    ropt = torch.optim.AdamW(_two_groups(ref), lr=3e-3)
    opt = torch.optim.AdamW(_two_groups(model), lr=3e-3)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, **paging_kwargs(ref, 4))
    batches = gpt_batches(cfg, 6)
    want, got = _train(ref, ropt, batches[:3]), _train(model, opt, batches[:3])
    for o in (ropt, opt):
        o.param_groups[0]["lr"] = 1e-2
        o.param_groups[1]["weight_decay"] = 0.5
    want += _train(ref, ropt, batches[3:])
    got += _train(model, opt, batches[3:])
    assert_losses_close(got, want)
    assert_params_close(model.state_dict(), ref.state_dict())


def test_adam_with_l2_weight_decay_matches_torch_adam():
    """torch.optim.Adam adds weight_decay * param to the gradient (L2, not decoupled)."""
    cfg, ref, model = gpt_pair()
    ropt = torch.optim.Adam(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, **paging_kwargs(ref, 4))
    assert_pages(model, param_bytes(ref, 4))
    batches = gpt_batches(cfg, STEPS)
    assert_losses_close(_train(model, opt, batches), _train(ref, ropt, batches))
    assert_params_close(model.state_dict(), ref.state_dict())
    # L2 and decoupled decay really differ at this weight decay, so the test tells them apart.
    _, other, _ = gpt_pair()
    wopt = torch.optim.AdamW(other.parameters(), lr=3e-3, weight_decay=0.1)
    _train(other, wopt, batches)
    with pytest.raises(AssertionError):
        assert_params_close(other.state_dict(), ref.state_dict())


def test_adam_with_decoupled_weight_decay_is_adamw():
    if "decoupled_weight_decay" not in inspect.signature(torch.optim.Adam).parameters:
        pytest.skip("this torch's Adam has no decoupled_weight_decay")
    cfg, ref, model = gpt_pair()
    ropt = torch.optim.Adam(ref.parameters(), lr=3e-3, weight_decay=0.1,
                            decoupled_weight_decay=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=0.1,
                           decoupled_weight_decay=True)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, **paging_kwargs(ref, 4))
    batches = gpt_batches(cfg, 5)
    assert_losses_close(_train(model, opt, batches), _train(ref, ropt, batches))
    assert_params_close(model.state_dict(), ref.state_dict())


def test_adam_kwargs_without_an_optimizer_match_adamw():
    cfg, ref, model = gpt_pair()
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, betas=(0.85, 0.99), weight_decay=0.05)
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=3e-3, betas=(0.85, 0.99),
                         weight_decay=0.05, **paging_kwargs(ref, 4))
    batches = gpt_batches(cfg, 5)
    assert_losses_close(_train(model, opt, batches), _train(ref, ropt, batches))
    assert_params_close(model.state_dict(), ref.state_dict())


@pytest.mark.parametrize("fraction", [2.0, None], ids=["some-states-on-device", "unbounded"])
def test_fp32_parity_with_optimizer_state_kept_on_the_device(fraction):
    """After the first iteration, chunks whose Adam state fits the budget are updated on the
    device and keep their gradients there; the others page as before. Both kinds together,
    through accumulation, clipping and a discarded batch, must still train like torch."""
    cfg, ref, model = gpt_pair()
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    kwargs = paging_kwargs(ref, 4, fraction or 1.0)
    if fraction is None:
        kwargs["device_memory"] = None
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, max_grad_norm=0.05,
                         **kwargs)
    batches = gpt_batches(cfg, 12)

    def run(m, o, clip) -> list[float]:
        losses = []
        for start in range(0, len(batches), 2):
            if start == 4:  # a batch whose gradients are thrown away
                m(*batches[start][::-1]).backward()
                o.zero_grad()
            losses += _train(m, o, batches[start:start + 2], accum=2, before_step=clip)
        return losses

    want = run(ref, ropt, lambda: torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05))
    got = run(model, opt, None)
    assert_losses_close(got, want)
    assert_params_close(model.state_dict(), ref.state_dict())
    report = hm.report(model)
    trainable_chunks = sum(1 for c in model._heteromem.manager.chunks if c.trainable)
    if fraction is None:
        assert report.state_chunks_on_device == trainable_chunks
    else:
        assert 0 < report.state_chunks_on_device < trainable_chunks
        assert report.tiers["device"].peak_bytes <= kwargs["device_memory"]
