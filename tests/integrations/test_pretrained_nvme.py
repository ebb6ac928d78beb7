"""LoRA over a checkpoint larger than the host budget: `hm.from_pretrained(..., nvme_dir=...)`
puts the frozen base on the NVMe tier, and where the files hold it in the compute dtype its
chunks are read from those files when needed, never copied into `nvme_dir`. The model trains
exactly as one loaded with every chunk on the host; a file changed in place after the load
is refused by name; a heteromem checkpoint loads into such a model without touching the
safetensors files.

A tiny Llama saved with `save_pretrained` into a temporary folder: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "runtime"))

import heteromem as hm  # noqa: E402
from heteromem.memory.nvme import staging_bytes  # noqa: E402
from wrap_helpers import lm_batches, nvme_host_budget, paging_kwargs, train_lm  # noqa: E402

VOCAB = 256


def _config():
    # Wide enough that the frozen base outweighs the adapters' host room (slot padding
    # included), so a budget for the adapters, staging and a small cache leaves it on NVMe.
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64)


def _lora():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           lora_dropout=0.0)


def _save(tmp_path: Path, dtype: torch.dtype) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config()).to(dtype)
    path = tmp_path / "llama"
    model.save_pretrained(path, max_shard_size="200KB")
    assert len(list(path.glob("*.safetensors"))) > 1
    return path, model


def _kwargs(saved: torch.nn.Module, dtype: torch.dtype) -> dict:
    return dict(device="cpu", dtype=dtype, lr=1e-2, **paging_kwargs(saved, dtype.itemsize))


def _small_host(saved: torch.nn.Module, dtype: torch.dtype, chunk_mb: float) -> int:
    """host_memory for the adapters (parameters, master, moments, gradient room, a slot's
    padding each), two frozen-image staging slots and a cache of four chunks' values."""
    capacity = int(chunk_mb * 2**20) // dtype.itemsize
    probe = peft.get_peft_model(transformers.LlamaForCausalLM(_config()), _lora())
    adapters = [p for p in probe.parameters() if p.requires_grad]
    trainable = (sum(p.numel() for p in adapters) + 256 * len(adapters)) * (dtype.itemsize + 16)
    return (staging_bytes(capacity, 2, dtype, trainable=False) + 4 * capacity * dtype.itemsize
            + trainable)


def _load(path: Path, saved: torch.nn.Module, dtype: torch.dtype, nvme: Path | None,
          lora: bool = True, **extra):
    """LoRA over the base (or, `lora=False`, every parameter trained); with `nvme`, a host
    budget that leaves every base chunk (every chunk) on NVMe."""
    kwargs = dict(_kwargs(saved, dtype), **extra)
    if nvme is not None:
        nvme.mkdir(exist_ok=True)
        kwargs["nvme_dir"] = str(nvme)
        if lora:
            kwargs["host_memory"] = _small_host(saved, dtype, kwargs["chunk_mb"])
        else:
            kwargs.update(nvme_host_budget(saved, dtype, kwargs["chunk_mb"], 0.0))
    torch.manual_seed(5)  # the adapters' init
    if not lora:
        return hm.from_pretrained(path, **kwargs)
    return hm.from_pretrained(path, peft_config=_lora(), **kwargs)


def _train(model, opt, steps: int, seed: int = 2) -> list[float]:
    return train_lm(model, opt, lm_batches(VOCAB, steps, seed))


