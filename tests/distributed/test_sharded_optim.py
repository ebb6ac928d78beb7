"""heteromem.optim's optimizers taken over by hm.wrap and sharded over ranks (gloo, CPU): each
rank updates whole 256-element blocks of the 8-bit state (chunk parts start on a block), so
training over 2 ranks follows one process running the standalone optimizer on the global
batch, and a checkpoint of 8-bit state saved at 2 ranks resumes at 3 ranks (other part
boundaries) and in one process.
"""

from __future__ import annotations

import torch

import heteromem as hm
from heteromem.ops.reference import dequantize_8bit
from test_sharded import _config, _run
from wrap_helpers import (TOL, assert_losses_close, assert_params_close, gpt_batches, gpt_pair,
                          train_steps)

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


def _reference(name: str, config: dict) -> tuple[list[float], dict, dict]:
    """One process, the standalone optimizer, the whole global batch per step: the losses,
    the model's and the optimizer's state dicts."""
    cfg, ref, _ = gpt_pair()
    opt = getattr(hm.optim, name)(ref.parameters(), **KWARGS[name])
    batches = gpt_batches(cfg, config["skip"] + config["steps"], seed=1,
                          batch=config["batch"])[config["skip"]:]
    losses = train_steps(ref, opt, batches)
    return losses, ref.state_dict(), opt.state_dict()


def _moments(state: dict) -> dict[str, torch.Tensor]:
    """A parameter's moments as float32 values (8-bit codes decoded with their scales)."""
    if "exp_avg_scale" not in state:
        return {n: state[n] for n in ("exp_avg", "exp_avg_sq")}
    return {n: dequantize_8bit(state[n], state[f"{n}_scale"], signed=n == "exp_avg")
            for n in ("exp_avg", "exp_avg_sq")}


def _assert_state_close(got: dict, want: dict, tol: float) -> None:
    """The gathered state of the sharded optimizer against the standalone one's: the same
    parameters, steps, param groups and state tensors (dtypes and sizes), and moments within
    `tol` of each parameter's (relative Frobenius; 8-bit ones decoded, see PARAM_TOL)."""
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys() and got["state"]
    for key, state in want["state"].items():
        mine = got["state"][key]
        assert mine.keys() == state.keys() and mine["step"] == state["step"]
        for name, value in state.items():
            if name != "step":
                assert (mine[name].dtype, mine[name].shape) == (value.dtype, value.shape)
        for name, value in _moments(state).items():
            err = (_moments(mine)[name] - value).double().norm() / value.double().norm()
            assert err <= tol, (key, name, err.item())


def test_sharded_agd_matches_one_process_on_the_global_batch(tmp_path):
    config = _optimizer_config("AGD", state_dict=True, optimizer_state=True)
    got = _run(2, config, tmp_path)
    losses, params, state = _reference("AGD", config)
    assert_losses_close(got["losses"], losses)
    assert_params_close(torch.load(tmp_path / "params.pt"), params, tol=PARAM_TOL["AGD"])
    _assert_state_close(torch.load(tmp_path / "optimizer.pt"), state, tol=1e-4)


def test_sharded_8bit_matches_one_process_and_its_checkpoint_resumes_at_three_ranks_and_one(
        tmp_path):
    """AdamW8bit over 2 ranks for 6 steps, a checkpoint after 3: the losses, parameters and
    gathered optimizer state (opt.state_dict(), a collective) of the standalone optimizer in
    one process; the checkpoint (each rank's part of the codes and
    scales) loads at 3 ranks and in one process and goes on as the 2-rank run did."""
    ckpt = str(tmp_path / "ckpt")
    config = _optimizer_config("AdamW8bit", state_dict=True, optimizer_state=True,
                               save=dict(after=3, path=ckpt))
    first = _run(2, config, tmp_path / "two")
    losses, params, state = _reference("AdamW8bit", config)
    assert_losses_close(first["losses"], losses)
    assert_params_close(torch.load(tmp_path / "two" / "params.pt"), params,
                        tol=PARAM_TOL["AdamW8bit"])
    # (Moments: median error 2e-7, the largest 1e-3 where codes moved a step; see PARAM_TOL.)
    _assert_state_close(torch.load(tmp_path / "two" / "optimizer.pt"), state, tol=1e-2)
    for world, extra in ((3, {}), (1, dict(no_dist=True))):
        got = _run(world, _optimizer_config("AdamW8bit", steps=3, skip=3, load=ckpt, **extra),
                   tmp_path / f"resume{world}")
        assert_losses_close(got["losses"], first["losses"][3:])
