"""hm.wrap(..., step_in_backward=True): chunk updates start during backward, and the numbers
are exactly those of updating after it. Each test checks that updates really did start
before opt.step() (`chunks_updated`), so a silent fallback to the ordinary step would fail."""

from __future__ import annotations

import copy

import pytest
import torch

import heteromem as hm
from heteromem import StepInBackwardError
from wrap_helpers import (assert_losses_close, assert_pages, assert_params_close, gpt_batches,
                          gpt_pair, nvme_host_budget, paging_kwargs, param_bytes, train_steps)

STEPS = 10


def _wrapped_pair(model, dtype, **kwargs):
    """The same model wrapped twice with the same arguments: updating in backward or not."""
    other = copy.deepcopy(model)
    early = hm.wrap(model, device="cpu", dtype=dtype, step_in_backward=True, **kwargs)
    late = hm.wrap(other, device="cpu", dtype=dtype, **kwargs)
    return early, late


def _updated_in_backward(opt) -> int:
    return opt.in_backward.chunks_updated


@pytest.mark.parametrize("checkpoint,reentrant", [(False, False), (True, False), (True, True)],
                         ids=["no-checkpoint", "checkpoint", "checkpoint-reentrant"])
def test_fp32_matches_adamw_and_updates_start_in_backward(checkpoint, reentrant):
    cfg, ref, model = gpt_pair(checkpoint=checkpoint, checkpoint_reentrant=reentrant)
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, step_in_backward=True,
                         **paging_kwargs(ref, 4))
    assert_pages(model, param_bytes(ref, 4))
    batches = gpt_batches(cfg, STEPS)
    assert_losses_close(train_steps(model, opt, batches), train_steps(ref, ropt, batches))
    assert_params_close(model.state_dict(), ref.state_dict())
    chunks = sum(1 for c in model._heteromem.manager.chunks if c.trainable)
    # From the second step on (the first sets the expectation), the chunks completed before
    # the backward's end: all but those holding the tied embedding at least.
    assert _updated_in_backward(opt) >= (STEPS - 1) * (chunks // 2)
    report = hm.report(model)
    assert report.tiers["device"].peak_bytes <= report.tiers["device"].budget_bytes


def test_bf16_with_an_lr_schedule_is_bit_identical_to_updating_after_backward():
    cfg, _, model = gpt_pair(checkpoint=True)
    (m1, o1), (m2, o2) = _wrapped_pair(model, torch.bfloat16, lr=3e-3,
                                       **paging_kwargs(model, 2))
    m1._heteromem.manager.prefetch_depth = 2  # prefetch as on CUDA, racing the updates
    s1 = torch.optim.lr_scheduler.LambdaLR(o1, lambda step: 0.7 ** step)
    s2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda step: 0.7 ** step)
    batches = gpt_batches(cfg, STEPS)
    assert train_steps(m1, o1, batches, s1) == train_steps(m2, o2, batches, s2)
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), name
    assert _updated_in_backward(o1) > 0
    assert o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"]


def test_optimizer_state_on_the_device_updates_in_backward_too():
    """Chunks promoted to device-resident states (a generous budget) take the device path."""
    cfg, ref, model = gpt_pair()
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=3e-3,
                         step_in_backward=True, **paging_kwargs(ref, 4, fraction=6.0))
    batches = gpt_batches(cfg, 6)
    assert_losses_close(train_steps(model, opt, batches), train_steps(ref, ropt, batches))
    assert_params_close(model.state_dict(), ref.state_dict())
    assert any(c.states_on_device for c in model._heteromem.manager.chunks)
    assert _updated_in_backward(opt) > 0


