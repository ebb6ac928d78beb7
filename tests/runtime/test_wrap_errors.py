"""hm.wrap refuses bad input with a clear error naming the argument (DESIGN.md section 1),
and running out of a tier raises heteromem.OutOfMemory naming the tier, the bytes asked and
what to change. A refused wrap leaves the model usable and wrappable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import heteromem as hm
from heteromem.models import GPT, GPTConfig
from wrap_helpers import gpt_batches, gpt_pair, paging_kwargs


def _gpt(n_layer: int = 2) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=n_layer, n_head=2, n_embd=32))


def _largest_bytes(model: nn.Module, element_size: int) -> int:
    return max(p.numel() for p in model.parameters()) * element_size


def _assert_still_trains(model: nn.Module) -> None:
    """The model a refused wrap left behind wraps and trains normally."""
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32)
    idx, tgt = gpt_batches(model.cfg, 1)[0]
    model(idx, tgt).backward()
    opt.step()


@pytest.mark.parametrize("arg", ["device_memory", "host_memory"])
@pytest.mark.parametrize("value,exc", [
    ("20XB", ValueError), (-1, ValueError), ("abc", ValueError), (True, TypeError),
    (0, ValueError), ("", ValueError), (float("nan"), ValueError), ("-5MiB", ValueError),
    ([1024], TypeError),
])
def test_bad_sizes_are_refused_naming_the_argument(arg, value, exc):
    with pytest.raises(exc, match=arg):
        hm.wrap(_gpt(), device="cpu", **{arg: value})


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "bf16"])
def test_unsupported_dtype_is_refused(dtype):
    with pytest.raises(ValueError, match="dtype"):
        hm.wrap(_gpt(), device="cpu", dtype=dtype)


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="device='tpu'"):
        hm.wrap(_gpt(), device="tpu")
    with pytest.raises(ValueError, match="device"):
        hm.wrap(_gpt(), device="not a device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
# NOTE: ids avoid the bare word "cuda": tests/conftest.py skips items whose keywords contain it.
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")],
                         ids=["str", "str-index", "torch-device"])
def test_cuda_without_a_gpu_is_refused(device):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        hm.wrap(_gpt(), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the default on a CPU-only machine")
def test_default_device_is_cpu_without_a_gpu():
    model, _ = hm.wrap(_gpt())
    assert model._heteromem.manager.device.type == "cpu"


def test_chunk_smaller_than_the_largest_parameter_is_refused():
    model = _gpt()
    too_small = _largest_bytes(model, 2) * 0.9 / 2**20
    with pytest.raises(ValueError, match="chunk_mb") as info:
        hm.wrap(model, device="cpu", chunk_mb=too_small)
    assert "blocks.0.fc.weight" in str(info.value)  # names the parameter that does not fit
    _assert_still_trains(model)


@pytest.mark.parametrize("arg", ["chunk_mb", "max_grad_norm"])
@pytest.mark.parametrize("value,exc", [(0, ValueError), (-1.0, ValueError),
                                       (float("inf"), ValueError), (True, TypeError),
                                       ("1", TypeError)])
def test_bad_positive_numbers_are_refused(arg, value, exc):
    with pytest.raises(exc, match=arg):
        hm.wrap(_gpt(), device="cpu", **{arg: value})


def test_budget_below_the_largest_modules_working_set_raises_out_of_memory():
    model = _gpt()
    chunk = _largest_bytes(model, 2) * 1.01
    with pytest.raises(hm.OutOfMemory) as info:
        hm.wrap(model, device="cpu", chunk_mb=chunk / 2**20, device_memory=int(chunk * 0.5))
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.tier == "device"
    assert err.asked > err.left == int(chunk * 0.5)
    message = str(err)
    assert "device tier" in message and "asked" in message
    assert "raise device_memory" in message and "chunk_mb" in message  # what to change
    _assert_still_trains(model)


def test_host_budget_too_small_raises_out_of_memory_for_the_host_tier():
    model = _gpt()
    with pytest.raises(hm.OutOfMemory, match="host") as info:
        hm.wrap(model, device="cpu", host_memory="16KiB")
    assert info.value.tier == "host"
    assert "raise host_memory" in str(info.value)
    _assert_still_trains(model)


class _CallsASibling(nn.Module):
    """`first` calls `second` inside its own forward although `second` is not its child, so
    both modules' chunks are in use at once: a working set wrap cannot see in the module tree."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(64, 64)
        self.second = nn.Linear(64, 64)
        self.first.forward = lambda x, m=self.first: F.linear(self.second(x), m.weight, m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x).sum()


def test_out_of_memory_during_training_names_the_device_tier():
    """A working set larger than the budget that only shows at run time surfaces as
    OutOfMemory naming the tier and what to do, not as a wrong result or an obscure error."""
    model = _CallsASibling()
    slab = 64 * 65 * 4 * 1.01
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, chunk_mb=slab / 2**20,
                         device_memory=int(slab * 1.5))
    with pytest.raises(hm.OutOfMemory) as info:
        model(torch.randn(2, 64)).backward()
    err = info.value
    assert err.tier == "device" and "raise device_memory" in str(err)
    assert "1 chunk(s)" in str(err) and "needs room too" in str(err)