def _files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.glob("*.safetensors"))}


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name, value in sb.items():
        assert torch.equal(sa[name], value), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_frozen_base_on_nvme_is_read_from_the_files_and_trains_exactly(tmp_path, dtype):
    path, saved = _save(tmp_path, dtype)
    before = _digest(path)
    model, opt = _load(path, saved, dtype, tmp_path / "nvme")
    plain, popt = _load(path, saved, dtype, None)
    report = hm.report(model)
    assert report.nvme_chunks > 0  # the base did not fit the host budget
    # Nothing was copied: the scratch folder is empty and the NVMe tier holds no bytes.
    assert _files_in(tmp_path / "nvme") == []
    assert report.tiers["nvme"].current_bytes == 0
    _assert_same_state(model, plain)
    assert _train(model, opt, 6) == _train(plain, popt, 6)
    _assert_same_state(model, plain)
    assert hm.report(model).tiers["host"].peak_bytes <= hm.report(model).tiers["host"].budget_bytes
    assert _files_in(tmp_path / "nvme") == []
    assert _digest(path) == before  # the files were only read
    # Merged export reads the base from the files too.
    hm.export_pretrained(model, tmp_path / "merged", merged=True)
    hm.export_pretrained(plain, tmp_path / "merged-plain", merged=True)
    assert _digest(tmp_path / "merged") == _digest(tmp_path / "merged-plain")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_full_fine_tune_loaded_onto_nvme_writes_nothing_and_trains_exactly(tmp_path, dtype):
    """Every chunk trainable and on NVMe: the load writes nothing (values and masters are read
    from the files until each chunk's first update, the moments start as zeros), and training,
    a checkpoint before the first step, and one after it are exactly those of a load with
    every chunk on the host."""
    path, saved = _save(tmp_path, dtype)
    before = _digest(path)
    model, opt = _load(path, saved, dtype, tmp_path / "nvme", lora=False)
    plain, popt = _load(path, saved, dtype, None, lora=False)
    report = hm.report(model)
    assert report.nvme_chunks > len(model._heteromem.manager.chunks) / 2
    assert report.details["nvme written"] == 0
    _assert_same_state(model, plain)
    hm.save_checkpoint(tmp_path / "ckpt0", model, opt)
    assert _train(model, opt, 4) == _train(plain, popt, 4)
    _assert_same_state(model, plain)
    hm.save_checkpoint(tmp_path / "ckpt4", model, opt)
    assert _digest(path) == before
    # Resumed from the checkpoint taken before any update: the same run again.
    again, aopt = _load(path, saved, dtype, tmp_path / "nvme2", lora=False)
    hm.load_checkpoint(tmp_path / "ckpt0", again, aopt)
    fresh, fopt = _load(path, saved, dtype, None, lora=False)
    assert _train(again, aopt, 4) == _train(fresh, fopt, 4)
    _assert_same_state(again, model)


def test_a_full_fine_tune_from_the_files_updates_during_backward_exactly(tmp_path):
    path, saved = _save(tmp_path, torch.bfloat16)
    model, opt = _load(path, saved, torch.bfloat16, tmp_path / "nvme", lora=False,
                       step_in_backward=True)
    plain, popt = _load(path, saved, torch.bfloat16, None, lora=False, step_in_backward=True)
    assert hm.report(model).nvme_chunks > 0
    assert _train(model, opt, 4) == _train(plain, popt, 4)
    _assert_same_state(model, plain)


def test_a_base_stored_in_another_dtype_is_copied_to_nvme(tmp_path):
    """bf16 files, fp32 compute: the values must be converted, so the chunks get images."""
    path, saved = _save(tmp_path, torch.bfloat16)
    model, opt = _load(path, saved, torch.float32, tmp_path / "nvme")
    plain, popt = _load(path, saved, torch.float32, None)
    assert hm.report(model).nvme_chunks > 0
    assert any(f.endswith("frozen.bin") for f in _files_in(tmp_path / "nvme"))
    _assert_same_state(model, plain)
    assert _train(model, opt, 3) == _train(plain, popt, 3)


def test_a_file_changed_in_place_after_the_load_is_refused_by_name(tmp_path):
    path, saved = _save(tmp_path, torch.bfloat16)
    model, opt = _load(path, saved, torch.bfloat16, tmp_path / "nvme")
    _train(model, opt, 1)
    shard = sorted(path.glob("*.safetensors"))[-1]
    with open(shard, "r+b") as f:  # one byte of tensor data, rewritten in place
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    os.utime(shard, ns=(0, 10**18))  # a new modification time, as any writer leaves
    with pytest.raises(hm.StorageError, match=str(shard.name)) as info:
        _train(model, opt, 1)
    assert "changed since the model was loaded" in str(info.value)


