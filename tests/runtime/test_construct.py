"""Models built on the meta device: `hm.wrap(model, init=...)` materialises them chunk by chunk
with the values `model.apply(init)` gives an ordinary copy, never holding the whole model, and
a refused wrap leaves the model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import heteromem as hm
from heteromem.runtime.construct import apply_order


class Block(nn.Module):
    """A module owning a parameter and a buffer besides its children, which `apply` reaches
    after the children: values come in another order than the parameters are declared."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(width))
        self.lin = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("shift", torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x) * self.gain + self.shift)


class Net(nn.Module):
    def __init__(self, vocab: int = 48, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied: one parameter, two owners

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def init(module: nn.Module) -> None:
    """Draws from the RNG for every kind of tensor, so any change of order shows."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.05)
        if module.bias is not None:
            nn.init.uniform_(module.bias, -0.1, 0.1)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight)
    elif isinstance(module, nn.LayerNorm):
        nn.init.uniform_(module.weight, 0.5, 1.5)
        nn.init.zeros_(module.bias)
    elif isinstance(module, Block):
        nn.init.uniform_(module.gain, 0.5, 1.5)
        module.shift.normal_()


def _meta(cls=Net, *args) -> nn.Module:
    with torch.device("meta"):
        return cls(*args)


def _reference(seed: int, fn=init) -> nn.Module:
    model = Net()
    torch.manual_seed(seed)
    with torch.no_grad():
        model.apply(fn)
    return model


def _all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_gives_the_values_of_model_apply(dtype):
    ref = _reference(3)
    torch.manual_seed(3)
    # Chunks of 2048 elements: the embedding's 1536 fit one, the model takes several.
    model, opt = hm.wrap(_meta(), device="cpu", dtype=dtype, init=init,
                         chunk_mb=2048 * dtype.itemsize / 2**20, device_memory="40KB", lr=1e-3)
    assert hm.report(model).chunks >= 4  # several chunks, filled while init runs
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for name, value in want.items():
        # Parameters come back in their own dtype (masters, exact); buffers live in the
        # compute dtype, as for any wrapped model.
        assert torch.equal(got[name], value.to(got[name].dtype)), name
    assert model.emb.weight is model.head.weight
    # Buffers are made by init too (then kept on the device in the compute dtype).
    assert torch.equal(model.blocks[1].shift.float(), ref.blocks[1].shift.to(dtype).float())
    # It trains like the ordinary model from there.
    idx = torch.randint(0, 48, (2, 8))
    loss = model(idx).float().logsumexp(-1).mean()
    loss.backward()
    opt.step()
    if dtype == torch.float32:
        assert torch.allclose(loss, ref(idx).logsumexp(-1).mean(), rtol=1e-5)


def test_apply_order_is_model_apply():
    seen = []
    Net().apply(seen.append)
    assert [type(m) for m in apply_order(Net())] == [type(m) for m in seen]


def test_without_init_each_module_resets_its_parameters():
    def make():
        return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))

    ref = make()
    torch.manual_seed(5)
    ref.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    with torch.device("meta"):
        meta = make()
    torch.manual_seed(5)
    model, _ = hm.wrap(meta, device="cpu", dtype=torch.float32, lr=1e-3)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())


def test_a_module_with_parameters_and_no_reset_parameters_is_named():
    meta = _meta()  # Block has a parameter of its own and no reset_parameters
    with pytest.raises(ValueError, match=r"'blocks\.0' \(Block\).*reset_parameters.*init="):
        hm.wrap(meta, device="cpu")
    assert all(t.is_meta for t in _all_tensors(meta).values())


def test_a_buffer_init_does_not_set_is_named_and_nothing_changes():
    def forgetful(module):
        if not isinstance(module, Block):
            init(module)
        else:
            nn.init.ones_(module.gain)  # forgets `shift`

    meta = _meta()
    params = dict(meta.named_parameters())
    with pytest.raises(ValueError, match=r"buffer 'shift' of module 'blocks\.0'.*did not set"):
        hm.wrap(meta, device="cpu", init=forgetful, chunk_mb=0.008)
    # Put back as it was: every tensor on the meta device again, the same parameter objects.
    assert all(t.is_meta for t in _all_tensors(meta).values())
    assert all(p is params[n] for n, p in meta.named_parameters())
    assert not any(hasattr(p, "_heteromem_slot") for p in meta.parameters())
    model, _ = hm.wrap(meta, device="cpu", init=init, chunk_mb=0.008)  # and can be wrapped
    assert not any(p.is_meta for p in model.parameters())


def test_a_parameter_init_does_not_set_is_named():
    def no_norms(module):
        if not isinstance(module, nn.LayerNorm):
            init(module)

    meta = _meta()
    with pytest.raises(ValueError, match=r"parameter 'weight' of module 'blocks\.0\.norm' "
                                         r"\(LayerNorm\).*did not set it"):
        hm.wrap(meta, device="cpu", init=no_norms, chunk_mb=0.008)
    assert all(t.is_meta for t in _all_tensors(meta).values())


def test_an_init_that_fails_part_way_leaves_the_model_as_it_was():
    calls = []

    def failing(module):
        calls.append(module)
        if len(calls) == 6:
            raise RuntimeError("init failed")
        init(module)

    meta = _meta()
    with pytest.raises(RuntimeError, match="init failed"):
        hm.wrap(meta, device="cpu", init=failing, chunk_mb=0.008)
    assert all(t.is_meta for t in _all_tensors(meta).values())


def test_mixed_modules_and_bad_arguments_are_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.device("meta"):
        model[0].bias = nn.Parameter(torch.empty(4))
    with pytest.raises(ValueError, match=r"module '0' \(Linear\) has parameters both on the meta"):
        hm.wrap(model, device="cpu")
    with pytest.raises(ValueError, match="init is for a model built on the meta device"):
        hm.wrap(nn.Linear(4, 4), device="cpu", init=init)
    with pytest.raises(TypeError, match="init must be a callable"):
        hm.wrap(_meta(), device="cpu", init="normal")
    with pytest.raises(ValueError, match="init or weights, not both"):
        hm.wrap(_meta(), device="cpu", init=init, weights="model.safetensors")


def test_materialised_modules_of_a_mixed_model_keep_their_values():
    """A meta model with one module made for real (as a PEFT adapter made for a meta base):
    init reaches only the modules with meta tensors."""
    ref = _reference(7)
    model = _meta()
    real = copy.deepcopy(ref.blocks[2].lin)
    model.blocks[2].lin = real
    model, _ = hm.wrap(model, device="cpu", dtype=torch.float32, init=init, chunk_mb=0.008)
    got = model.state_dict()
    assert torch.equal(got["blocks.2.lin.weight"], ref.blocks[2].lin.weight)
    assert torch.equal(got["blocks.2.lin.bias"], ref.blocks[2].lin.bias)


def _peak_rss_growth(fn) -> int:
    """Peak RSS during `fn()` minus RSS before (VmHWM reset through /proc/self/clear_refs)."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    before = status("VmRSS:")
    fn()
    return status("VmHWM:") - before


class Tower(nn.Module):
    def __init__(self, width: int = 1024, depth: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(depth)))


def test_a_meta_model_never_exists_whole_in_memory():
    """32 M fp32 parameters (128 MiB) frozen, wrapped in bf16: the host holds 64 MiB of
    parameters; materialising the model whole would add its 128 MiB on top of that."""
    meta = _meta(Tower)
    for p in meta.parameters():
        p.requires_grad_(False)
    out = {}

    def run():
        out["model"], _ = hm.wrap(meta, device="cpu", dtype=torch.bfloat16, chunk_mb=4,
                                  init=lambda m: nn.init.normal_(m.weight, std=0.02)
                                  if isinstance(m, nn.Linear) else None)
    growth = _peak_rss_growth(run)
    host = hm.report(out["model"]).tiers["host"].peak_bytes
    assert host >= 64 * 2**20
    assert growth <= host + 40 * 2**20, (growth, host)
