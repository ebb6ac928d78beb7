"""hm.wrap taking over heteromem.optim's optimizers (AGD, AdamW8bit, Adam8bit) as it takes over
torch's Adam/AdamW: param groups, hyper-parameters and LR schedulers on the returned optimizer,
results equal to the standalone optimizer, `opt.state_dict()` in the standalone format.

fp32: the wrapped chunks run the very kernel the standalone `step()` runs (`cls.update_`), on
the same fp32 gradients, over runs of parameters packed at the layout's alignment, so losses,
parameters and optimizer states are equal bit for bit (not merely close). bf16: against the
mixed-precision reference (test_wrap_mixed_reference.py) with the standalone optimizer on the
fp32 masters."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

import heteromem as hm
from heteromem.optim import AGD, QUANT_BLOCK, Adam8bit, AdamW8bit
from wrap_helpers import (assert_losses_close, assert_params_close, gpt_batches, gpt_pair,
                          paging_kwargs, train_steps)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "optim"))
from agd_paper import agd_paper, gradients  # noqa: E402

OPTIMIZERS = [AGD, AdamW8bit, Adam8bit]
IDS = [c.__name__ for c in OPTIMIZERS]


def _groups(model: torch.nn.Module, cls: type) -> list[dict]:
    """Two param groups with their own hyper-parameters (matrices decay, the rest not) of the
    trainable parameters."""
    decay = [p for p in model.parameters() if p.dim() >= 2 and p.requires_grad]
    rest = [p for p in model.parameters() if p.dim() < 2 and p.requires_grad]
    own = dict(delta=1e-3) if cls is AGD else dict(eps=1e-6)
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, **own}]


def _lr(cls: type) -> float:
    return 1e-3 if cls is AGD else 3e-3  # AGD takes larger steps at Adam's lr (docs/optim.md)


def _scheduler(opt: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.5 * s))


def _pair(cls: type, **wrap_kwargs):
    """(cfg, reference model, its standalone optimizer, wrapped model, wrapped optimizer)."""
    cfg, ref, model = gpt_pair()
    ropt = cls(_groups(ref, cls), lr=_lr(cls))
    opt = cls(_groups(model, cls), lr=_lr(cls))
    kwargs = dict(device="cpu", dtype=torch.float32, **paging_kwargs(ref, 4))
    kwargs.update(wrap_kwargs)
    model, opt = hm.wrap(model, opt, **kwargs)
    return cfg, ref, ropt, model, opt


def _assert_same_state(got: dict, want: dict) -> None:
    """Two optimizer state dicts, tensor for tensor, bit for bit."""
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys() and got["state"]
    for key, state in want["state"].items():
        assert got["state"][key].keys() == state.keys()
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got["state"][key][name], value), (key, name)
            else:
                assert got["state"][key][name] == value, (key, name)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_fp32_wrapped_equals_the_standalone_optimizer_bit_for_bit(cls):
    """Paged chunks (40% of the parameters on the device), two param groups, an LR schedule
    on each side: 6 steps give the same losses, parameters and states, bit for bit."""
    cfg, ref, ropt, model, opt = _pair(cls)
    assert isinstance(opt, torch.optim.Optimizer) and opt.kind.name == cls.__name__
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    batches = gpt_batches(cfg, 6)
    want = train_steps(ref, ropt, batches, _scheduler(ropt))
    got = train_steps(model, opt, batches, _scheduler(opt))
    assert got == want
    assert opt.param_groups[0]["lr"] == ropt.param_groups[0]["lr"] < _lr(cls)
    mine, theirs = model.state_dict(), ref.state_dict()
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name
    _assert_same_state(opt.state_dict(), ropt.state_dict())
    # The chunks really hold this optimizer's state: 8-bit codes and per-block scales.
    chunk = next(c for c in model._heteromem.manager.chunks if c.trainable)
    assert {n: t.dtype for n, t in chunk.states.items()} == {
        r.name: r.dtype for r in cls.layout.state_regions}
    if cls is not AGD:
        assert all(s.offset % QUANT_BLOCK == 0 for c in model._heteromem.manager.chunks
                   if c.trainable for s in c.slots)


@pytest.mark.cuda
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_on_cuda_the_wrapped_optimizer_follows_the_standalone_one_on_cuda_tensors(cls):
    """Paged on a GPU: chunks whose states stay on the host run the CPU kernel, the others
    the CUDA kernel; the standalone optimizer runs the CUDA kernel on the same model on the
    GPU. The kernels are bit-identical to one reference, and cuBLAS may pick other algorithms
    for the chunks' views, so: within 1e-5 in losses and 1e-4 in parameters (8-bit: 1e-3,
    a code step) over 6 steps."""
    cfg, ref, ropt, model, opt = _pair(cls, device="cuda")
    ref.cuda()
    ropt = cls(_groups(ref, cls), lr=_lr(cls))
    batches = [(i.cuda(), t.cuda()) for i, t in gpt_batches(cfg, 6)]
    want = train_steps(ref, ropt, batches, _scheduler(ropt))
    got = train_steps(model, opt, batches, _scheduler(opt))
    assert_losses_close(got, want, tol=1e-5)
    mine = {k: v.cpu() for k, v in model.state_dict().items()}
    theirs = {k: v.cpu() for k, v in ref.state_dict().items()}
    assert_params_close(mine, theirs, tol=1e-4 if cls is AGD else 1e-3)
    report = hm.report(model)
    assert report.tiers["device"].peak_bytes > 0


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_states_kept_on_the_device_tier_equal_the_standalone_optimizer(cls):
    """No device budget: every chunk's state moves to the device tier after the first
    iteration (on a GPU: the CUDA kernel updates them; here the same path on the CPU)."""
    cfg, ref, ropt, model, opt = _pair(cls, device_memory=None)
    batches = gpt_batches(cfg, 4)
    assert train_steps(model, opt, batches) == train_steps(ref, ropt, batches)
    assert hm.report(model).state_chunks_on_device > 0
    _assert_same_state(opt.state_dict(), ropt.state_dict())


class Rows(torch.nn.Module):
    """Parameters whose gradient is exactly a given tensor: the loss is sum(w * g), so
    d loss / d w = g, bit for bit, whatever the paging does."""

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.rows = torch.nn.ModuleList(Row(width) for _ in range(rows))

    def forward(self, grads: torch.Tensor) -> torch.Tensor:
        return sum(row(g) for row, g in zip(self.rows, grads))


class Row(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(width))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return (self.weight * g).sum()


def test_wrapped_agd_follows_the_paper_over_30_steps_with_the_floor_binding():
    """AGD taken over by hm.wrap (5 chunks paged through a device budget of 2) against the
    float64 rule of the paper (tests/optim/agd_paper.py), 30 steps on gradients that make the
    floor delta * sqrt(1 - beta2^t) bind for 10-90% of the element updates: within 1e-5."""
    lr, betas, delta, wd = 1e-2, (0.9, 0.99), 1e-3, 0.05
    rows, width, steps = 5, 2048, 30
    torch.manual_seed(0)
    model = Rows(rows, width)
    start = torch.cat([p.detach().clone() for p in model.parameters()])
    grads = gradients(rows * width, steps)
    opt = AGD(model.parameters(), lr=lr, betas=betas, delta=delta, weight_decay=wd)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32,
                         chunk_mb=width * 4 / 2**20, device_memory=2 * width * 4)
    assert hm.report(model).chunks == rows
    for g in grads:
        model(g.view(rows, width)).backward()
        opt.step()
        opt.zero_grad()
    assert hm.report(model).bytes_h2d > 0  # the rows really paged
    expect, floored = agd_paper(start, grads, lr=lr, betas=betas, delta=delta, weight_decay=wd)
    got = torch.cat([p.detach() for p in model.state_dict().values()]).double()
    err = ((got - expect).norm() / (expect - start.double()).norm()).item()
    assert err < 1e-5, err
    share = torch.stack(floored).double().mean().item()
    assert 0.1 < share < 0.9, f"the floor bound {share:.0%} of the updates"


class MasterReference:
    """bf16/fp16 training as heteromem specifies it, in plain PyTorch, with a standalone
    optimizer on fp32 masters: the low-precision gradients of the loss times `scale` (fp16's
    loss scale), widened to fp32 (exact, as the kernels read them) and divided by `scale`,
    clipped to `clip` over the global norm."""

    def __init__(self, model: torch.nn.Module, cls: type, dtype: torch.dtype = torch.bfloat16,
                 clip: float | None = None) -> None:
        self.masters = [torch.nn.Parameter(p.detach().float().clone()) for p in model.parameters()]
        self.model = copy.deepcopy(model).to(dtype)
        self.params = list(self.model.parameters())
        self.clip = clip
        groups = _groups(model, cls)
        index = {id(p): k for k, p in enumerate(model.parameters())}
        self.opt = cls([dict(g, params=[self.masters[index[id(p)]] for p in g["params"]])
                        for g in groups], lr=_lr(cls))

    def step(self, batch, scale: float = 1.0) -> float:
        loss = self.model(*batch)
        (loss * scale).backward()
        for m, p in zip(self.masters, self.params):
            if p.grad is not None:  # (frozen parameters have none)
                m.grad, p.grad = p.grad.float() / scale, None
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_([m for m in self.masters if m.grad is not None],
                                           self.clip)
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)
        return loss.item()


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_bf16_follows_the_mixed_precision_reference(cls):
    """bf16 compute, fp32 masters: the first loss is the same bits, the losses of 8 steps
    agree to 1%, and the fp32 masters stay close to the reference's (the 8-bit codes round a
    moment to the nearest of a few values, so a last-bit difference of a gradient can move
    one element's moment by a code step: the masters agree in norm, not bit for bit)."""
    cfg, ref, model = gpt_pair()
    names = [n for n, _ in ref.named_parameters()]
    reference = MasterReference(ref, cls)
    opt = cls(_groups(model, cls), lr=_lr(cls))
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.bfloat16,
                         **paging_kwargs(ref, 2))
    batches = gpt_batches(cfg, 8)
    ours = train_steps(model, opt, batches)
    want = [reference.step(b) for b in batches]
    assert ours[0] == want[0]
    for k, (a, b) in enumerate(zip(ours, want)):
        assert math.isfinite(a) and abs(a - b) <= 1e-2 * abs(b), f"step {k}: {a} vs {b}"
    got = {n: v for n, v in model.state_dict().items() if n in names}
    masters = dict(zip(names, (m.detach() for m in reference.masters)))
    assert_params_close(got, masters, tol=2e-3)
    start = dict(ref.named_parameters())
    assert any((got[n] - start[n]).norm() > 1e-2 * start[n].norm() for n in names)


