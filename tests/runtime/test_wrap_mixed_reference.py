"""bf16 and fp16 training against an independent reference written here: a model in the
compute dtype for forward and backward, fp32 master copies of its parameters updated by
`torch.optim.AdamW`, and the masters rounded back into the model after each step (fp16: the
loss scaled by a dynamic scale, the gradients unscaled in fp32, an overflow skipping the step).

That is the numerics heteromem promises, so its masters must agree with the reference's to
float rounding after a step (they agree to about 1e-7), not merely track an fp32 run: a bug
such as updating the rounded low-precision copy instead of the master would fail here."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import heteromem as hm
from wrap_helpers import assert_params_close, gpt_batches, gpt_pair, paging_kwargs

LR, WD = 3e-3, 0.1


class MasterReference:
    """Mixed-precision training as heteromem specifies it, in plain PyTorch."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        # The masters start from the fp32 values, before they are rounded into the model.
        self.masters = [p.detach().float().clone() for p in model.parameters()]
        self.model = copy.deepcopy(model).to(dtype)
        self.params = list(self.model.parameters())  # tied parameters once, as the masters
        self.opt = torch.optim.AdamW(self.masters, lr=LR, weight_decay=WD)
        self.scale = 2.0**16 if dtype == torch.float16 else 1.0

    def step(self, batch) -> float:
        loss = self.model(*batch)
        (loss * self.scale).backward()
        grads = [p.grad.float() / self.scale for p in self.params]
        for p in self.params:
            p.grad = None
        if not all(torch.isfinite(g).all() for g in grads):
            self.scale /= 2  # skip the step, as GradScaler does
            return loss.item()
        for m, g in zip(self.masters, grads):
            m.grad = g
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)  # round to nearest even
        return loss.item()

    def state(self, names: list[str]) -> dict[str, torch.Tensor]:
        return dict(zip(names, (m.clone() for m in self.masters)))


def _wrapped(ref: torch.nn.Module, model: torch.nn.Module, dtype: torch.dtype):
    elem = torch.empty((), dtype=dtype).element_size()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    return hm.wrap(model, opt, device="cpu", dtype=dtype, **paging_kwargs(ref, elem))


def _step(model, opt, batch, dtype) -> float:
    loss = model(*batch)
    if dtype == torch.float16:
        opt.backward(loss)
    else:
        loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masters_after_one_step_agree_with_the_reference(dtype):
    cfg, ref, model = gpt_pair()
    names = [n for n, _ in ref.named_parameters()]
    reference = MasterReference(ref, dtype)
    model, opt = _wrapped(ref, model, dtype)
    batch = gpt_batches(cfg, 1)[0]
    for _ in range(3):  # fp16: the first steps may overflow and skip, in both alike
        assert _step(model, opt, batch, dtype) == reference.step(batch)
        if opt.skipped_steps == 0 or dtype != torch.float16:
            break
    assert opt.skipped_steps == (0 if dtype == torch.bfloat16 else opt.skipped_steps)
    got = {n: v for n, v in model.state_dict().items() if n in names}
    assert_params_close(got, reference.state(names), tol=1e-5)
    # The masters moved by a full Adam step, far more than the tolerance.
    start = dict(ref.named_parameters())
    assert any((got[n] - start[n]).norm() > 1e-3 * start[n].norm() for n in names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_loss_curve_over_twelve_steps_follows_the_reference(dtype):
    cfg, ref, model = gpt_pair()
    reference = MasterReference(ref, dtype)
    model, opt = _wrapped(ref, model, dtype)
    batches = gpt_batches(cfg, 12)
    ours = [_step(model, opt, b, dtype) for b in batches]
    want = [reference.step(b) for b in batches]
    for k, (a, b) in enumerate(zip(ours, want)):
        assert math.isfinite(a) and abs(a - b) <= 1e-2 * abs(b), f"step {k}: {a} vs {b}"
    assert ours[-1] < ours[0]
