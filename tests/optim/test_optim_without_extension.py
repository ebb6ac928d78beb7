"""heteromem.optim without the compiled extension: it imports, steps through the pure-PyTorch
references (one warning per reason, pointing at the caller) and gives the kernels' bits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from heteromem.optim import AGD, AdamW8bit

SCRIPT = """
import warnings, torch
import heteromem as hm
from heteromem.optim import AGD, AdamW8bit
assert not hm.build_info().extension_loaded
out = []
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for cls in (AGD, AdamW8bit):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(1000))
        opt = cls([p], lr=1e-2)
        for step in range(3):
            p.grad = torch.randn(1000)
            opt.step()
        out.append(p.detach())
notes = [w for w in caught if issubclass(w.category, hm.HeteromemWarning)]
assert len(notes) == 1 and "HETEROMEM_DISABLE_EXT" in str(notes[0].message), notes
assert notes[0].filename.endswith("agd.py"), notes[0].filename  # the op's caller
torch.save(out, {path!r})
"""


def test_fallback_steps_equal_the_kernels(tmp_path):
    path = str(tmp_path / "params.pt")
    env = {**os.environ, "HETEROMEM_DISABLE_EXT": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT.format(path=path))],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    fallback = torch.load(path)
    for cls, got in zip((AGD, AdamW8bit), fallback):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(1000))
        opt = cls([p], lr=1e-2)
        for step in range(3):
            p.grad = torch.randn(1000)
            opt.step()
        assert torch.equal(p.detach(), got), cls.__name__
