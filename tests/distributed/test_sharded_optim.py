"""heteromem.optim's optimizers taken over by hm.wrap and sharded over ranks (gloo, CPU): each
rank updates whole 256-element blocks of the 8-bit state (chunk parts start on a block), so
training over 2 ranks follows one process running the standalone optimizer on the global
batch, and a checkpoint of 8-bit state saved at 2 ranks resumes at 3 ranks (other part
boundaries) and in one process.
"""

from __future__ import annotations

import torch

import heteromem as hm
from test_sharded import _config, _run
from wrap_helpers import TOL, assert_losses_close, assert_params_close, gpt_batches, gpt_pair

KWARGS = {"AGD": dict(lr=1e-3, weight_decay=0.1), "AdamW8bit": dict(lr=3e-3, weight_decay=0.1)}
# NOTE: summing gradients over ranks rounds differently from one process (test_sharded.py).
# fp32 moments carry that rounding-level change on as such (TOL). The 8-bit moments round
# deterministically to codes 3% apart, so a rounding-level change of a gradient moves the odd
# element's stored moment by a whole code step, and that element's update by up to 3%: a
# tensor then differs by ~1e-4 of its norm (6e-5 seen), far below what a wrong block (a
# misplaced scale, a part that splits a block) gives, which is a wrong update of 256 elements.
PARAM_TOL = {"AGD": TOL, "AdamW8bit": 1e-3}


def _optimizer_config(name: str, **extra) -> dict:
    return _config(optimizer=name, optimizer_kwargs=KWARGS[name], **extra)


def _reference(name: str, config: dict) -> tuple[list[float], dict]:
    """One process, the standalone optimizer, the whole global batch per step."""
    cfg, ref, _ = gpt_pair()
    opt = getattr(hm.optim, name)(ref.parameters(), **KWARGS[name])
    batches = gpt_batches(cfg, config["skip"] + config["steps"], seed=1,
                          batch=config["batch"])[config["skip"]:]
    losses = []
    for idx, tgt in batches:
        loss = ref(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, ref.state_dict()


def test_sharded_agd_matches_one_process_on_the_global_batch(tmp_path):
    config = _optimizer_config("AGD", state_dict=True)
    got = _run(2, config, tmp_path)
    losses, params = _reference("AGD", config)
    assert_losses_close(got["losses"], losses)
    assert_params_close(torch.load(tmp_path / "params.pt"), params, tol=PARAM_TOL["AGD"])


def test_sharded_8bit_matches_one_process_and_its_checkpoint_resumes_at_three_ranks_and_one(
        tmp_path):
    """AdamW8bit over 2 ranks for 6 steps, a checkpoint after 3: the losses and parameters of
    the standalone optimizer in one process; the checkpoint (each rank's part of the codes and
    scales) loads at 3 ranks and in one process and goes on as the 2-rank run did."""
    ckpt = str(tmp_path / "ckpt")
    config = _optimizer_config("AdamW8bit", state_dict=True, save=dict(after=3, path=ckpt))
    first = _run(2, config, tmp_path / "two")
    losses, params = _reference("AdamW8bit", config)
    assert_losses_close(first["losses"], losses)
    assert_params_close(torch.load(tmp_path / "two" / "params.pt"), params,
                        tol=PARAM_TOL["AdamW8bit"])
    for world, extra in ((3, {}), (1, dict(no_dist=True))):
        got = _run(world, _optimizer_config("AdamW8bit", steps=3, skip=3, load=ckpt, **extra),
                   tmp_path / f"resume{world}")
        assert_losses_close(got["losses"], first["losses"][3:])