@pytest.mark.parametrize("clip", [None, 0.5], ids=["no-clip", "clip"])
@pytest.mark.parametrize("cls", [AGD, AdamW8bit], ids=["AGD", "AdamW8bit"])
def test_fp16_loss_scaling_and_a_frozen_parameter(cls, clip):
    """fp16 compute with dynamic loss scaling (the kernels divide the scaled gradient by
    grad_scale in the update) against the mixed-precision reference at the same loss scale:
    without clipping, the same losses and fp32 masters bit for bit. With global-norm clipping
    the clip factor is rounded otherwise than torch's clip_grad_norm_ (its own norm and
    order), which the 8-bit codes turn into the odd code step (see the bf16 test): losses
    within 1%, masters within 1e-2. A frozen parameter is used, never changed (it is kept in
    the compute dtype) and gets no state."""
    frozen = "wpe.weight"
    cfg, ref, model = gpt_pair()
    for m in (ref, model):
        m.get_parameter(frozen).requires_grad_(False)
    names = [n for n, _ in ref.named_parameters()]
    reference = MasterReference(ref, cls, torch.float16, clip=clip)
    model, opt = hm.wrap(model, cls(_groups(model, cls), lr=_lr(cls)), device="cpu",
                         dtype=torch.float16, max_grad_norm=clip, **paging_kwargs(ref, 2))
    ours, want = [], []
    for batch in gpt_batches(cfg, 6):
        scale = opt.scaler.scale
        loss = model(*batch)
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        ours.append(loss.item())
        want.append(reference.step(batch, scale))
        if clip is not None:
            assert opt.last_grad_norm > clip  # clipping was active
    assert scale > 1 and opt.skipped_steps == 0
    got = {n: v for n, v in model.state_dict().items() if n in names}
    masters = dict(zip(names, (m.detach() for m in reference.masters)))
    assert torch.equal(got.pop(frozen), masters.pop(frozen).half().float())
    if clip is None:
        assert ours == want
        for name, value in masters.items():
            assert torch.equal(got[name], value), name
    else:
        for k, (a, b) in enumerate(zip(ours, want)):
            assert math.isfinite(a) and abs(a - b) <= 1e-2 * abs(b), f"step {k}: {a} vs {b}"
        assert_params_close(got, masters, tol=1e-2)
    assert len(opt.state_dict()["state"]) == len(names) - 1


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_state_dict_moves_between_the_standalone_and_the_wrapped_optimizer(cls):
    """Wrapped -> standalone (after 3 steps) and standalone -> wrapped (a fresh wrap loads the
    standalone's state): both continue exactly as the run that never stopped."""
    cfg, ref, ropt, model, opt = _pair(cls)
    batches = gpt_batches(cfg, 6)
    train_steps(model, opt, batches[:3])
    train_steps(ref, ropt, batches[:3])
    want = train_steps(ref, ropt, batches[3:])

    # The wrapped optimizer's state into a standalone one.
    _, plain, _ = gpt_pair()
    plain.load_state_dict(model.state_dict())
    popt = cls(_groups(plain, cls), lr=_lr(cls))
    popt.load_state_dict(opt.state_dict())
    assert train_steps(plain, popt, batches[3:]) == want

    # A standalone state dict (saved after 3 steps) into a fresh wrap.
    cfg, ref2, ropt2, again, aopt = _pair(cls)
    train_steps(ref2, ropt2, batches[:3])
    again.load_state_dict(ref2.state_dict())
    aopt.load_state_dict(ropt2.state_dict())
    assert [s.step for s in again._heteromem.optimizer.slots] == [3] * len(aopt.slots)
    assert train_steps(again, aopt, batches[3:]) == want


