"""`python -m heteromem demo` at a tiny size: it trains, prints the report and draws the memory
timeline where asked (or says why it could not)."""

from __future__ import annotations

import math
import re
import sys

import pytest

from heteromem.__main__ import main

TINY = ["demo", "--layers", "2", "--width", "64", "--vocab", "64", "--seq", "16", "--batch", "2",
        "--steps", "3", "--device", "cpu", "--dtype", "fp32"]


def test_demo_trains_and_writes_the_memory_timeline(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "timeline.png"
    assert main(TINY + ["--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert "peak" in out and str(path) in out
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_demo_without_matplotlib_still_trains(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "timeline.png"
    assert main(TINY + ["--plot", str(path)]) == 0
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not path.exists()


# Enough steps, batch and learning rate for the loss to fall clearly on the demo's task.
LEARNS = ["--steps", "30", "--batch", "8", "--lr", "1e-2"]


def _learned(out: str) -> None:
    """The demo's summary says the loss fell by a good margin, and the device tier stayed
    within its budget."""
    match = re.search(r"loss (\S+) -> (\S+) over 30 steps", out)
    assert match, out
    first, last = float(match.group(1)), float(match.group(2))
    assert math.isfinite(last) and last < 0.85 * first, (first, last)
    device = re.search(r"^device\s+(\S+ \S+)\s+(\S+ \S+)\s+(\S+ \S+)", out, re.M)
    assert device, out
    budget, peak = (_bytes(device.group(k)) for k in (1, 3))
    assert 0 < peak <= budget


def _bytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_demo_at_a_tiny_width_in_low_precision_trains(dtype, capsys):
    """A model of a few chunks: the budget floor keeps the chunks a step pins at once (the
    tied embedding's and the position embedding's, through the end of the backward)."""
    tiny = [a if a != "fp32" else dtype for a in TINY]
    assert main(tiny + LEARNS + ["--no-plot"]) == 0
    _learned(capsys.readouterr().out)


def test_demo_with_updates_during_backward_trains(capsys):
    assert main(TINY + LEARNS + ["--no-plot", "--step-in-backward"]) == 0
    _learned(capsys.readouterr().out)


@pytest.mark.parametrize("flags,problem", [
    (["--layers", "0"], "--layers must be > 0"),
    (["--budget-fraction", "1.5"], "--budget-fraction must be in"),
    (["--step-in-backward", "--dtype", "fp16"], "--step-in-backward needs"),
])
def test_demo_bad_flags_say_what_is_wrong(flags, problem, capsys):
    assert main(TINY + flags) == 2
    assert problem in capsys.readouterr().err


def test_demo_no_plot_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(TINY + ["--no-plot"]) == 0
    assert list(tmp_path.iterdir()) == []


def test_demo_under_torchrun_shards_over_two_ranks(tmp_path):
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "heteromem", *TINY, "--no-plot"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Rank 0 alone prints, once: the banner, the loss and its report.
    assert proc.stdout.count("sharded over 2 ranks") == 1
    assert "rank 0 of 2: sent" in proc.stdout and "loss" in proc.stdout
    assert list(tmp_path.iterdir()) == []
