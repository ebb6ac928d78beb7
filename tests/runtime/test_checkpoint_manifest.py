"""A manifest whose checksum matches is still checked field by field: one written by a buggy
or different writer is refused with a CheckpointError naming the field, before anything of the
live model or optimizer changes, and training goes on as if the load was never tried."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import heteromem as hm
from heteromem.runtime.checkpoint import layout
from test_checkpoint import _train, _wrapped
from wrap_helpers import gpt_batches


def _set(path: list, value):
    def change(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return m
    return change


def _delete(path: list):
    def change(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return m
    return change


def _first_file(m):
    return next(iter(m["files"]))


# (name, change to the parsed manifest -> new manifest or raw bytes, what the error names)
MALFORMED = [
    ("not-json", lambda m: b"{not json", "not valid JSON"),
    ("a-list", lambda m: [m], "must be an object"),
    ("chunks-null", _set(["chunks"], None), "chunks must be a list"),
    ("chunk-removed", lambda m: dict(m, chunks=m["chunks"][1:]), r"params\[\d+\]\.chunk"),
    ("step-abc", _set(["params", 0, "step"], "abc"), r"params\[0\]\.step must be an integer"),
    ("step-negative", _set(["params", 0, "step"], -3), r"params\[0\]\.step must be >= 0"),
    ("no-format-version", _delete(["format_version"]), "format_version is missing"),
    ("dtype-int8", _set(["dtype"], "int8"), "dtype must be one of"),
    ("shape-mismatch", _set(["params", 0, "shape"], [7, 7, 7]), r"params\[0\]\.shape"),
    ("offset-outside", _set(["params", 0, "offset"], 10**9), r"params\[0\] .* outside"),
    ("names-empty", _set(["params", 0, "names"], []), r"params\[0\]\.names is empty"),
    ("trainable-string", _set(["params", 0, "trainable"], "yes"), "trainable must be true"),
    ("part-file-path", lambda m: _set(["chunks", 0, "shards", 0, "file"], "../../etc/passwd")(m),
     "which the files list lacks"),
    ("file-name-path", lambda m: dict(m, files={"../x": {"bytes": 1, "xxh3_64": "0"}}),
     "not a plain file name"),
    ("shard-gap", _set(["chunks", 0, "shards", 0, "lo"], 5), r"chunks\[0\]\.shards\[0\] covers"),
    ("region-unknown", _set(["chunks", 0, "regions", 0, "name"], "momentum"),
     r"regions\[0\]\.name must be one of"),
    ("lr-string", _set(["optimizer", "param_groups", 0, "lr"], "fast"), r"param_groups\[0\]"),
    ("lr-negative", _set(["optimizer", "param_groups", 0, "lr"], -1.0), r"param_groups\[0\]"),
    ("betas-short", _set(["optimizer", "param_groups", 0, "betas"], [0.9]), r"param_groups\[0\]"),
    ("groups-null", _set(["optimizer", "param_groups"], None), "param_groups must be a list"),
    ("group-index-too-big", _set(["params", 0, "group"], 9), r"params\[0\]\.group"),
    ("skipped-float", _set(["optimizer", "skipped_steps"], 1.5), "skipped_steps must be an integer"),
    ("files-missing", _delete(["files"]), "files is missing"),
    ("file-bytes-null", lambda m: _set(["files", _first_file(m), "bytes"], None)(m),
     "bytes must be an integer"),
    ("world-zero", _set(["world_size"], 0), "world_size must be >= 1"),
]


def _rewrite(root, change) -> None:
    """Applies `change` to the published manifest and signs it, as a writer with a bug would."""
    vdir = os.path.join(root, layout.read_latest(str(root))["version"])
    path = os.path.join(vdir, layout.MANIFEST)
    with open(path, "rb") as f:
        manifest = json.load(f)
    new = change(manifest)
    data = new if isinstance(new, bytes) else json.dumps(new).encode()
    with open(path, "wb") as f:
        f.write(data)
    h = layout.hasher()
    h.update(data)
    latest = layout.read_latest(str(root))
    with open(os.path.join(root, layout.LATEST), "w") as f:
        json.dump(dict(latest, manifest_xxh3_64=h.hexdigest()), f)


def test_malformed_manifests_are_refused_naming_the_field(tmp_path):
    cfg, saved, sopt = _wrapped(0)
    batches = gpt_batches(cfg, 4)
    _train(saved, sopt, batches[:2])
    hm.save_checkpoint(tmp_path / "good", saved, sopt)
    _, live, lopt = _wrapped(1)
    _, control, copt = _wrapped(1)
    _train(live, lopt, batches[:1])
    _train(control, copt, batches[:1])
    before = live.state_dict()
    groups = [dict(g) for g in lopt.param_groups]
    steps = [s.step for s in live._heteromem.slots]
    for name, change, message in MALFORMED:
        bad = tmp_path / name
        shutil.copytree(tmp_path / "good", bad)
        _rewrite(bad, change)
        with pytest.raises(hm.CheckpointError, match=message) as info:
            hm.load_checkpoint(bad, live, lopt)
        assert "Nothing was loaded" in str(info.value), name
        after = live.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before), name
        assert [dict(g) for g in lopt.param_groups] == groups, name
        assert [s.step for s in live._heteromem.slots] == steps, name
    # The untouched checkpoint still loads, and a refused load left nothing behind.
    assert _train(live, lopt, batches[1:]) == _train(control, copt, batches[1:])
    hm.load_checkpoint(tmp_path / "good", live, lopt)


def test_a_damaged_rng_or_buffer_blob_is_refused(tmp_path):
    """extra.pt passes its checksum but holds the wrong things (another writer)."""
    cfg, saved, sopt = _wrapped(0)
    _train(saved, sopt, gpt_batches(cfg, 1))
    hm.save_checkpoint(tmp_path / "good", saved, sopt)
    _, live, lopt = _wrapped(1)
    before = live.state_dict()
    rng = torch.get_rng_state()
    for name, blob in [("rng-short", dict(buffers={}, rng={"cpu": torch.zeros(3, dtype=torch.uint8)},
                                          extra=None)),
                       ("no-rng", dict(buffers={}, extra=None)),
                       ("not-a-dict", [1, 2])]:
        bad = tmp_path / name
        shutil.copytree(tmp_path / "good", bad)
        vdir = os.path.join(bad, layout.read_latest(str(bad))["version"])
        torch.save(blob, os.path.join(vdir, layout.EXTRA))
        size, digest = layout.file_digest(os.path.join(vdir, layout.EXTRA))
        _rewrite(bad, lambda m: dict(m, files=dict(m["files"], **{
            layout.EXTRA: {"bytes": size, "xxh3_64": digest}})))
        with pytest.raises(hm.CheckpointError, match="extra.pt"):
            hm.load_checkpoint(bad, live, lopt)
        after = live.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before), name
        assert torch.equal(torch.get_rng_state(), rng)
