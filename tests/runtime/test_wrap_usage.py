"""hm.wrap under the ways people actually use models: a module applied several times, frozen
parameters, evaluation in the middle of training, a forward whose module order changes
between steps, discarded gradients, state_dict round trips, modules kept on the device.
Every case is fp32 against the same model trained with plain PyTorch, under a device budget
that forces paging, so the numbers must match to float tolerance."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import heteromem as hm
from wrap_helpers import (assert_losses_close, assert_pages, assert_params_close, gpt_batches,
                          gpt_pair, paging_kwargs, param_bytes, train_steps)


class Residual(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(F.gelu(self.up(self.norm(h))))


class Stack(nn.Module):
    """Embedding, residual layers run in the order `layer_order()` gives, head. Subclasses
    change the order; the training-step counter makes it a function of the step, so a
    reference and a wrapped copy run identical graphs."""

    def __init__(self, vocab: int = 64, d: int = 32, n_layers: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Residual(d) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.steps = 0

    def layer_order(self) -> list[int]:
        return list(range(len(self.layers)))

    def forward(self, idx: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        for i in self.layer_order():
            h = self.layers[i](h)
        if torch.is_grad_enabled():
            self.steps += 1
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.reshape(-1))


class ReusesLayerZero(Stack):
    """Layer 0 runs three times per forward: its gradient sums three uses."""

    def layer_order(self) -> list[int]:
        return [0, 1, 2, 0, 3, 4, 5, 0]


class ReordersOnOddSteps(Stack):
    """Odd steps run the layers backwards and skip the last one (a branch): the trace of the
    previous step no longer predicts the next use, and layer 5 gets no gradient there."""

    def layer_order(self) -> list[int]:
        n = len(self.layers)
        return list(range(n)) if self.steps % 2 == 0 else list(range(n - 2, -1, -1))


def _stack_pair(cls: type[Stack]) -> tuple[Stack, Stack]:
    torch.manual_seed(0)
    ref = cls()
    return ref, copy.deepcopy(ref)


_train = train_steps


# A reused module's chunks stay soft-pinned from the backward of its last use until its first
# use has delivered the gradient: evicted under pressure, so reuse pages like anything else.
@pytest.mark.parametrize("cls,fraction", [(ReusesLayerZero, 0.6), (ReusesLayerZero, 0.4),
                                          (ReordersOnOddSteps, 0.4)])
def test_reused_and_reordered_modules_match_torch(cls, fraction):
    ref, model = _stack_pair(cls)
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=3e-3, weight_decay=0.1,
                         **paging_kwargs(ref, 4, fraction))
    assert_pages(model, param_bytes(ref, 4), fraction)
    gen = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randint(0, 64, (2, 2, 8), generator=gen)) for _ in range(8)]
    assert_losses_close(_train(model, opt, batches), _train(ref, ropt, batches))
    assert_params_close(model.state_dict(), ref.state_dict())


def test_frozen_parameters_are_used_but_never_updated():
    cfg, ref, model = gpt_pair()
    for m in (ref, model):
        m.wpe.requires_grad_(False)
        m.blocks[1].requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in ref.named_parameters() if not p.requires_grad}
    # Both optimizers get every parameter, frozen ones included, as people often write it.
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, **paging_kwargs(ref, 4))
    assert_pages(model, param_bytes(ref, 4))
    batches = gpt_batches(cfg, 6)
    assert_losses_close(_train(model, opt, batches), _train(ref, ropt, batches))
    got = model.state_dict()
    assert_params_close(got, ref.state_dict())
    for name, value in frozen.items():
        assert torch.equal(got[name], value), name
    params = dict(model.named_parameters())
    for name in frozen:
        chunk = params[name]._heteromem_slot.chunk
        assert not chunk.trainable
        assert chunk.master is None and chunk.states is None
        assert chunk.acc is None  # no gradient was ever gathered for it
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])


def test_eval_between_steps_gives_reference_logits_and_training_continues():
    cfg, ref, model = gpt_pair(checkpoint=True)
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, **paging_kwargs(ref, 4))
    batches = gpt_batches(cfg, 8)
    probe = batches[0][0]

    def logits_match() -> None:
        for m in (model, ref):
            m.eval()
        with torch.no_grad():
            got, want = model(probe), ref(probe)
        for m in (model, ref):
            m.train()
        assert got.shape == want.shape
        assert ((got - want).norm() / want.norm()).item() <= 1e-5

    logits_match()  # before any step (and before the first-use re-packing)
    losses = (_train(model, opt, batches[:4]), _train(ref, ropt, batches[:4]))
    logits_match()  # right after step(): the pipelined update must be waited for
    losses[0].extend(_train(model, opt, batches[4:]))
    losses[1].extend(_train(ref, ropt, batches[4:]))
    assert_losses_close(*losses)
    assert_params_close(model.state_dict(), ref.state_dict())
    logits_match()


def test_zero_grad_without_step_discards_the_gradients():
    """A batch whose gradients are thrown away (e.g. a skipped bad batch) must leave no trace
    in the next step, in every place a gradient can wait: device slot, host, accumulator."""
    cfg, ref, model = gpt_pair()
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, **paging_kwargs(ref, 4))
    batches = gpt_batches(cfg, 6)
    losses = ([], [])
    for step, (idx, tgt) in enumerate(batches):
        for m, o, out in ((model, opt, losses[0]), (ref, ropt, losses[1])):
            if step in (1, 3):
                m(tgt, idx).backward()  # a batch to discard
                o.zero_grad()
            loss = m(idx, tgt)
            loss.backward()
            o.step()
            o.zero_grad()
            out.append(loss.item())
    assert_losses_close(*losses)
    assert_params_close(model.state_dict(), ref.state_dict())


def test_state_dict_is_full_tensors_and_load_state_dict_round_trips():
    cfg, ref, model = gpt_pair()
    model, opt = hm.wrap(model, device="cpu", dtype=torch.bfloat16, lr=3e-3,
                         **paging_kwargs(ref, 2))
    sd = model.state_dict()
    want = ref.state_dict()
    assert list(sd) == list(want)  # tied names included, in torch's order
    for name, value in want.items():
        # Full shapes in the parameters' own dtype; bf16 mode keeps an exact fp32 master.
        assert sd[name].shape == value.shape and sd[name].dtype == value.dtype, name
        assert torch.equal(sd[name], value), name
    # Train the reference a little, load its weights: the wrapped model must compute with them.
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    _train(ref, ropt, gpt_batches(cfg, 3))
    _train(model, opt, gpt_batches(cfg, 2, seed=5))  # leaves state on host and device
    model.load_state_dict(ref.state_dict())
    assert_params_close(model.state_dict(), ref.state_dict(), tol=0.0)
    idx, tgt = gpt_batches(cfg, 1, seed=9)[0]
    with torch.no_grad():
        got, expect = model(idx, tgt).item(), ref(idx, tgt).item()
    assert abs(got - expect) <= 2e-2 * expect  # bf16 compute of the same weights


def test_keep_on_device_pins_a_module_and_keeps_parity():
    cfg, ref, model = gpt_pair()
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    kwargs = paging_kwargs(ref, 4)
    kwargs["device_memory"] = int(kwargs["device_memory"] * 1.5)  # room for the kept chunk
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, keep_on_device=["ln_f"],
                         **kwargs)
    kept = model.ln_f.weight._heteromem_slot.chunk
    assert kept.resident
    batches = gpt_batches(cfg, 6)
    assert_losses_close(_train(model, opt, batches), _train(ref, ropt, batches))
    assert_params_close(model.state_dict(), ref.state_dict())
    kept = model.ln_f.weight._heteromem_slot.chunk  # re-packing may have moved it
    assert kept.keep_on_device and kept.resident
    assert hm.report(model).tiers["device"].peak_bytes <= kwargs["device_memory"]


def test_load_state_dict_mid_training_matches_torch():
    """Loading weights keeps the optimizer's moments, as with a plain model and torch AdamW."""
    cfg, ref, model = gpt_pair()
    _, donor, _ = gpt_pair()
    with torch.no_grad():
        for p in donor.parameters():
            p.mul_(0.5)
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, **paging_kwargs(ref, 4))
    batches = gpt_batches(cfg, 6)
    want, got = _train(ref, ropt, batches[:3]), _train(model, opt, batches[:3])
    ref.load_state_dict(donor.state_dict())
    model.load_state_dict(donor.state_dict())
    want += _train(ref, ropt, batches[3:])
    got += _train(model, opt, batches[3:])
    assert_losses_close(got, want)
    assert_params_close(model.state_dict(), ref.state_dict())


