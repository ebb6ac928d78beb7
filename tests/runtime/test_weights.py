"""`hm.wrap(model, weights=path)`: safetensors files streamed into the chunks tensor by tensor.
Values are the files' exactly; every mismatch is reported at once, before anything changes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

import heteromem as hm
from heteromem.runtime import weights as wfiles

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_construct import Net, Tower, _meta, _peak_rss_growth  # noqa: E402


def _saved(tmp_path, seed: int = 0, dtype=torch.float32) -> tuple[Net, str]:
    torch.manual_seed(seed)
    model = Net().to(dtype)
    path = str(tmp_path / "model.safetensors")
    save_model(model, path)  # tied weights once, as transformers writes them
    return model, path


def _all_meta(model: nn.Module) -> bool:
    return all(t.is_meta for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_are_the_files(tmp_path, dtype):
    ref, path = _saved(tmp_path)
    chunk_mb = 2048 * dtype.itemsize / 2**20
    model, opt = hm.wrap(_meta(), device="cpu", dtype=dtype, weights=path, chunk_mb=chunk_mb,
                         device_memory="40KB", lr=1e-3)
    assert hm.report(model).chunks >= 3
    got = model.state_dict()
    for name, value in ref.state_dict().items():
        assert torch.equal(got[name], value.to(got[name].dtype)), name
    assert model.emb.weight is model.head.weight
    idx = torch.randint(0, 48, (2, 8))
    model(idx).float().sum().backward()
    opt.step()


def test_files_of_another_dtype_are_converted(tmp_path):
    ref, path = _saved(tmp_path, dtype=torch.bfloat16)
    model, _ = hm.wrap(_meta(), device="cpu", dtype=torch.float32, weights=path)
    got = model.state_dict()
    for name, value in ref.state_dict().items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], value.float()), name


def test_sharded_folder_with_index(tmp_path):
    ref, _ = _saved(tmp_path)
    state = {k: v for k, v in ref.state_dict().items() if k != "head.weight"}
    names = sorted(state)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(tmp_path / file))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / wfiles.INDEX_NAME).write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    model, _ = hm.wrap(_meta(), device="cpu", dtype=torch.float32, weights=tmp_path)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())


def test_every_mismatch_is_reported_at_once_and_nothing_changes(tmp_path):
    ref, _ = _saved(tmp_path)
    state = dict(ref.state_dict())
    del state["blocks.1.lin.bias"]                      # missing
    state["blocks.0.lin.weight"] = torch.zeros(32, 31)  # wrong shape
    state["blocks.2.gain"] = torch.zeros(32, dtype=torch.int32)  # not a float
    state["extra.weight"] = torch.zeros(3)              # unexpected
    del state["head.weight"]
    path = str(tmp_path / "bad.safetensors")
    save_file(state, path)
    meta = _meta()
    with pytest.raises(hm.CheckpointError) as err:
        hm.wrap(meta, device="cpu", weights=path)
    text = str(err.value)
    assert "missing from the files: blocks.1.lin.bias" in text
    assert "not in the model: extra.weight" in text
    assert "'blocks.0.lin.weight' is [32, 31] in " + path in text
    assert "'blocks.2.gain' in " + path + " is I32" in text
    assert "Nothing was changed" in text and isinstance(err.value, ValueError)
    assert _all_meta(meta)


def test_a_folder_without_weights_is_named(tmp_path):
    with pytest.raises(hm.CheckpointError, match="holds no weights.*model.safetensors"):
        hm.wrap(_meta(), device="cpu", weights=tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(hm.CheckpointError, match=r"PyTorch pickles \(.bin/.pt\)"):
        hm.wrap(_meta(), device="cpu", weights=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hm.wrap(_meta(), device="cpu", weights=tmp_path / "nowhere")
    with pytest.raises(TypeError, match="weights must be a path"):
        hm.wrap(_meta(), device="cpu", weights=3)


def test_an_index_naming_an_absent_shard_is_refused(tmp_path):
    (tmp_path / wfiles.INDEX_NAME).write_text(json.dumps(
        {"weight_map": {"emb.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(hm.CheckpointError, match="lists 1 file.*model-00001-of-00002"):
        hm.wrap(_meta(), device="cpu", weights=tmp_path)
    (tmp_path / wfiles.INDEX_NAME).write_text("{not json")
    with pytest.raises(hm.CheckpointError, match="index .* cannot be read"):
        hm.wrap(_meta(), device="cpu", weights=tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_file_is_named_before_anything_changes(tmp_path, damage):
    _, path = _saved(tmp_path)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-100] if damage == "truncated" else b"\x07" * 64)
    meta = _meta()
    with pytest.raises(hm.CheckpointError, match=f"weights file {path} cannot be read"):
        hm.wrap(meta, device="cpu", weights=path)
    assert _all_meta(meta)


def test_a_file_truncated_after_the_check_puts_the_model_back(tmp_path, monkeypatch):
    """The file is cut while the model is being filled: the read that meets its end fails
    naming file and tensor, and the model is as it was before the wrap."""
    _, path = _saved(tmp_path)
    real = wfiles._pread_into
    calls = []

    def cut(fd, out, offset, name, entry):
        calls.append(name)
        if len(calls) == 4:
            os.truncate(path, offset + 8)
        real(fd, out, offset, name, entry)

    monkeypatch.setattr(wfiles, "_pread_into", cut)
    meta = _meta()
    params = dict(meta.named_parameters())
    with pytest.raises(hm.CheckpointError, match="ended inside tensor") as err:
        hm.wrap(meta, device="cpu", weights=path, chunk_mb=0.008)
    assert f"{path} ended inside tensor {calls[3]!r}" in str(err.value)
    assert _all_meta(meta)
    assert all(p is params[n] for n, p in meta.named_parameters())
    monkeypatch.setattr(wfiles, "_pread_into", real)
    _saved(tmp_path)  # written again whole
    model, _ = hm.wrap(meta, device="cpu", weights=path, chunk_mb=0.008)
    assert not any(p.is_meta for p in model.parameters())


class Rotary(nn.Module):
    """A non-persistent buffer computed in __init__ (as rotary embeddings do)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("inv_freq", self._compute(dim), persistent=False)

    @staticmethod
    def _compute(dim: int) -> torch.Tensor:
        return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