def test_nested_modules_count_their_ancestors_parameters():
    """A parent's own parameters stay in use while its children run: wrap refuses a budget
    that holds the largest module's chunks but not those plus its ancestors'."""
    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(64, 64))
            self.child = nn.Linear(64, 64, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.child(x) @ self.scale).sum()

    slab = 64 * 64 * 4 * 1.01
    with pytest.raises(hm.OutOfMemory, match="2 chunk"):
        hm.wrap(Parent(), device="cpu", dtype=torch.float32, chunk_mb=slab / 2**20,
                device_memory=int(slab * 1.5))
    model, opt = hm.wrap(Parent(), device="cpu", dtype=torch.float32, chunk_mb=slab / 2**20,
                         device_memory=int(slab * 2.01))
    model(torch.randn(2, 64)).backward()
    opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_device_budget_wrap_accepts_trains_and_larger_ones_are_accepted_too(dtype):
    """A sweep of device budgets from one slab to many: wrap refuses the small ones up front,
    every budget it accepts runs training steps within it, and once one is accepted every
    larger one is (a larger budget never fails where a smaller one works)."""
    elem = torch.empty((), dtype=dtype).element_size()
    slab = _largest_bytes(_gpt(), elem) * 1.01
    accepted = []
    for tenths in range(10, 60, 3):
        model = _gpt()
        try:
            model, opt = hm.wrap(model, device="cpu", dtype=dtype, chunk_mb=slab / 2**20,
                                 device_memory=int(slab * tenths / 10))
        except hm.OutOfMemory as exc:
            assert exc.tier == "device", exc
            assert not accepted, f"{tenths / 10} slabs refused after {accepted[0] / 10} worked"
            _assert_still_trains(model)
            continue
        for idx, tgt in gpt_batches(model.cfg, 3):
            model(idx, tgt).backward()
            opt.step()
            opt.zero_grad()
        report = hm.report(model).tiers["device"]
        assert report.peak_bytes <= report.budget_bytes
        accepted.append(tenths)
    assert accepted and accepted[0] > 10, "the sweep must cross from refused to accepted"


def test_wrapping_twice_is_refused():
    model, _ = hm.wrap(_gpt(), device="cpu")
    with pytest.raises(ValueError, match="already wrapped"):
        hm.wrap(model, device="cpu")


def test_parameters_shared_with_another_wrapped_model_are_refused():
    first = _gpt()
    second = nn.Sequential(nn.Linear(32, 32))
    second[0].weight = first.blocks[0].proj.weight
    hm.wrap(first, device="cpu")
    with pytest.raises(ValueError, match="another wrapped model"):
        hm.wrap(second, device="cpu")


def test_integer_parameters_are_refused():
    model = nn.Linear(4, 4)
    model.register_parameter("index", nn.Parameter(torch.zeros(3, dtype=torch.long),
                                                   requires_grad=False))
    with pytest.raises(ValueError, match="floating-point"):
        hm.wrap(model, device="cpu")


@pytest.mark.parametrize("make,exc,match", [
    (lambda ps: torch.optim.SGD(ps, lr=0.1), TypeError, "SGD"),
    (lambda ps: torch.optim.AdamW(ps, amsgrad=True), ValueError, "amsgrad"),
    (lambda ps: torch.optim.Adam(ps, maximize=True), ValueError, "maximize"),
], ids=["sgd", "amsgrad", "maximize"])
def test_unsupported_optimizers_are_refused(make, exc, match):
    model = _gpt()
    with pytest.raises(exc, match=match):
        hm.wrap(model, make(model.parameters()), device="cpu")


def test_unknown_adam_keyword_is_refused():
    with pytest.raises(TypeError, match="momentum"):
        hm.wrap(_gpt(), device="cpu", momentum=0.9)


def test_adam_keywords_and_an_optimizer_together_are_refused():
    model = _gpt()
    with pytest.raises(ValueError, match="either"):
        hm.wrap(model, torch.optim.AdamW(model.parameters()), device="cpu", lr=1e-3)


def test_optimizer_over_foreign_tensors_is_refused():
    model = _gpt()
    stranger = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        hm.wrap(model, torch.optim.AdamW([stranger, *model.parameters()]), device="cpu")


def test_optimizer_that_already_stepped_is_refused():
    """Its Adam moments would be silently dropped."""
    cfg, model, _ = gpt_pair(n_layer=1)
    opt = torch.optim.AdamW(model.parameters())
    idx, tgt = gpt_batches(cfg, 1)[0]
    model(idx, tgt).backward()
    opt.step()
    with pytest.raises(ValueError, match="already taken steps"):
        hm.wrap(model, opt, device="cpu")


def test_keep_on_device_with_an_unknown_module_is_refused():
    with pytest.raises(ValueError, match="keep_on_device"):
        hm.wrap(_gpt(), device="cpu", keep_on_device=["blocks.9"])


def test_non_module_is_refused():
    with pytest.raises(TypeError, match="model"):
        hm.wrap(lambda x: x, device="cpu")


def test_stray_parameter_access_outside_forward_fails_loudly():
    """A paged-out parameter is an empty placeholder: using it outside the module's forward
    must raise instead of computing with stale or wrong values."""
    model, _ = hm.wrap(_gpt(), device="cpu", **paging_kwargs(_gpt(), 2))
    weight = model.blocks[0].fc.weight
    assert weight.numel() == 0
    with pytest.raises(RuntimeError):
        torch.nn.functional.linear(torch.ones(1, 32, dtype=torch.bfloat16), weight)


def test_fully_frozen_model_gets_no_optimizer_and_still_runs():
    """Inference-only wrapping (all requires_grad=False) pages weights, returns no optimizer."""
    model = _gpt()
    model.requires_grad_(False)
    idx, _ = gpt_batches(model.cfg, 1)[0]
    with torch.no_grad():
        want = model(idx)
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, **paging_kwargs(_gpt(), 4))
    assert opt is None
    with torch.no_grad():
        got = model(idx)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
