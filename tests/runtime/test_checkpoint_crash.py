"""Crash consistency: a process saving checkpoints in a loop is killed with SIGKILL at each
moment of a save that matters (while chunk files are written, before the version folder is
renamed into place, before LATEST is replaced, right after LATEST was replaced, between saves);
every time the path loads, and it holds exactly the save the moment implies, never a mix or a
damaged file.

The child marks each moment in a file and pauses there, so every kill lands where the test
chose (from a seeded generator), not wherever a timer happened to fire."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import torch

import heteromem as hm
from heteromem.runtime.checkpoint import layout
from test_checkpoint import _train, _wrapped
from wrap_helpers import gpt_batches

HERE = os.path.dirname(os.path.abspath(__file__))
# Where a kill lands, and which save the checkpoint then holds: the one being made ("new")
# or the one before it ("old").
MOMENTS = {"write": "old", "rename": "old", "latest": "old", "published": "new",
           "between": "new"}
ROUNDS = len(MOMENTS)  # each moment once, in a seeded order

CHILD = textwrap.dedent(f"""
    import os, sys, time
    sys.path.insert(0, {HERE!r})
    import heteromem as hm
    from heteromem.runtime.checkpoint import layout, save
    from test_checkpoint import _train, _wrapped
    from wrap_helpers import gpt_batches
    path, marks, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    k = first

    def mark(moment):
        with open(marks, "a") as f:
            f.write(f"{{k}} {{moment}}\\n")
        time.sleep(0.5)  # the parent kills during this pause

    write_file, publish, rename = save._write_file, layout.publish, os.rename
    def marked_write(path, parts, seen=set()):
        if k not in seen:
            seen.add(k)
            mark("write")
        return write_file(path, parts)
    def marked_rename(src, dst):
        mark("rename")
        return rename(src, dst)
    def marked_publish(root, tmp, digest):
        os.rename = marked_rename
        replace = os.replace
        def marked_replace(src, dst):
            if dst.endswith(layout.LATEST):
                mark("latest")
            return replace(src, dst)
        os.replace = marked_replace
        try:
            name = publish(root, tmp, digest)
        finally:
            os.rename, os.replace = rename, replace
        mark("published")
        return name
    save._write_file, layout.publish = marked_write, marked_publish
    cfg, model, opt = _wrapped(0)
    batches = gpt_batches(cfg, 4)
    while True:
        _train(model, opt, batches[k % 4:k % 4 + 1])
        hm.save_checkpoint(path, model, opt, extra={{"k": k}})
        mark("between")
        k += 1
""")


def _wait_for(marks: str, want: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(marks) and want in open(marks).read().splitlines():
            return
        time.sleep(0.005)
    raise AssertionError(f"the child never reached {want!r}")


def test_sigkill_at_every_moment_of_a_save_leaves_the_checkpoint_it_should(tmp_path):
    path = str(tmp_path / "ckpt")
    rng = random.Random(20261207)
    plan = list(MOMENTS) * (ROUNDS // len(MOMENTS))
    rng.shuffle(plan)
    cfg, live, opt = _wrapped(1)
    first = 0
    for moment in plan:
        marks = str(tmp_path / f"marks-{first}")
        child = subprocess.Popen([sys.executable, "-c", CHILD, path, marks, str(first)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Kill in the second save of this child, so an earlier complete one always exists.
        target = first + 1
        try:
            _wait_for(marks, f"{target} {moment}")
        except AssertionError:
            child.kill()
            raise AssertionError(child.communicate()[1][-3000:])
        child.send_signal(signal.SIGKILL)
        child.wait()
        extra = hm.load_checkpoint(path, live, opt)
        want = target if MOMENTS[moment] == "new" else target - 1
        assert extra["k"] == want, (moment, extra, want)
        first = extra["k"] + 1
    # Training goes on from what was loaded, and the next save cleans up leftovers.
    _train(live, opt, gpt_batches(cfg, 1))
    hm.save_checkpoint(path, live, opt)
    assert sorted(os.listdir(path)) == ["LATEST", layout.read_latest(path)["version"]]
    assert torch.isfinite(torch.stack([v.float().sum() for v in live.state_dict().values()])).all()