class RotaryWithReset(Rotary):
    def reset_parameters(self) -> None:
        self.inv_freq.copy_(self._compute(self.inv_freq.numel() * 2))


def test_buffers_the_files_lack_come_from_the_model_or_are_named(tmp_path):
    torch.manual_seed(0)
    ref = RotaryWithReset()
    path = str(tmp_path / "rot.safetensors")
    save_model(ref, path)
    model, _ = hm.wrap(_meta(RotaryWithReset), device="cpu", dtype=torch.float32, weights=path)
    assert torch.equal(model.inv_freq, ref.inv_freq)
    assert torch.equal(model.state_dict()["proj.weight"], ref.proj.weight)
    meta = _meta(Rotary)
    with pytest.raises(ValueError, match=r"module 'the model itself' \(Rotary\) has "
                                         r"buffer\(s\) \['inv_freq'\]"):
        hm.wrap(meta, device="cpu", weights=path)
    assert _all_meta(meta)


def test_persistent_buffers_come_from_the_files(tmp_path):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    ref.train()
    ref(torch.randn(16, 4))  # running statistics move away from their init
    path = str(tmp_path / "bn.safetensors")
    save_model(ref, path)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    model, _ = hm.wrap(meta, device="cpu", dtype=torch.float32, weights=path)
    assert torch.equal(model[1].running_mean, ref[1].running_mean)
    assert torch.equal(model[1].num_batches_tracked, ref[1].num_batches_tracked)


def test_a_materialised_model_takes_what_the_files_hold(tmp_path):
    ref, path = _saved(tmp_path)
    torch.manual_seed(9)
    model = Net()
    model.blocks.append(nn.Linear(32, 32))  # not in the files: keeps its values
    extra = model.blocks[3].weight.detach().clone()
    model, _ = hm.wrap(model, device="cpu", dtype=torch.float32, weights=path)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
    assert torch.equal(got["blocks.3.weight"], extra)


def test_loading_never_holds_the_whole_model(tmp_path):
    """128 MiB of fp32 weights in the file, frozen and wrapped in bf16: the host holds 64 MiB;
    the state dict in memory would add 128 MiB."""
    torch.manual_seed(0)
    path = str(tmp_path / "tower.safetensors")
    save_model(Tower(), path)
    meta = _meta(Tower)
    for p in meta.parameters():
        p.requires_grad_(False)
    out = {}

    def run():
        out["model"], _ = hm.wrap(meta, device="cpu", dtype=torch.bfloat16, chunk_mb=4,
                                  weights=path)
    growth = _peak_rss_growth(run)
    host = hm.report(out["model"]).tiers["host"].peak_bytes
    assert growth <= host + 40 * 2**20, (growth, host)
    os.remove(path)
