"""export_safetensors: a wrapped model's weights streamed into one .safetensors file. The file
must equal model.state_dict() bit for bit (tied weights once), load into transformers, be
written parameter by parameter (each NVMe master read once), and never appear half written."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import heteromem as hm
from heteromem.runtime.checkpoint import export as export_module
from heteromem.runtime.checkpoint.export import export_safetensors
from wrap_helpers import gpt_batches, gpt_pair, nvme_host_budget, paging_kwargs

TIED_ALIAS = "lm_head.weight"  # GPT ties it to wte.weight, which comes first in the state dict


def _wrapped_gpt(tmp_path, dtype: torch.dtype, nvme: bool, frozen: bool = False,
                 device: str = "cpu", fraction: float = 0.4):
    """A trained tiny GPT wrapped on `device` (paging), with persistent buffers of two
    dtypes and a non-persistent one; with `nvme`, every optimizer state lives on NVMe."""
    cfg, ref, model = gpt_pair()
    model.register_buffer("scale", torch.linspace(0, 1, 6).view(2, 3))
    model.register_buffer("count", torch.arange(4))
    model.register_buffer("scratch", torch.ones(3), persistent=False)
    if frozen:
        model.wpe.requires_grad_(False)
        model.blocks[1].requires_grad_(False)
    elem = torch.empty((), dtype=dtype).element_size()
    kwargs = dict(paging_kwargs(ref, elem, fraction), device=device, dtype=dtype)
    if nvme:
        # Only the staging pool and a small cache on the host: every chunk goes to NVMe.
        kwargs.update(nvme_host_budget(ref, dtype, kwargs["chunk_mb"], 0.0),
                      nvme_dir=str(tmp_path / "nvme"))
        (tmp_path / "nvme").mkdir()
    model, opt = hm.wrap(model, lr=3e-3, **kwargs)
    for idx, tgt in gpt_batches(cfg, 3):
        model(idx.to(device), tgt.to(device)).backward()
        opt.step()
        opt.zero_grad()
    if nvme:
        assert sum(c.nvme is not None for c in model._heteromem.manager.chunks) >= 3
    return model


def _assert_file_equals_state_dict(path, model) -> None:
    want = model.state_dict()
    got = load_file(str(path))
    assert set(got) == set(want) - {TIED_ALIAS}
    for name, value in got.items():
        assert value.dtype == want[name].dtype and value.shape == want[name].shape, name
        assert torch.equal(value, want[name]), name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("nvme", [False, True], ids=["host", "nvme"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_file_equals_state_dict(tmp_path, dtype, nvme, device):
    """On CUDA the buffers, and the masters of chunks whose states stay on the device, are GPU
    tensors: the same file comes out."""
    model = _wrapped_gpt(tmp_path, dtype, nvme, device=device)
    path = tmp_path / "model.safetensors"
    export_safetensors(path, model, metadata={"step": "3"})
    _assert_file_equals_state_dict(path, model)
    assert "scratch" not in load_file(str(path))
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "3"}
    with open(path, "rb") as f:  # the data section starts 8-byte aligned
        assert int.from_bytes(f.read(8), "little") % 8 == 0
    assert os.listdir(tmp_path) == sorted(["model.safetensors"] + (["nvme"] if nvme else []))


def test_frozen_parameters_are_exported(tmp_path):
    model = _wrapped_gpt(tmp_path, torch.bfloat16, nvme=False, frozen=True)
    assert any(not c.trainable for c in model._heteromem.manager.chunks)
    path = tmp_path / "frozen.safetensors"
    export_safetensors(str(path), model)
    _assert_file_equals_state_dict(path, model)


def test_masters_kept_on_the_device_are_exported(tmp_path):
    """A device budget with room to spare keeps some chunks' master and moments there."""
    model = _wrapped_gpt(tmp_path, torch.bfloat16, nvme=False, fraction=4.0)
    assert any(c.states_on_device for c in model._heteromem.manager.chunks)
    path = tmp_path / "model.safetensors"
    export_safetensors(path, model)
    _assert_file_equals_state_dict(path, model)


def test_streams_one_parameter_at_a_time_and_reads_each_nvme_master_once(tmp_path, monkeypatch):
    model = _wrapped_gpt(tmp_path, torch.bfloat16, nvme=True)
    want = model.state_dict()
    nvme = model._heteromem.manager.nvme
    loads: list[int] = []
    real_load = nvme.load
    monkeypatch.setattr(nvme, "load",
                        lambda chunk, *a: loads.append(chunk.index) or real_load(chunk, *a))
    writes: list[int] = []
    real_open = open

    class Recording:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            writes.append(memoryview(data).nbytes)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(export_module, "open", lambda *a: Recording(real_open(*a)), raising=False)

    def gathers_everything(*args, **kwargs):
        raise AssertionError("export_safetensors gathered the whole state dict")

    monkeypatch.setattr(model, "state_dict", gathers_everything)
    path = tmp_path / "model.safetensors"
    export_safetensors(path, model)
    on_nvme = sorted(c.index for c in model._heteromem.manager.chunks if c.nvme is not None)
    assert sorted(loads) == on_nvme  # each master read once, whole chunks never gathered
    largest = max(v.numel() * v.element_size() for v in want.values())
    assert max(writes[2:]) == largest  # writes[:2]: header length and header
    assert len(writes) == 2 + len(want) - 1  # one write per tensor, the tied alias skipped
    got = load_file(str(path))
    assert all(torch.equal(got[name], want[name]) for name in got)


def test_a_failure_midway_leaves_no_file_and_keeps_the_old_one(tmp_path):
    model = _wrapped_gpt(tmp_path, torch.float32, nvme=True)
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous export")
    engine = model._heteromem.manager.nvme.engine
    engine.inject_fault("read", errno.EIO, 1)  # the second chunk read from NVMe fails
    with pytest.raises(OSError) as info:
        export_safetensors(path, model)
    engine.clear_faults()
    assert info.value.errno == errno.EIO
    assert path.read_bytes() == b"previous export"
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "nvme"]  # no temp file left
    export_safetensors(path, model)
    _assert_file_equals_state_dict(path, model)


def test_gpt2_export_loads_with_from_pretrained_and_gives_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=1e-2,
                         **paging_kwargs(model, 4, fraction=0.7))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    export_safetensors(tmp_path / "model.safetensors", model)
    model.config.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "transformer.wte.weight" in f.keys()
    fresh, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(info["missing_keys"]) <= {"lm_head.weight"}  # tied to wte: filled by tying
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()
    model.eval()
    fresh.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = fresh(input_ids=ids).logits
    assert torch.equal(got, want)


def test_bad_inputs_say_what_to_do(tmp_path):
    cfg, ref, model = gpt_pair()
    with pytest.raises(hm.NotWrappedError, match="not wrapped by heteromem.*save_model"):
        export_safetensors(tmp_path / "m.safetensors", ref)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        export_safetensors(tmp_path / "m.safetensors", {"w": torch.zeros(1)})
    model, _ = hm.wrap(model, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="is a directory.*model.safetensors"):
        export_safetensors(tmp_path, model)
    with pytest.raises(ValueError, match="does not exist.*makedirs"):
        export_safetensors(tmp_path / "missing" / "m.safetensors", model)
    with pytest.raises(TypeError, match="metadata must be a dict of str to str"):
        export_safetensors(tmp_path / "m.safetensors", model, metadata={"step": 3})
    with pytest.raises(TypeError, match="path must be"):
        export_safetensors(3, model)
    assert os.listdir(tmp_path) == []
