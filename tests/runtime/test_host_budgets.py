"""A host budget `hm.wrap` accepts holds for the whole run, and a larger budget never fails
where a smaller one works: swept directly, with and without NVMe, with gradient accumulation
(the case that used to fail in the first iteration), the first iteration's re-packing, a flash
checkpoint refused cleanly when it does not fit, and the chunks' placement across the sweep."""

from __future__ import annotations

import pytest
import torch

import heteromem as hm
from wrap_helpers import gpt_batches, gpt_pair, paging_kwargs, param_bytes, train_accumulating


def _train(model, opt, cfg, steps: int = 3, accumulate: int = 2) -> list[float]:
    return train_accumulating(model, opt, gpt_batches(cfg, steps, batch=2 * accumulate),
                              accumulate)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nvme", [False, True], ids=["host-only", "nvme"])
def test_a_sweep_of_host_budgets(tmp_path, dtype, nvme):
    cfg, ref, _ = gpt_pair()
    elem = torch.empty((), dtype=dtype).element_size()
    kwargs = paging_kwargs(ref, elem)
    state = param_bytes(ref, elem + (8 if dtype == torch.float32 else 12))
    accepted, refused, on_nvme = [], [], []
    want = None
    for k, fraction in enumerate([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 6.0, 8.0]):
        budget = int(state * fraction)
        folder = tmp_path / f"nvme{k}"
        folder.mkdir()
        extra = dict(nvme_dir=str(folder), nvme_staging=None) if nvme else {}
        _, _, model = gpt_pair()
        try:
            model, opt = hm.wrap(model, device="cpu", dtype=dtype, lr=3e-3,
                                 host_memory=budget, **kwargs, **extra)
        except hm.OutOfMemory as exc:
            assert exc.tier == "host", exc
            assert not accepted, f"{fraction}x refused after {accepted[0]}x worked"
            refused.append(fraction)
            continue
        losses = _train(model, opt, cfg)
        report = hm.report(model)
        host = report.tiers["host"]
        assert host.peak_bytes <= host.budget_bytes == budget
        # Whatever the placement, the numbers are the same (NVMe only moves bytes).
        want = want or losses
        assert losses == want, (fraction, losses, want)
        accepted.append(fraction)
        on_nvme.append(report.nvme_chunks)
        # A flash checkpoint takes host room the plan did not promise: refused with advice
        # when it does not fit, never breaking training afterwards.
        try:
            hm.save_checkpoint(tmp_path / f"ckpt{k}", model, opt, blocking=False)
            hm.wait_checkpoint()
        except hm.OutOfMemory as exc:
            assert exc.tier == "host" and "blocking=True" in str(exc)
        _train(model, opt, cfg, steps=1)
    assert accepted and refused, (accepted, refused)
    if nvme:
        # Small budgets put chunks on NVMe, large ones keep everything on the host.
        assert on_nvme[0] > 0 and on_nvme[-1] == 0, on_nvme
        assert on_nvme == sorted(on_nvme, reverse=True), on_nvme