class _Gated(torch.nn.Module):
    """Two branches, one of which is skipped on some steps (as a mixture-of-experts layer
    skips an expert): its chunk gets no gradient then, and must wait for opt.step()."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if use_b:
            h = h + torch.tanh(self.b(h))
        return self.head(h).pow(2).mean()


def test_parameters_skipped_on_some_steps_match_torch():
    torch.manual_seed(0)
    ref = _Gated()
    model = copy.deepcopy(ref)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=1e-2,
                         step_in_backward=True, chunk_mb=16 * 17 * 4 / 2**20)
    gen = torch.Generator().manual_seed(3)
    pattern = [True, True, False, True, False, False, True, True]
    for use_b in pattern:
        x = torch.randn(8, 16, generator=gen)
        for m, o in ((ref, ropt), (model, opt)):
            m(x, use_b).backward()
            o.step()
            o.zero_grad()
    assert_params_close(model.state_dict(), ref.state_dict())
    assert _updated_in_backward(opt) > 0


def test_a_second_backward_before_step_is_refused_and_training_goes_on():
    cfg, ref, model = gpt_pair()
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=1e-3,
                         step_in_backward=True, **paging_kwargs(ref, 4))
    (i1, t1), (i2, t2), (i3, t3) = gpt_batches(cfg, 3)
    model(i1, t1).backward()
    opt.step()
    model(i2, t2).backward()  # now updates start in backward
    assert _updated_in_backward(opt) > 0
    with pytest.raises(StepInBackwardError, match="after this step's updates had begun"):
        model(i3, t3)
    with torch.no_grad():
        model(i3, t3)  # evaluation between backward and step is fine
    opt.step()
    opt.zero_grad()
    loss = model(i3, t3)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


class _FailOnce(torch.autograd.Function):
    """Identity whose backward raises while `armed`: an error in the middle of a backward."""

    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if _FailOnce.armed:
            raise RuntimeError("backward failed on purpose")
        return grad


def test_a_backward_that_fails_midway_can_be_dropped_and_training_goes_on():
    """Chunks after the failure point were updated whole; zero_grad() drops the gradients
    the others had gathered, so they keep exactly their values from before."""
    cfg, ref, model = gpt_pair()
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=1e-3,
                         step_in_backward=True, **paging_kwargs(ref, 4))
    model.blocks[1].register_forward_hook(lambda module, args, out: _FailOnce.apply(out))
    batches = gpt_batches(cfg, 5)
    train_steps(model, opt, batches[:2])
    before = model.state_dict()
    updated = _updated_in_backward(opt)
    _FailOnce.armed = True
    try:
        loss = model(*batches[2])
        with pytest.raises(RuntimeError, match="on purpose"):
            loss.backward()
    finally:
        _FailOnce.armed = False
    assert _updated_in_backward(opt) > updated  # the last blocks' chunks were updated
    with pytest.raises(StepInBackwardError, match="zero_grad"):
        model(*batches[3])
    opt.zero_grad()
    after = model.state_dict()
    first = [n for n in before if n.startswith(("wte", "wpe", "blocks.0."))]
    assert first and all(torch.equal(before[n], after[n]) for n in first)
    assert any(not torch.equal(before[n], after[n]) for n in before if "blocks.3." in n)
    losses = train_steps(model, opt, batches[3:])
    assert all(torch.isfinite(torch.tensor(losses)))


def test_zero_grad_after_updates_began_is_refused():
    cfg, ref, model = gpt_pair()
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=1e-3,
                         step_in_backward=True, **paging_kwargs(ref, 4))
    (i1, t1), (i2, t2) = gpt_batches(cfg, 2)
    model(i1, t1).backward()
    opt.zero_grad()  # nothing was updated yet (the first step sets the expectation): allowed
    model(i1, t1).backward()
    opt.step()
    model(i2, t2).backward()
    with pytest.raises(StepInBackwardError, match="cannot be taken back"):
        opt.zero_grad()
    opt.step()
    opt.zero_grad()


class _Shared(torch.nn.Module):
    """One linear layer applied in `uses` reentrant checkpoint segments: its parameters get
    one gradient per segment."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 8)
        self.shared = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, uses: int) -> torch.Tensor:
        h = self.inp(x)
        for _ in range(uses):
            h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.shared(t)), h,
                                                  use_reentrant=True)
        return h.pow(2).mean()