def test_batchnorm_buffers_update_and_match_torch():
    """Buffers stay on the device (not paged): running statistics update in training, count
    batches, are used in eval mode, and come back through state_dict()."""
    torch.manual_seed(0)
    # No bias before a BatchNorm: it would have a zero true gradient (the norm removes it).
    ref = nn.Sequential(nn.Linear(16, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                        nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    model = copy.deepcopy(ref)
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    kwargs = paging_kwargs(ref, 4)
    kwargs["device_memory"] = int(kwargs["chunk_mb"] * 2**20 * 3.2)  # 3 of 5+ chunks
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=3e-3, weight_decay=0.1,
                         **kwargs)
    assert len(model._heteromem.manager.chunks) >= 4
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen))
               for _ in range(6)]
    losses = ([], [])
    for x, y in batches:
        for m, o, out in ((model, opt, losses[0]), (ref, ropt, losses[1])):
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            o.step()
            o.zero_grad()
            out.append(loss.item())
    assert_losses_close(*losses)
    got = model.state_dict()
    assert_params_close(got, ref.state_dict())  # running_mean / running_var included
    assert got["1.num_batches_tracked"].item() == len(batches)
    for m in (model, ref):
        m.eval()
    with torch.no_grad():
        assert torch.allclose(model(batches[0][0]), ref(batches[0][0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,fraction", [
    (torch.float32, 0.4),
    (torch.float32, None),
    (torch.bfloat16, 0.4),
], ids=["fp32-paged", "fp32-unbounded", "bf16-paged"])
def test_parameters_left_out_of_the_optimizer_keep_their_values(dtype, fraction):
    """torch semantics: a trainable parameter the optimizer was not given is never changed
    (e.g. training only the head without freezing the rest)."""
    cfg, ref, model = gpt_pair()
    head_only = [p for n, p in model.named_parameters() if n.startswith(("ln_f", "blocks.3"))]
    opt = torch.optim.AdamW(head_only, lr=1e-2)
    elem = torch.empty((), dtype=dtype).element_size()
    kwargs = paging_kwargs(ref, elem, fraction or 1.0)
    if fraction is None:
        kwargs["device_memory"] = None
    model, opt = hm.wrap(model, opt, device="cpu", dtype=dtype, **kwargs)
    batches = gpt_batches(cfg, 4)
    _train(model, opt, batches)
    got = model.state_dict()
    for name, value in ref.state_dict().items():
        if not name.startswith(("ln_f", "blocks.3")):
            assert torch.equal(got[name], value), name
    # The weights it computes with are the ones state_dict() reports.
    check = copy.deepcopy(ref)
    check.load_state_dict(got)
    with torch.no_grad():
        ours, want = model(batches[0][0]).float(), check(batches[0][0])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((ours - want).norm() / want.norm()).item() <= tol
