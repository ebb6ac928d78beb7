"""Crash consistency: a process saving checkpoints in a loop is killed with SIGKILL at random
moments; every time, the path loads, and it holds the last save that returned or the one in
progress, never a mix or a damaged file."""

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
from test_checkpoint import _train, _wrapped
from wrap_helpers import gpt_batches

HERE = os.path.dirname(os.path.abspath(__file__))
ROUNDS = 5

CHILD = textwrap.dedent(f"""
    import os, sys
    sys.path.insert(0, {HERE!r})
    import heteromem as hm
    from test_checkpoint import _train, _wrapped
    from wrap_helpers import gpt_batches
    path, progress, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg, model, opt = _wrapped(0)
    batches = gpt_batches(cfg, 4)
    print("ready", flush=True)
    k = first
    while True:
        _train(model, opt, batches[k % 4:k % 4 + 1])
        hm.save_checkpoint(path, model, opt, extra={{"k": k}})
        with open(progress + ".tmp", "w") as f:
            f.write(str(k))
        os.replace(progress + ".tmp", progress)
        k += 1
""")


def _saved_k(progress: str) -> int | None:
    try:
        return int(open(progress).read())
    except FileNotFoundError:
        return None


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    path, progress = str(tmp_path / "ckpt"), str(tmp_path / "progress")
    rng = random.Random()
    delays = []
    first = 0
    cfg, live, opt = _wrapped(1)
    for _ in range(ROUNDS):
        child = subprocess.Popen([sys.executable, "-c", CHILD, path, progress, str(first)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        delays.append(rng.uniform(0.05, 1.5))
        time.sleep(delays[-1])
        child.send_signal(signal.SIGKILL)
        child.wait()
        done = _saved_k(progress)
        if done is None and not os.path.exists(os.path.join(path, "LATEST")):
            continue  # killed before its first save completed: nothing to load yet
        extra = hm.load_checkpoint(path, live, opt)
        # The last save that returned, or the one in progress if it got published.
        allowed = {done, (done if done is not None else first - 1) + 1}
        assert extra["k"] in allowed, (extra, done, delays)
        first = extra["k"] + 1
    # Training goes on from what was loaded, and the next save cleans up leftovers.
    _train(live, opt, gpt_batches(cfg, 1))
    hm.save_checkpoint(path, live, opt)
    assert sorted(n for n in os.listdir(path)) == ["LATEST", hm_version(path)]
    assert torch.isfinite(torch.stack([v.float().sum() for v in live.state_dict().values()])).all()


def hm_version(path: str) -> str:
    from heteromem.runtime.checkpoint import layout
    return layout.read_latest(path)["version"]
