"""Shared test setup: tests marked `cuda` run only where a CUDA GPU is present."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # NOTE: is_available() does not create a CUDA context, so CPU-only runs stay CUDA-free.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run `make gpu-test` on a CUDA machine")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