@pytest.mark.parametrize("wrapped,saved,message", [
    (AGD, AdamW8bit, r"\(AGD\): param group 0 has no \['delta'\].*saved by another optimizer"),
    # The same state keys (exp_avg, exp_avg_sq, step) with other meanings: told apart by the
    # param groups' keys and by the type of step.
    (AGD, torch.optim.AdamW, r"\(AGD\): param group 0 has no \['delta'\].*saved by another "
                             r"optimizer"),
    (torch.optim.AdamW, AGD, r"\(AdamW\): param group 0 has no \['eps'\].*saved by another "
                             r"optimizer"),
], ids=["8bit-into-AGD", "AdamW-into-AGD", "AGD-into-AdamW"])
def test_a_state_of_another_optimizer_is_refused_with_nothing_changed(wrapped, saved, message):
    cfg, ref, model = gpt_pair()
    opt = wrapped(_groups(model, wrapped), lr=1e-3)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, **paging_kwargs(ref, 4))
    batches = gpt_batches(cfg, 3)
    train_steps(model, opt, batches[:2])
    before = opt.state_dict()
    other = saved(_groups(ref, saved), lr=1e-3)
    train_steps(ref, other, batches[:1])
    state = other.state_dict()
    if saved is not AGD:
        # Given AGD's hyper-parameter too, the state keys (8-bit) or the type of step (torch's
        # AdamW) tell it apart.
        disguised = copy.deepcopy(state)
        for group in disguised["param_groups"]:
            group["delta"] = 1e-5
        with pytest.raises(ValueError, match=(
                r"AGD.*has keys \['exp_avg', 'exp_avg_scale'.*another optimizer"
                if saved is AdamW8bit else r"step is a tensor, as torch's optimizers save it")):
            opt.load_state_dict(disguised)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    _assert_same_state(opt.state_dict(), before)


