"""hm.wrap under autograd patterns beyond one forward and one backward per step: several
losses backpropagated through one graph (retain_graph), two forwards before one backward
(siamese / contrastive / preference losses), and torch.inference_mode() evaluation. Each is
fp32 against the same model trained with plain PyTorch, so the numbers must match."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import heteromem as hm
from wrap_helpers import (assert_losses_close, assert_params_close, gpt_batches, gpt_pair,
                          paging_kwargs)


def _wrapped_pair(fraction: float | None, **cfg):
    """(cfg, ref, ref optimizer, wrapped model, its optimizer); fraction None: no budget."""
    cfg, ref, model = gpt_pair(**cfg)
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    kwargs = paging_kwargs(ref, 4, fraction or 1.0)
    if fraction is None:
        kwargs["device_memory"] = None
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, **kwargs)
    return cfg, ref, ropt, model, opt


def _two_losses_one_graph(model, idx, tgt) -> float:
    logits = model(idx)
    ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.reshape(-1))
    z_loss = logits.float().logsumexp(-1).pow(2).mean() * 1e-2
    ce.backward(retain_graph=True)
    z_loss.backward()
    return ce.item() + z_loss.item()


def _two_forwards_one_backward(model, idx, tgt) -> float:
    loss = model(idx, tgt) + model(tgt, idx)
    loss.backward()
    return loss.item()


def _train(step_fn, model, opt, batches) -> list[float]:
    losses = []
    for idx, tgt in batches:
        losses.append(step_fn(model, idx, tgt))
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("fraction", [None, 0.6], ids=["unbounded", "paged"])
def test_two_losses_backpropagated_through_one_graph(fraction):
    cfg, ref, ropt, model, opt = _wrapped_pair(fraction)
    batches = gpt_batches(cfg, 4)
    assert_losses_close(_train(_two_losses_one_graph, model, opt, batches),
                        _train(_two_losses_one_graph, ref, ropt, batches))
    assert_params_close(model.state_dict(), ref.state_dict())


def test_two_forwards_one_backward_with_room_for_the_whole_model():
    cfg, ref, ropt, model, opt = _wrapped_pair(None)
    batches = gpt_batches(cfg, 4)
    assert_losses_close(_train(_two_forwards_one_backward, model, opt, batches),
                        _train(_two_forwards_one_backward, ref, ropt, batches))
    assert_params_close(model.state_dict(), ref.state_dict())


def test_two_forwards_one_backward_under_a_budget():
    cfg, ref, ropt, model, opt = _wrapped_pair(0.6)
    batches = gpt_batches(cfg, 4)
    assert_losses_close(_train(_two_forwards_one_backward, model, opt, batches),
                        _train(_two_forwards_one_backward, ref, ropt, batches))
    assert_params_close(model.state_dict(), ref.state_dict())


class Net(nn.Module):
    """With head_first, the head is registered before the body, so the first iteration
    re-packs the chunks in the order of use (new chunks, new device buffers); without, the
    chunks wrap made are kept and their device buffers are allocated at first use."""

    def __init__(self, head_first: bool) -> None:
        super().__init__()
        if head_first:
            self.head = nn.Linear(32, 64)
        self.emb = nn.Embedding(64, 32)
        self.body = nn.Sequential(*(nn.Linear(32, 32) for _ in range(4)))
        if not head_first:
            self.head = nn.Linear(32, 64)

    def forward(self, idx: torch.Tensor, tgt: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head(torch.tanh(self.body(self.emb(idx))))
        if tgt is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.reshape(-1))


@pytest.mark.parametrize("evaluate_after,head_first", [(0, False), (1, True)],
                         ids=["before-training", "after-first-step-repacking"])
def test_inference_mode_evaluation_does_not_break_training(evaluate_after, head_first):
    torch.manual_seed(0)
    ref = Net(head_first)
    model = copy.deepcopy(ref)
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=3e-3, weight_decay=0.1,
                         chunk_mb=2048 * 4 * 1.01 / 2**20)
    gen = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randint(0, 64, (2, 2, 8), generator=gen)) for _ in range(4)]
    losses = ([], [])
    for step, (idx, tgt) in enumerate(batches):
        if step == evaluate_after:
            with torch.inference_mode():
                got, want = model(idx), ref(idx)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        for m, o, out in ((model, opt, losses[0]), (ref, ropt, losses[1])):
            loss = m(idx, tgt)
            loss.backward()
            o.step()
            o.zero_grad()
            out.append(loss.item())
    assert_losses_close(*losses)
    assert_params_close(model.state_dict(), ref.state_dict())


def test_no_grad_evaluation_before_training_and_after_the_first_step():
    """The same schedules as above with torch.no_grad(), which must work today."""
    torch.manual_seed(0)
    ref = Net(head_first=True)
    model = copy.deepcopy(ref)
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=3e-3, weight_decay=0.1,
                         chunk_mb=2048 * 4 * 1.01 / 2**20)
    assert len(model._heteromem.manager.chunks) >= 4
    gen = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randint(0, 64, (2, 2, 8), generator=gen)) for _ in range(4)]
    losses = ([], [])
    for step, (idx, tgt) in enumerate(batches):
        if step in (0, 1):
            with torch.no_grad():
                assert torch.allclose(model(idx), ref(idx), rtol=1e-5, atol=1e-6)
        for m, o, out in ((model, opt, losses[0]), (ref, ropt, losses[1])):
            loss = m(idx, tgt)
            loss.backward()
            o.step()
            o.zero_grad()
            out.append(loss.item())
    assert_losses_close(*losses)
    assert_params_close(model.state_dict(), ref.state_dict())