def test_more_gradients_than_the_step_before_fail_loudly_not_silently():
    torch.manual_seed(0)
    model = _Shared()
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=1e-3,
                         step_in_backward=True, chunk_mb=8 * 9 * 4 / 2**20)
    x = torch.randn(4, 8)
    for _ in range(2):
        model(x, 1).backward()
        opt.step()
        opt.zero_grad()
    with pytest.raises(StepInBackwardError, match="shared.*after its chunk was already updated"):
        model(x, 2).backward()
    opt.zero_grad()  # drops the rest of that step; the chunk updated keeps its update
    updated = _updated_in_backward(opt)
    for _ in range(3):  # two segments from now on: one step in opt.step(), then in backward
        loss = model(x, 2)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss) and _updated_in_backward(opt) > updated


def test_bad_combinations_are_refused_naming_the_argument():
    _, ref, _ = gpt_pair()
    with pytest.raises(TypeError, match="step_in_backward"):
        hm.wrap(copy.deepcopy(ref), device="cpu", step_in_backward="yes")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunks_on_nvme_update_in_backward_bit_identical(tmp_path, dtype):
    """Chunks whose parameters and states live on NVMe are read, updated, written and
    committed on the worker during backward: the same numbers as updating them in
    opt.step()."""
    cfg, ref, model = gpt_pair()
    elem = torch.empty((), dtype=dtype).element_size()
    kwargs = paging_kwargs(ref, elem)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    budget = nvme_host_budget(ref, dtype, kwargs["chunk_mb"], 0.0)
    m1, o1 = hm.wrap(model, device="cpu", dtype=dtype, lr=3e-3, step_in_backward=True,
                     nvme_dir=str(tmp_path / "a"), **budget, **kwargs)
    m2, o2 = hm.wrap(copy.deepcopy(ref), device="cpu", dtype=dtype, lr=3e-3,
                     nvme_dir=str(tmp_path / "b"), **budget, **kwargs)
    manager = m1._heteromem.manager
    assert sum(1 for c in manager.chunks if c.nvme is not None) >= 2
    batches = gpt_batches(cfg, STEPS)
    assert train_steps(m1, o1, batches) == train_steps(m2, o2, batches)
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), name
    assert _updated_in_backward(o1) > 0
    # Updated as they complete, fewer gradients wait in the host cache for the step, so fewer
    # are written to disk when it is full.
    assert manager.cache.bytes_spilled < m2._heteromem.manager.cache.bytes_spilled


class _Reversed(torch.nn.Module):
    """Layers registered in the reverse of the order they run: the first iteration's trace
    re-packs the chunks (new chunk and slot objects) before the second step."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            x = torch.tanh(layer(x))
        return x.pow(2).mean()


def test_counts_survive_the_first_iteration_re_pack():
    torch.manual_seed(0)
    model = _Reversed()
    kwargs = dict(lr=1e-2, chunk_mb=16 * 17 * 4 * 1.01 / 2**20, device_memory=3 * 16 * 17 * 4 * 1.01)
    (m1, o1), (m2, o2) = _wrapped_pair(model, torch.float32, **kwargs)
    before = list(m1._heteromem.manager.chunks)
    gen = torch.Generator().manual_seed(5)
    for step in range(6):
        x = torch.randn(4, 16, generator=gen)
        for m, o in ((m1, o1), (m2, o2)):
            loss = m(x)
            if step == 1 and m is m1:
                # Re-packed at this forward's start: no count may name a chunk or slot that
                # is gone (a recycled id would let an incomplete chunk be updated).
                live = {id(c) for c in m1._heteromem.manager.chunks}
                live |= {id(s) for c in m1._heteromem.manager.chunks for s in c.slots}
                counts = o1.in_backward
                assert set(counts._remaining) | set(counts._expected) <= live
            loss.backward()
            o.step()
            o.zero_grad()
    assert not any(c is d for c, d in zip(before, m1._heteromem.manager.chunks))  # re-packed
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), name
    assert _updated_in_backward(o1) > 0