def test_torch_adamw_state_dict_round_trips_through_the_wrap():
    """torch's AdamW: the wrapped optimizer's state_dict loads into torch.optim.AdamW (step a
    tensor, moments shaped like the parameters) and continues as the wrapped run does."""
    cfg, ref, model = gpt_pair()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32,
                         **paging_kwargs(ref, 4))
    batches = gpt_batches(cfg, 5)
    train_steps(model, opt, batches[:3])
    saved = opt.state_dict()
    state = saved["state"][0]
    assert state["step"].item() == 3.0 and state["exp_avg"].shape == next(ref.parameters()).shape
    ref.load_state_dict(model.state_dict())
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    ropt.load_state_dict(saved)
    want = train_steps(ref, ropt, batches[3:])
    got = train_steps(model, opt, batches[3:])
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-5 * abs(b)


@pytest.mark.parametrize("cls", [AdamW8bit, AGD], ids=["AdamW8bit", "AGD"])
def test_step_in_backward_with_clipping_redoes_exactly(cls):
    """Updates during backward are speculative with clipping: snapshots keep the optimizer's
    own regions (8-bit codes and scales) and a redone update equals a plain wrap's."""
    cfg, _, _, plain, popt = _pair(cls, max_grad_norm=0.05)
    cfg, _, _, early, eopt = _pair(cls, max_grad_norm=0.05, step_in_backward=True)
    batches = gpt_batches(cfg, 4)
    assert train_steps(early, eopt, batches) == train_steps(plain, popt, batches)
    assert hm.report(early).updates_redone > 0
    _assert_same_state(eopt.state_dict(), popt.state_dict())


