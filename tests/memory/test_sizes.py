"""Memory sizes as users write them: ints are bytes, strings carry a unit; KB/MB/GB/TB are
powers of 1000 and KiB/MiB/GiB/TiB powers of 1024, as on disk labels and in nvidia-smi."""

from __future__ import annotations

import pytest
import torch

import heteromem as hm
from heteromem.memory.sizes import parse_size
from heteromem.models import GPT, GPTConfig


@pytest.mark.parametrize("text,expected", [
    ("20GiB", 20 * 2**30),
    ("512MB", 512 * 10**6),
    ("512MiB", 512 * 2**20),
    ("1.5GiB", 3 * 2**29),
    ("64 KiB", 64 * 1024),
    ("2tb", 2 * 10**12),
    ("100", 100),
    ("100B", 100),
    (" 3G ", 3 * 10**9),
    ("1e3KB", 10**6),
    (1024, 1024),
    (1.5 * 2**20, 3 * 2**19),
])
def test_parse_size(text, expected):
    assert parse_size(text, "device_memory") == expected


def test_none_means_no_budget():
    assert parse_size(None, "host_memory") is None


@pytest.mark.parametrize("value,exc", [
    ("20XB", ValueError), ("abc", ValueError), ("GiB", ValueError), ("1..5GB", ValueError),
    (-1, ValueError), (0, ValueError), ("0MB", ValueError), (float("inf"), ValueError),
    (float("nan"), ValueError), (True, TypeError), (b"1GB", TypeError), (object(), TypeError),
])
def test_bad_sizes_name_the_argument(value, exc):
    with pytest.raises(exc, match="host_memory"):
        parse_size(value, "host_memory")


def test_fractional_chunk_mb_sets_the_slab_size():
    """chunk_mb is a float: 0.25 MiB chunks of fp32 are 2**18 bytes (65536 elements)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    model, _ = hm.wrap(model, device="cpu", dtype=torch.float32, chunk_mb=0.25)
    report = hm.report(model)
    assert report.chunk_bytes == 2**18
    assert all(c.capacity == 2**16 for c in model._heteromem.manager.chunks)