def test_a_file_replaced_after_the_load_keeps_the_values_loaded(tmp_path):
    """A download or export replaces files by renaming new ones over them: the model keeps
    reading the files it loaded (they stay open)."""
    path, saved = _save(tmp_path, torch.bfloat16)
    model, opt = _load(path, saved, torch.bfloat16, tmp_path / "nvme")
    plain, popt = _load(path, saved, torch.bfloat16, None)
    for shard in path.glob("*.safetensors"):
        new = shard.with_suffix(".new")
        new.write_bytes(b"\0" * shard.stat().st_size)
        os.replace(new, shard)
    assert _train(model, opt, 3) == _train(plain, popt, 3)
    _assert_same_state(model, plain)


def test_a_checkpoint_loads_into_a_model_read_from_the_files(tmp_path):
    """load_checkpoint writes the base's values: they go to images of their own in
    nvme_dir, never into the safetensors files; training then goes on as without NVMe."""
    path, saved = _save(tmp_path, torch.bfloat16)
    before = _digest(path)
    model, opt = _load(path, saved, torch.bfloat16, tmp_path / "nvme")
    _train(model, opt, 2)
    hm.save_checkpoint(tmp_path / "ckpt", model, opt)
    want = _train(model, opt, 3, seed=3)

    again, aopt = _load(path, saved, torch.bfloat16, tmp_path / "nvme2")
    hm.load_checkpoint(tmp_path / "ckpt", again, aopt)
    assert any(f.endswith("frozen.bin") for f in _files_in(tmp_path / "nvme2"))
    assert _train(again, aopt, 3, seed=3) == want
    _assert_same_state(again, model)
    assert _digest(path) == before


def _open_files_under(folder: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            out.append(target)
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_dropping_the_model_closes_the_files_and_stops_the_readers(tmp_path):
    import gc
    import threading

    path, saved = _save(tmp_path, torch.bfloat16)
    model, opt = _load(path, saved, torch.bfloat16, tmp_path / "nvme")
    _train(model, opt, 1)
    assert _open_files_under(path)  # kept open while the model lives
    del model, opt
    gc.collect()
    assert _open_files_under(path) == []
    # No checkpoint thread outlives the model (joined, bounded).
    for t in [t for t in threading.enumerate() if t.name.startswith("heteromem-ckpt")]:
        t.join(timeout=10)
        assert not t.is_alive(), t.name
    assert _files_in(tmp_path / "nvme") == []


def test_a_failed_read_of_the_files_in_a_step_loses_nothing(tmp_path):
    """The first step reads each chunk's values from the checkpoint files: an EIO there
    raises naming the file, and once the disk answers again `opt.step()` finishes the step
    exactly (nvme.md "Faults")."""
    import errno

    path, saved = _save(tmp_path, torch.bfloat16)
    model, opt = _load(path, saved, torch.bfloat16, tmp_path / "nvme", lora=False)
    plain, popt = _load(path, saved, torch.bfloat16, None, lora=False)
    [ids] = lm_batches(VOCAB, 1, seed=7)
    want = plain(input_ids=ids, labels=ids).loss
    want.backward()
    popt.step()
    popt.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert loss.item() == want.item()
    # The step's first request is the first chunk's first tensor read from the files.
    model._heteromem.manager.nvme.engine.inject_fault("read", errno.EIO)
    with pytest.raises(hm.StorageError, match="checkpoint file .*safetensors") as info:
        opt.step()
    assert info.value.errno == errno.EIO
    opt.step()
    opt.zero_grad()
    assert _train(model, opt, 3) == _train(plain, popt, 3)
    _assert_same_state(model, plain)
