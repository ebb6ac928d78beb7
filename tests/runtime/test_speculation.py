"""step_in_backward=True with clipping and fp16: updates made during backward before the
global norm is known are kept when it does not clip, and put back and redone clipped when it
does, so training equals updating after the backward bit for bit either way; an fp16 overflow
undoes them and skips the step; zero_grad() after them drops the step exactly; accumulation
works, updates starting in the last micro-batch; a failure inside one puts it back."""

from __future__ import annotations

import copy

import pytest
import torch

import heteromem as hm
import heteromem.ops
from wrap_helpers import (assert_losses_close, assert_params_close, gpt_batches, gpt_pair,
                          paging_kwargs, train_steps)


def _pair(dtype, **kwargs):
    """The same model wrapped with and without step_in_backward, otherwise alike."""
    cfg, ref, model = gpt_pair()
    elem = torch.empty((), dtype=dtype).element_size()
    kw = dict(device="cpu", dtype=dtype, lr=3e-3, **paging_kwargs(ref, elem), **kwargs)
    early = hm.wrap(model, step_in_backward=True, **kw)
    late = hm.wrap(copy.deepcopy(ref), **kw)
    return cfg, ref, early, late


def _same(a, b) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def _stats(opt):
    return opt._speculation.stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clipping_that_fires_on_some_steps_equals_updating_after_backward(dtype):
    """max_grad_norm between the norms of the steps: some steps clip, some do not."""
    cfg, _, (m1, o1), (m2, o2) = _pair(dtype, max_grad_norm=1.07)
    batches = gpt_batches(cfg, 10)
    norms, fired = [], []
    for batch in batches:
        before = _stats(o1).redone
        assert train_steps(m1, o1, [batch]) == train_steps(m2, o2, [batch])
        assert o1.last_grad_norm == o2.last_grad_norm
        norms.append(o1.last_grad_norm)
        fired.append(_stats(o1).redone > before)
    _same(m1, m2)
    assert any(fired) and not all(fired[1:]), (norms, fired)  # (step 1 updates in step())
    report = hm.report(m1)
    assert report.speculative_updates > 0 and report.updates_redone == _stats(o1).redone
    assert "redone" in str(report)


def test_clipped_training_matches_torch_adamw():
    """The fp32 numbers are torch's: clip_grad_norm_ then AdamW, within 1e-5 over 10 steps."""
    cfg, ref, (m1, o1), _ = _pair(torch.float32, max_grad_norm=0.5)
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.01)
    batches = gpt_batches(cfg, 10)
    ours = train_steps(m1, o1, batches)
    want = []
    for idx, tgt in batches:
        loss = ref(idx, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ropt.step()
        ropt.zero_grad()
        want.append(loss.item())
    assert_losses_close(ours, want)
    assert_params_close(m1.state_dict(), ref.state_dict())
    assert _stats(o1).redone > 0  # 0.5 is below every norm here


def test_fp16_overflow_undoes_the_updates_made_in_backward_and_skips_the_step():
    cfg, _, (m1, o1), (m2, o2) = _pair(torch.float16)
    batches = gpt_batches(cfg, 6)
    for k, (idx, tgt) in enumerate(batches):
        for model, opt in ((m1, o1), (m2, o2)):
            loss = model(idx, tgt)
            if k == 3:
                loss = loss * float("inf")  # an overflowing step
            opt.backward(loss)
            opt.step()
            opt.zero_grad()
    assert o1.skipped_steps == o2.skipped_steps == 1
    assert o1.scaler.scale == o2.scaler.scale
    assert _stats(o1).undone > 0
    _same(m1, m2)


def test_zero_grad_after_updates_in_backward_drops_the_step_exactly():
    cfg, _, (m1, o1), _ = _pair(torch.bfloat16, max_grad_norm=1.0)
    batches = gpt_batches(cfg, 4)
    train_steps(m1, o1, batches[:2])
    before = {k: v.clone() for k, v in m1.state_dict().items()}
    m1(*batches[2]).backward()
    assert o1._speculation.snapshots  # updates began during this backward
    o1.zero_grad()  # put back, then dropped
    for k, v in m1.state_dict().items():
        assert torch.equal(v, before[k]), k
    train_steps(m1, o1, batches[3:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulation_starts_updates_in_the_last_micro_batch(dtype):
    cfg, _, (m1, o1), (m2, o2) = _pair(dtype, max_grad_norm=1.0)
    batches = gpt_batches(cfg, 6, batch=4)

    def step(model, opt, idx, tgt) -> float:
        total = 0.0
        for sl in (slice(0, 2), slice(2, 4)):
            loss = model(idx[sl], tgt[sl]) / 2
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        return total

    for idx, tgt in batches:
        updated = o1.in_backward.chunks_updated
        assert step(m1, o1, idx, tgt) == step(m2, o2, idx, tgt)
    assert o1.in_backward.chunks_updated > updated  # the last step updated in backward
    _same(m1, m2)


def test_a_failed_speculative_update_is_put_back(monkeypatch):
    cfg, _, (m1, o1), (m2, o2) = _pair(torch.float32, max_grad_norm=0.5)
    batches = gpt_batches(cfg, 4)
    for b in batches[:2]:
        train_steps(m1, o1, [b]), train_steps(m2, o2, [b])
    o1.synchronize()
    o2.synchronize()
    real, calls = heteromem.ops.adam_step_, []

    def flaky(master, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(master, *args, **kwargs)

    monkeypatch.setattr(heteromem.ops, "adam_step_", flaky)
    m1(*batches[2]).backward()
    with pytest.raises(hm.UpdateError, match="injected failure"):
        o1.step()
    monkeypatch.undo()
    o1.step()  # finishes the step, clipped like the others
    o1.zero_grad()
    train_steps(m2, o2, [batches[2]])
    train_steps(m1, o1, [batches[3]]), train_steps(m2, o2, [batches[3]])
    _same(m1, m2)
