"""Writes that hit a file-size limit (RLIMIT_FSIZE: EFBIG, as a full quota or a full disk would
fail them) in a checkpoint save and in an NVMe step: the error names the file (and the
checkpoint), nothing is half-written, and training goes on once the limit is lifted.

Each case runs in a child process: the limit is per process, and a write beyond it would
otherwise kill the test runner with SIGXFSZ."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SETUP = """
import errno, glob, os, resource, signal, sys
import torch
import heteromem as hm
from heteromem.models import GPT, GPTConfig
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of being killed
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]

def limit(nbytes):
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))

def unlimit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))

def build(**kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32))
    return hm.wrap(model, device="cpu", dtype=torch.float32, lr=1e-3, chunk_mb=0.02,
                   device_memory="60KB", **kw)

def step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 64, (2, 17), generator=g)
    loss = model(t[:, :-1], t[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()
"""


def _run(tmp_path, body: str) -> str:
    script = SETUP + f"root = {str(tmp_path)!r}\n" + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_a_blocking_save_over_the_file_size_limit_names_the_file_and_the_checkpoint(tmp_path):
    out = _run(tmp_path, """
        model, opt = build()
        step(model, opt, 0)
        ckpt = os.path.join(root, "ckpt")
        hm.save_checkpoint(ckpt, model, opt)
        first = open(os.path.join(ckpt, "LATEST")).read()
        want = [step(model, opt, s) for s in (1, 2)]
        model2, opt2 = build()
        hm.load_checkpoint(ckpt, model2, opt2)
        step(model2, opt2, 1)
        limit(4096)
        try:
            hm.save_checkpoint(ckpt, model2, opt2)
        except hm.StorageError as exc:
            assert isinstance(exc, OSError) and exc.errno == errno.EFBIG, exc
            assert ckpt in str(exc) and exc.filename and exc.filename.startswith(ckpt), exc
            assert os.path.basename(exc.filename) in str(exc), exc
            assert "previous complete one" in str(exc), exc
        else:
            raise AssertionError("the save did not fail")
        unlimit()
        assert open(os.path.join(ckpt, "LATEST")).read() == first
        assert not glob.glob(os.path.join(ckpt, ".tmp-*"))
        # Training went on; the old checkpoint still resumes exactly.
        model3, opt3 = build()
        hm.load_checkpoint(ckpt, model3, opt3)
        assert [step(model3, opt3, s) for s in (1, 2)] == want
        step(model2, opt2, 2)
        hm.save_checkpoint(ckpt, model2, opt2)
        print("ok")
    """)
    assert "ok" in out


def test_a_flash_save_over_the_file_size_limit_names_the_file(tmp_path):
    out = _run(tmp_path, """
        model, opt = build()
        step(model, opt, 0)
        ckpt = os.path.join(root, "ckpt")
        hm.save_checkpoint(ckpt, model, opt)
        limit(4096)
        hm.save_checkpoint(ckpt, model, opt, blocking=False)
        try:
            hm.wait_checkpoint()
        except RuntimeError as exc:
            assert "File too large" in str(exc) and "chunk-" in str(exc), exc
            assert isinstance(exc.__cause__, hm.StorageError), repr(exc.__cause__)
        else:
            raise AssertionError("the flash save did not fail")
        unlimit()
        model2, opt2 = build()
        hm.load_checkpoint(ckpt, model2, opt2)
        print("ok")
    """)
    assert "ok" in out


def test_an_nvme_step_over_the_file_size_limit_can_be_taken_again(tmp_path):
    out = _run(tmp_path, """
        os.mkdir(os.path.join(root, "a")); os.mkdir(os.path.join(root, "b"))
        kw = dict(host_memory="700KB", nvme_staging="200KB")
        model, opt = build(nvme_dir=os.path.join(root, "a"), **kw)
        clean, copt = build(nvme_dir=os.path.join(root, "b"), **kw)
        assert hm.report(model).tiers["nvme"].current_bytes > 0
        assert step(model, opt, 0) == step(clean, copt, 0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        g = torch.Generator().manual_seed(1)
        t = torch.randint(0, 64, (2, 17), generator=g)
        model(t[:, :-1], t[:, 1:]).backward()
        limit(8192)   # the state files are larger: the first write beyond it fails
        try:
            opt.step()
        except hm.StorageError as exc:
            assert exc.errno == errno.EFBIG and "trainable.bin" in str(exc), exc
        else:
            raise AssertionError("the step did not fail")
        unlimit()
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        opt.step(); opt.zero_grad()
        step(clean, copt, 1)
        assert step(model, opt, 2) == step(clean, copt, 2)
        print("ok")
    """)
    assert "ok" in out
