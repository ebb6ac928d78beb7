"""hm.save_checkpoint / hm.load_checkpoint: exact resume (in a fresh process too), every tier
(host, device-resident state, NVMe), another chunk layout, flash saves, and refused loads
that leave training exactly where it was."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import heteromem as hm
from heteromem.runtime.checkpoint import layout
from heteromem.runtime.checkpoint.save import _PENDING
from test_wrap_nvme import _nvme_kwargs
from wrap_helpers import gpt_batches, gpt_pair, paging_kwargs, train_steps

HERE = os.path.dirname(os.path.abspath(__file__))


def _wrapped(seed: int, dtype=torch.float32, fraction: float | None = 0.4, device: str = "cpu",
             clip: float | None = 0.5, **overrides):
    """A paged tiny GPT whose weights are re-drawn from `seed` (a different init than the
    model that was saved), with an AdamW of two param groups."""
    cfg, ref, model = gpt_pair()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=3e-3)
    elem = torch.empty((), dtype=dtype).element_size()
    kwargs = paging_kwargs(ref, elem, fraction or 1.0)
    if fraction is None:
        kwargs["device_memory"] = None
    kwargs.update(overrides)
    model, opt = hm.wrap(model, opt, device=device, dtype=dtype, max_grad_norm=clip, **kwargs)
    return cfg, model, opt


_train = train_steps


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fraction", [0.4, None], ids=["paged", "state-on-device"])
def test_resume_is_exact(tmp_path, dtype, fraction):
    """Train N, save, train M (losses L); a model with another init loads and trains M:
    the same losses bit for bit, and the same parameters."""
    cfg, model, opt = _wrapped(0, dtype, fraction)
    batches = gpt_batches(cfg, 7)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    _train(model, opt, batches[:3], sched)
    hm.save_checkpoint(tmp_path / "ckpt", model, opt, extra={"scheduler": sched.state_dict()})
    want = _train(model, opt, batches[3:], sched)
    _, other, oopt = _wrapped(1, dtype, fraction)
    extra = hm.load_checkpoint(tmp_path / "ckpt", other, oopt)
    osched = torch.optim.lr_scheduler.StepLR(oopt, step_size=2, gamma=0.5)
    osched.load_state_dict(extra["scheduler"])
    assert _train(other, oopt, batches[3:], osched) == want
    _same_state(other.state_dict(), model.state_dict())


@pytest.mark.cuda
@pytest.mark.parametrize("fraction", [0.4, None], ids=["paged", "state-on-device"])
def test_resume_is_exact_on_cuda(tmp_path, fraction):
    torch.backends.cudnn.deterministic = True
    cfg, model, opt = _wrapped(0, torch.bfloat16, fraction, device="cuda")
    batches = [(i.cuda(), t.cuda()) for i, t in gpt_batches(cfg, 6)]
    _train(model, opt, batches[:3])
    hm.save_checkpoint(tmp_path / "ckpt", model, opt)
    want = _train(model, opt, batches[3:])
    _, other, oopt = _wrapped(1, torch.bfloat16, fraction, device="cuda")
    hm.load_checkpoint(tmp_path / "ckpt", other, oopt)
    assert _train(other, oopt, batches[3:]) == want
    _same_state(other.state_dict(), model.state_dict())


def test_resume_with_states_on_nvme_and_into_another_chunk_layout(tmp_path):
    """Saved with optimizer states on NVMe, loaded into a host-only model with other chunks
    (and the reverse): per-parameter copies give the same training."""
    cfg, ref, _ = gpt_pair()
    os.makedirs(tmp_path / "nvme")
    nvme = {k: v for k, v in _nvme_kwargs(ref, tmp_path / "nvme", 4, 0.0, torch.float32).items()
            if k not in ("dtype", "device")}
    _, model, opt = _wrapped(0, **nvme)
    assert any(c.nvme is not None for c in model._heteromem.manager.chunks)
    batches = gpt_batches(cfg, 6)
    _train(model, opt, batches[:2])
    hm.save_checkpoint(tmp_path / "a", model, opt)
    want = _train(model, opt, batches[2:])
    _, other, oopt = _wrapped(1, chunk_mb=0.5, device_memory=None)
    hm.load_checkpoint(tmp_path / "a", other, oopt)
    assert _train(other, oopt, batches[2:]) == want
    hm.save_checkpoint(tmp_path / "b", other, oopt)
    _, back, bopt = _wrapped(2, **nvme)
    hm.load_checkpoint(tmp_path / "b", back, bopt)
    _same_state(back.state_dict(), other.state_dict())


def test_resume_in_a_fresh_process_is_exact(tmp_path):
    script = textwrap.dedent(f"""
        import sys, json, torch
        sys.path.insert(0, {HERE!r})
        import heteromem as hm
        from test_checkpoint import _wrapped, _train
        from wrap_helpers import gpt_batches
        mode, path = sys.argv[1], sys.argv[2]
        cfg, model, opt = _wrapped(0 if mode == "save" else 5)
        batches = gpt_batches(cfg, 8)
        if mode == "save":
            _train(model, opt, batches[:4])
            hm.save_checkpoint(path, model, opt)
        else:
            hm.load_checkpoint(path, model, opt)
        print(json.dumps(_train(model, opt, batches[4:])))
    """)
    runs = [subprocess.run([sys.executable, "-c", script, mode, str(tmp_path / "ckpt")],
                           capture_output=True, text=True, timeout=300)
            for mode in ("save", "load")]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert runs[0].stdout.splitlines()[-1] == runs[1].stdout.splitlines()[-1]


def test_flash_save_persists_in_the_background_while_training_goes_on(tmp_path):
    cfg, model, opt = _wrapped(0)
    batches = gpt_batches(cfg, 8)
    _train(model, opt, batches[:2])
    snapshot = model.state_dict()
    hm.save_checkpoint(tmp_path / "ckpt", model, opt, blocking=False)
    want = _train(model, opt, batches[2:5])  # changes the live state while it is written
    hm.wait_checkpoint()
    _, other, oopt = _wrapped(1)
    hm.load_checkpoint(tmp_path / "ckpt", other, oopt)
    _same_state(other.state_dict(), snapshot)
    assert _train(other, oopt, batches[2:5]) == want
    # A second flash save reuses the snapshot; a blocking save right after waits for it.
    hm.save_checkpoint(tmp_path / "ckpt", model, opt, blocking=False)
    hm.save_checkpoint(tmp_path / "ckpt2", model, opt)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["LATEST", "v000002"]


def test_a_failed_background_save_is_raised_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg, model, opt = _wrapped(0)
    batches = gpt_batches(cfg, 4)
    _train(model, opt, batches[:1])
    hm.save_checkpoint(tmp_path / "ckpt", model, opt)
    before = model.state_dict()
    _train(model, opt, batches[1:2])

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(layout, "publish", disk_full)
    hm.save_checkpoint(tmp_path / "ckpt", model, opt, blocking=False)
    with pytest.raises(RuntimeError, match="background checkpoint save .* failed.*No space"):
        hm.wait_checkpoint(model)
    hm.wait_checkpoint(model)  # reported once
    monkeypatch.undo()
    assert [n for n in os.listdir(tmp_path / "ckpt") if n.startswith(".tmp")] == []
    _, other, oopt = _wrapped(1)
    hm.load_checkpoint(tmp_path / "ckpt", other, oopt)
    _same_state(other.state_dict(), before)
    # The error also surfaces at the next save, which then works.
    monkeypatch.setattr(layout, "publish", disk_full)
    hm.save_checkpoint(tmp_path / "ckpt", model, opt, blocking=False)
    _PENDING[id(model._heteromem)].thread.join()
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="failed"):
        hm.save_checkpoint(tmp_path / "ckpt", model, opt)
    hm.save_checkpoint(tmp_path / "ckpt", model, opt)


def test_flash_snapshot_that_does_not_fit_host_memory_is_refused(tmp_path):
    cfg, probe, popt = _wrapped(0)
    _train(probe, popt, gpt_batches(cfg, 1))
    host = hm.report(probe).tiers["host"].peak_bytes + 4096  # training fits, a copy does not
    _, model, opt = _wrapped(0, host_memory=host)
    _train(model, opt, gpt_batches(cfg, 1))
    with pytest.raises(hm.OutOfMemory, match="flash checkpoint snapshot"):
        hm.save_checkpoint(tmp_path / "ckpt", model, opt, blocking=False)
    hm.save_checkpoint(tmp_path / "ckpt", model, opt)  # a blocking save needs no copy


def test_save_between_backward_and_step_is_refused(tmp_path):
    cfg, model, opt = _wrapped(0)
    idx, tgt = gpt_batches(cfg, 1)[0]
    model(idx, tgt).backward()
    with pytest.raises(hm.CheckpointError, match="call opt.step"):
        hm.save_checkpoint(tmp_path / "ckpt", model, opt)
    assert not os.path.exists(tmp_path / "ckpt" / "LATEST")


def as_version_2(manifest: dict) -> dict:
    """A version 3 manifest of an Adam/AdamW model as heteromem wrote it before the optimizer
    kinds (format 2): `optimizer.adamw` instead of its kind and state layout, regions without
    elements_per_item. (The chunk files are the same bytes: fp32 moments.)"""
    optimizer = manifest["optimizer"]
    assert optimizer["kind"] in ("Adam", "AdamW")
    optimizer["adamw"] = optimizer.pop("kind") == "AdamW"
    optimizer.pop("state_layout")
    for chunk in manifest["chunks"]:
        for region in chunk["regions"]:
            assert region.pop("elements_per_item") == 1
    manifest["format_version"] = 2
    return manifest


def rewrite_manifest(root, change) -> None:
    """Applies `change` to the published manifest and signs it."""
    import json

    vdir = root / layout.read_latest(str(root))["version"]
    manifest = change(json.loads((vdir / layout.MANIFEST).read_text()))
    digest = layout.write_manifest(str(vdir), manifest)
    (root / layout.LATEST).write_text(json.dumps(dict(version=vdir.name, manifest_xxh3_64=digest)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_version_2_checkpoint_still_loads(tmp_path, dtype):
    """Checkpoints written before the optimizer kinds (format 2: AdamW's fp32 moments, no kind
    or state layout recorded) load as AdamW checkpoints and resume exactly."""
    cfg, model, opt = _wrapped(0, dtype)
    batches = gpt_batches(cfg, 4)
    _train(model, opt, batches[:2])
    root = tmp_path / "ckpt"
    hm.save_checkpoint(root, model, opt)
    want = _train(model, opt, batches[2:])
    rewrite_manifest(root, as_version_2)
    _, other, oopt = _wrapped(1, dtype)
    hm.load_checkpoint(root, other, oopt)
    assert _train(other, oopt, batches[2:]) == want


def test_a_version_1_checkpoint_still_loads(tmp_path):
    """Checkpoints written before sharding (format 1: one file per chunk, regions with their
    own offsets, no parts) load as they did."""
    import json

    cfg, model, opt = _wrapped(0)
    batches = gpt_batches(cfg, 4)
    _train(model, opt, batches[:2])
    root = tmp_path / "ckpt"
    hm.save_checkpoint(root, model, opt)
    want = _train(model, opt, batches[2:])
    vdir = root / layout.read_latest(str(root))["version"]
    manifest = as_version_2(json.loads((vdir / layout.MANIFEST).read_text()))
    manifest.pop("world_size")
    manifest["format_version"] = 1
    for chunk in manifest["chunks"]:
        (part,) = chunk.pop("shards")
        offset, regions = 0, []
        for region in chunk["regions"]:
            regions.append(dict(region, offset=offset, numel=chunk["used"]))
            offset += chunk["used"] * {"float32": 4, "bfloat16": 2, "float16": 2}[region["dtype"]]
        chunk.update(file=part["file"], bytes=part["bytes"], regions=regions)
    digest = layout.write_manifest(str(vdir), manifest)
    (root / layout.LATEST).write_text(json.dumps(dict(version=vdir.name, manifest_xxh3_64=digest)))
    _, other, oopt = _wrapped(1)
    hm.load_checkpoint(root, other, oopt)
    assert _train(other, oopt, batches[2:]) == want
