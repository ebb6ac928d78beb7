"""hm.wrap with low-precision compute: bf16 (the default) and fp16 with dynamic loss scaling.
Both keep an fp32 master, so they must track an fp32 PyTorch run closely, page within the
device budget, and (fp16) survive an overflowing step without touching the weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import heteromem as hm
from wrap_helpers import assert_pages, gpt_batches, gpt_pair, paging_kwargs, param_bytes

STEPS = 10


def _overfit(model, opt, batch, steps: int, backward=None) -> list[float]:
    """Trains on one batch repeatedly, so the loss must clearly go down."""
    losses = []
    for _ in range(steps):
        loss = model(*batch)
        (backward or (lambda l: l.backward()))(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _assert_tracks(ours: list[float], ref: list[float], rel: float) -> None:
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert math.isfinite(a) and abs(a - b) <= rel * b, f"step {step}: {a} vs fp32 {b}"
    assert ours[-1] < 0.9 * ours[0], ours  # it learns


def test_bf16_is_the_default_tracks_fp32_and_stays_within_budget():
    cfg, ref, model = gpt_pair()
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    kwargs = paging_kwargs(ref, 2)  # 40% of the parameters in bf16
    model, opt = hm.wrap(model, opt, device="cpu", **kwargs)
    assert_pages(model, param_bytes(ref, 2))
    batch = gpt_batches(cfg, 1)[0]
    with torch.no_grad():
        assert model(batch[0]).dtype == torch.bfloat16  # computes in bf16 by default
    _assert_tracks(_overfit(model, opt, batch, STEPS), _overfit(ref, ropt, batch, STEPS), 0.03)

    report = hm.report(model)
    device = report.tiers["device"]
    assert device.budget_bytes == kwargs["device_memory"]
    assert 0 < device.peak_bytes <= kwargs["device_memory"]
    assert 0 <= device.current_bytes <= device.peak_bytes
    assert report.tiers["host"].peak_bytes > 0
    assert report.bytes_h2d > 0 and report.bytes_d2h > 0  # the budget forced paging
    assert report.chunks == len(model._heteromem.manager.chunks) >= 4
    table = str(report)
    assert "device" in table and "host" in table
    assert len(table.splitlines()) >= 3


def test_report_of_an_unwrapped_model_is_a_clear_error():
    with pytest.raises(ValueError, match="not wrapped"):
        hm.report(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("max_norm", [None, 0.05], ids=["no-clip", "clip"])
def test_fp16_with_dynamic_loss_scaling_tracks_fp32(max_norm):
    """Clipping must use the unscaled norm (the scaled one is 65536 times larger)."""
    cfg, ref, model = gpt_pair()
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float16, max_grad_norm=max_norm,
                         **paging_kwargs(ref, 2))
    assert opt.scaler.scale == 2.0**16  # torch.amp.GradScaler's initial scale
    batch = gpt_batches(cfg, 1)[0]
    ours = _overfit(model, opt, batch, STEPS, backward=opt.backward)

    def clip(loss):
        loss.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)

    _assert_tracks(ours, _overfit(ref, ropt, batch, STEPS, backward=clip), 0.03)
    assert opt.scaler.scale == 2.0**16  # no overflow in a healthy run


@pytest.mark.parametrize("fraction", [0.4, None], ids=["paged", "unbounded"])
def test_bf16_accumulating_quarter_losses_equals_one_step_bit_for_bit(fraction):
    """Four backward passes of loss/4 on the same batch give exactly the one-pass gradient
    (quartering is exact in bf16, the sum runs in fp32), so the accumulation paths (device
    slots, host buffer, fp32 accumulator, values restored for the next micro-batch) must
    produce bit-identical weights to a single pass; so must a discarded backward before."""
    cfg, ref, one = gpt_pair(checkpoint=True)
    four = copy.deepcopy(ref)
    kwargs = paging_kwargs(ref, 2, fraction or 1.0)
    if fraction is None:
        kwargs["device_memory"] = None
    one, opt_one = hm.wrap(one, device="cpu", lr=3e-3, weight_decay=0.1, **kwargs)
    four, opt_four = hm.wrap(four, device="cpu", lr=3e-3, weight_decay=0.1, **kwargs)
    for batch in gpt_batches(cfg, 5):
        one(*batch).backward()
        opt_one.step()
        opt_one.zero_grad()
        four(*batch[::-1]).backward()  # thrown away
        opt_four.zero_grad()
        for _ in range(4):
            (four(*batch) / 4).backward()
        opt_four.step()
        opt_four.zero_grad()
    got, want = four.state_dict(), one.state_dict()
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert any(not torch.equal(value, ref.state_dict()[n]) for n, value in want.items())


def _overflow_by_inf_loss(model, opt, batch) -> None:
    opt.backward(model(*batch) * float("inf"))


def _overflow_by_huge_scale(model, opt, batch) -> None:
    # The scaled gradients of the fp16 activations exceed 65504: a real fp16 overflow.
    opt.scaler.scale = 2.0**40
    opt.backward(model(*batch))


@pytest.mark.parametrize("overflow", [_overflow_by_inf_loss, _overflow_by_huge_scale],
                         ids=["inf-loss", "huge-scale"])
def test_fp16_overflow_skips_the_step_and_halves_the_scale(overflow):
    cfg, ref, model = gpt_pair()
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float16, lr=1e-2,
                         **paging_kwargs(ref, 2))
    batches = gpt_batches(cfg, 6)
    _overfit(model, opt, batches[0], 2, backward=opt.backward)
    before = model.state_dict()
    with torch.no_grad():
        probe = model(*batches[1]).item()

    overflow(model, opt, batches[2])
    scale = opt.scaler.scale
    opt.step()
    opt.zero_grad()
    assert opt.scaler.scale == scale / 2
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed on a skipped step"
    with torch.no_grad():  # the fp16 copies the model computes with were restored too
        assert model(*batches[1]).item() == probe

    # Training goes on: while gradients still overflow the scale keeps halving (the huge-scale
    # case needs many halvings), then steps apply and the loss goes down again.
    applied, tries = [], 0
    while len(applied) < 3 and tries < 40:
        tries += 1
        scale = opt.scaler.scale
        loss = model(*batches[3])
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        if opt.scaler.scale == scale:
            applied.append(loss.item())
    assert len(applied) == 3 and all(math.isfinite(l) for l in applied)
    assert applied[-1] < applied[0]
    if overflow is _overflow_by_inf_loss:
        assert tries == 3  # one bad batch costs exactly one step
    changed = model.state_dict()
    assert any(not torch.equal(changed[n], v) for n, v in before.items())
