"""Refused loads: a damaged, incomplete or foreign checkpoint raises a clear error before any
tensor of the live model changes, and training then goes on exactly as if nothing happened."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import heteromem as hm
from heteromem.runtime.checkpoint import layout
from test_checkpoint import _train, _wrapped
from wrap_helpers import gpt_batches, gpt_pair, paging_kwargs


def _version_dir(root) -> str:
    return os.path.join(root, layout.read_latest(str(root))["version"])


def _truncate(root) -> None:
    path = os.path.join(_version_dir(root), layout.chunk_file(1))
    os.truncate(path, os.path.getsize(path) - 100)


def _flip_byte(root) -> None:
    path = os.path.join(_version_dir(root), layout.chunk_file(2))
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def _remove_chunk(root) -> None:
    os.remove(os.path.join(_version_dir(root), layout.chunk_file(0)))


def _flip_manifest(root) -> None:
    path = os.path.join(_version_dir(root), layout.MANIFEST)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def _future_version(root) -> None:
    """A well-formed checkpoint of a format this heteromem does not know."""
    vdir = _version_dir(root)
    manifest = json.load(open(os.path.join(vdir, layout.MANIFEST)))
    manifest["format_version"] = 99
    digest = layout.write_manifest(vdir, manifest)
    latest = layout.read_latest(str(root))
    json.dump(dict(latest, manifest_xxh3_64=digest), open(os.path.join(root, layout.LATEST), "w"))


def _no_latest(root) -> None:
    os.remove(os.path.join(root, layout.LATEST))


CORRUPTIONS = [
    (_truncate, hm.CheckpointError, "truncated"),
    (_flip_byte, hm.CheckpointError, "does not match its checksum"),
    (_remove_chunk, FileNotFoundError, "is missing"),
    (_flip_manifest, hm.CheckpointError, "manifest does not match its checksum"),
    (_future_version, hm.CheckpointError, "format version 99"),
    (_no_latest, hm.CheckpointError, "no complete checkpoint"),
]


def test_damaged_checkpoints_are_refused_and_change_nothing(tmp_path):
    cfg, saved, sopt = _wrapped(0)
    batches = gpt_batches(cfg, 5)
    _train(saved, sopt, batches[:2])
    hm.save_checkpoint(tmp_path / "good", saved, sopt)
    _, live, lopt = _wrapped(1)
    _, control, copt = _wrapped(1)
    _train(live, lopt, batches[:1])
    _train(control, copt, batches[:1])
    before = live.state_dict()
    for corrupt, error, message in CORRUPTIONS:
        bad = tmp_path / corrupt.__name__
        shutil.copytree(tmp_path / "good", bad)
        corrupt(bad)
        with pytest.raises(error, match=message):
            hm.load_checkpoint(bad, live, lopt)
        after = live.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before), corrupt.__name__
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        hm.load_checkpoint(tmp_path / "nowhere", live, lopt)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(hm.CheckpointError, match="is a file"):
        hm.load_checkpoint(tmp_path / "a-file", live, lopt)
    with pytest.raises(hm.CheckpointError, match="is a file"):
        hm.save_checkpoint(tmp_path / "a-file", live, lopt)
    # Training goes on exactly as in a model that never saw a refused load.
    assert _train(live, lopt, batches[1:]) == _train(control, copt, batches[1:])


def _foreign(kind: str):
    """A wrapped model that differs from `_wrapped`'s in one way."""
    if kind == "dtype":
        return _wrapped(1, dtype=torch.bfloat16)[1:]
    if kind == "groups":
        cfg, ref, model = gpt_pair()
        model, opt = hm.wrap(model, torch.optim.AdamW(model.parameters()), device="cpu",
                             dtype=torch.float32, **paging_kwargs(ref, 4))
        return model, opt
    overrides = dict(names=dict(n_layer=3), shapes=dict(n_embd=48))[kind]
    cfg, ref, model = gpt_pair(**overrides)
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                             {"params": [p for p in model.parameters() if p.dim() < 2]}])
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, **paging_kwargs(ref, 4))
    return model, opt


@pytest.mark.parametrize("kind,message", [
    ("names", "saved from another model"), ("shapes", "was saved as float32"),
    ("dtype", "dtype=float32"), ("groups", "param group")])
def test_a_checkpoint_of_another_model_is_refused(tmp_path, kind, message):
    cfg, saved, sopt = _wrapped(0)
    _train(saved, sopt, gpt_batches(cfg, 1))
    hm.save_checkpoint(tmp_path / "ckpt", saved, sopt)
    model, opt = _foreign(kind)
    before = model.state_dict()
    with pytest.raises(hm.CheckpointError, match=message):
        hm.load_checkpoint(tmp_path / "ckpt", model, opt)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_wrong_model_or_optimizer_arguments(tmp_path):
    cfg, model, opt = _wrapped(0)
    with pytest.raises(TypeError, match="not wrapped by heteromem"):
        hm.save_checkpoint(tmp_path / "c", torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="not the one hm.wrap returned"):
        hm.save_checkpoint(tmp_path / "c", model, torch.optim.SGD([torch.zeros(1)], lr=1))
    with pytest.raises(TypeError, match="path must be"):
        hm.save_checkpoint(3, model, opt)