def test_wrap_checks_each_optimizers_own_hyper_parameters():
    _, _, model = gpt_pair()
    opt = AGD(model.parameters(), lr=1e-3)
    opt.param_groups[0]["delta"] = -1.0
    with pytest.raises(ValueError, match=r"hm.wrap: optimizer param group 0: AGD: delta must be "
                                         r"finite and >= 0"):
        hm.wrap(model, opt, device="cpu")
    cfg, ref, ropt, model, opt = _pair(AdamW8bit)
    batch = gpt_batches(cfg, 1)[0]
    model(*batch).backward()
    opt.param_groups[1]["eps"] = float("nan")
    with pytest.raises(ValueError, match=r"opt.step\(\): param group 1: AdamW8bit: eps must be "
                                         r"finite.*Nothing was updated"):
        opt.step()
    opt.param_groups[1]["eps"] = 1e-6
    opt.step()  # the gradients were kept: the step goes through once fixed
    assert all(s.step == 1 for s in opt.slots)


def test_optimizers_hm_wrap_cannot_take_over_are_refused_by_name():
    class MyAGD(AGD):
        pass

    for opt_of in (lambda ps: torch.optim.SGD(ps, lr=0.1), lambda ps: MyAGD(ps)):
        _, _, model = gpt_pair()
        with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Adam, "
                                            r"torch.optim.AdamW, heteromem.optim.AGD, "
                                            r"heteromem.optim.AdamW8bit or heteromem.optim."
                                            r"Adam8bit instance \(or None\), got .*(SGD|MyAGD)"):
            hm.wrap(model, opt_of(model.parameters()), device="cpu")
