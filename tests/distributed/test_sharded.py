"""Sharded training over torch.distributed (gloo, CPU): 2 and 3 ranks give the losses and
final parameters of one process training on the same global batch; checkpoints move between
world sizes; a rank that dies or raises makes the others fail with a clear error.

Each test starts its ranks as separate processes (tests/distributed/launch.py, as torchrun
would, plus one test through torchrun itself) running tests/distributed/worker.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from launch import WORKER, logs, run_ranks
from wrap_helpers import (TOL, assert_losses_close, assert_params_close, gpt_batches, gpt_pair,
                          paging_kwargs)

BATCH = 6  # sequences per global batch: splits evenly over 1, 2 and 3 ranks
LR, WEIGHT_DECAY = 1e-2, 0.1
# NOTE: summing a gradient over ranks adds its terms in another order than one process does,
# a rounding-level change. Where a gradient element is itself near rounding level (terms
# cancelling), Adam's g / (|g| + eps) turns that change into a visible one: with the default
# eps 1e-8, one LayerNorm bias element with |g| ~ 4e-9 (out of a median 6e-4) moved 2% differently at 3 ranks. With
# eps 1e-5 such elements take small steps (g / eps) and the comparison measures sharding, not
# the conditioning of Adam on noise. Ranks and reference use the same eps.
EPS = 1e-5


def _config(**extra) -> dict:
    _, ref, _ = gpt_pair()
    kw = paging_kwargs(ref, 4)
    # The device tier also holds the room to reduce one chunk's gradients: twice the usual
    # 40% of the parameter bytes still pages every step (asserted below).
    config = dict(chunk_mb=kw["chunk_mb"], device_memory=int(kw["device_memory"] * 2),
                  batch=BATCH, steps=6, skip=0)
    config.update(extra)
    return config


def _reference(config: dict, frozen=(), no_update_at=(), rows: slice | None = None
               ) -> tuple[list[float], dict]:
    """One process, plain torch AdamW, the whole global batch per step."""
    cfg, ref, _ = gpt_pair()
    if config.get("start_seed") is not None:
        torch.manual_seed(config["start_seed"])
        ref.load_state_dict(type(ref)(cfg).state_dict())
    for name in frozen:
        ref.get_parameter(name).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR,
                            weight_decay=WEIGHT_DECAY, eps=EPS)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
             if config.get("schedule") else None)
    accum = config.get("accum", 1)
    batches = gpt_batches(cfg, config["skip"] + config["steps"], seed=1,
                          batch=config["batch"] * accum)[config["skip"]:]
    losses = []
    for idx, tgt in batches:
        total = 0.0
        for micro in range(accum):
            take = slice(micro * config["batch"], (micro + 1) * config["batch"])
            if rows is not None:
                take = slice(take.start + rows.start, take.start + rows.stop)
            loss = ref(idx[take], tgt[take]) / accum
            loss.backward()
            total += loss.item()
        if config.get("clip"):
            torch.nn.utils.clip_grad_norm_(ref.parameters(), config["clip"])
        if len(losses) not in no_update_at:
            opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        losses.append(total)
    return losses, ref.state_dict()


def _run(world: int, config: dict, out: Path) -> dict:
    codes = run_ranks(world, config, out)
    assert codes == [0] * world, logs(out)
    return json.loads((out / "result.json").read_text())


def _reports(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"report{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_training_matches_one_process_on_the_global_batch(world, tmp_path):
    config = _config(state_dict=True, export=True)
    got = _run(world, config, tmp_path)
    losses, params = _reference(config)
    assert_losses_close(got["losses"], losses)
    assert_params_close(torch.load(tmp_path / "params.pt"), params)
    # export_safetensors gathers chunk by chunk; rank 0 writes the tied weight once.
    exported = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert_params_close({**exported, "lm_head.weight": exported["wte.weight"]}, params)
    reports = _reports(tmp_path, world)
    for r, rep in enumerate(reports):
        assert rep["rank"] == r and rep["world_size"] == world
        assert rep["peak_device"] <= rep["budget_device"]
        assert rep["bytes_sent"] > 0 and rep["bytes_received"] > 0
    # Each rank holds 1/world of the host state (fp32: parameters = master, two moments, the
    # reduced gradient: 16 bytes a parameter), plus the padding that makes parts equal.
    params = sum(p.numel() for p in gpt_pair()[1].parameters())
    for rep in reports:
        assert rep["host_current"] < 16 * params / world * 1.05


def test_clipping_accumulation_schedule_and_frozen_parameters_over_three_ranks(tmp_path):
    frozen = ["wpe.weight", "blocks.0.ln1.weight"]
    config = _config(state_dict=True, clip=0.5, accum=2, schedule=True, frozen=frozen)
    got = _run(3, config, tmp_path)
    losses, params = _reference(config, frozen)
    assert_losses_close(got["losses"], losses)
    assert_params_close(torch.load(tmp_path / "params.pt"), params)


def test_checkpointing_kept_modules_inference_and_load_state_dict_over_two_ranks(tmp_path):
    """Activation checkpointing (recomputation gathers again), a module kept on the device,
    no_grad inference between steps, and load_state_dict of full tensors after wrapping
    (each rank takes its parts)."""
    config = _config(state_dict=True, checkpoint=True, keep=["ln_f"], eval=True, start_seed=5)
    got = _run(2, config, tmp_path)
    losses, params = _reference(config)
    assert_losses_close(got["losses"], losses)
    assert_params_close(torch.load(tmp_path / "params.pt"), params)


def test_optimizer_states_on_nvme_per_rank(tmp_path):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    config = _config(state_dict=True, host_memory=420_000, nvme_dir=str(nvme), steps=3)
    got = _run(2, config, tmp_path / "run")
    losses, params = _reference(config)
    assert_losses_close(got["losses"], losses)
    assert_params_close(torch.load(tmp_path / "run" / "params.pt"), params)
    for rep in _reports(tmp_path / "run", 2):
        assert rep["nvme_peak"] > 0
    # Each rank's files went to a folder of its own (removed when the model is gone).
    assert sorted(p.name for p in nvme.iterdir()) == ["rank0", "rank1"]


def test_an_nvme_fault_on_one_rank_undoes_the_step_on_every_rank(tmp_path):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    config = _config(state_dict=True, host_memory=420_000, nvme_dir=str(nvme), steps=4,
                     nvme_fault=dict(rank=1, step=2, op="write", errno=28))
    got = _run(2, config, tmp_path / "run")
    reports = _reports(tmp_path / "run", 2)
    # Rank 1's write failed (ENOSPC); rank 0's succeeded but was not committed: both raise,
    # and both go on from the state before that step, as a run that skipped its update.
    assert [f["errno"] for f in reports[1]["faults"]] == [28]
    assert [f["errno"] for f in reports[0]["faults"]] == [5]
    assert "rank 1" in reports[0]["faults"][0]["message"]
    assert [f["step"] for r in reports for f in r["faults"]] == [2, 2]
    losses, params = _reference(config, no_update_at=(2,))
    assert_losses_close(got["losses"], losses)
    assert_params_close(torch.load(tmp_path / "run" / "params.pt"), params)


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    config = _config(dtype="float16", steps=4, overflow_at=[1, 2], state_dict=True)
    got = _run(2, config, tmp_path)
    reports = _reports(tmp_path, 2)
    assert [rep["skipped"] for rep in reports] == [[0, 0, 1, 0]] * 2
    assert reports[0]["scale"] == reports[1]["scale"] == 2.0 ** 15
    # The same fp16 training in one process, overflowing at the same step: the same losses
    # and parameters (to the rounding of summing gradients over ranks), so the skipped step
    # changed nothing on either rank and the others trained as usual.
    one = _run(1, dict(config, overflow_at=[0, 2]), tmp_path / "one")
    assert [x for k, x in enumerate(got["losses"]) if k != 2] == pytest.approx(
        [x for k, x in enumerate(one["losses"]) if k != 2], rel=1e-3)
    assert_params_close(torch.load(tmp_path / "params.pt"),
                        torch.load(tmp_path / "one" / "params.pt"), tol=1e-2)


def test_checkpoint_saved_at_two_ranks_resumes_at_two_three_and_one(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    # Flash save after 3 steps, training on while it is written.
    first = _run(2, _config(steps=6, save=dict(after=3, path=ckpt, blocking=False),
                            schedule=True), tmp_path / "two")
    names = sorted(p.name for p in next((tmp_path / "ckpt").glob("v*")).iterdir())
    assert "chunk-00000.rank01.bin" in names and "extra.rank01.pt" in names
    for world, extra in ((2, {}), (3, {}), (1, dict(no_dist=True))):
        got = _run(world, _config(steps=3, skip=3, load=ckpt, schedule=True, **extra),
                   tmp_path / f"resume{world}")
        assert_losses_close(got["losses"], first["losses"][3:])
        if world == 2:  # the same ranks, the same parts, the same sums: bit for bit
            assert got["losses"] == first["losses"][3:]


def test_a_rank_failing_to_write_its_part_fails_the_save_on_every_rank(tmp_path):
    from heteromem.runtime.checkpoint import layout

    ckpt = tmp_path / "ckpt"
    config = _config(steps=3, save=dict(after=1, path=str(ckpt)),
                     broken_save=dict(after=2, rank=1, path=str(ckpt)))
    _run(2, config, tmp_path / "run")
    reports = _reports(tmp_path / "run", 2)
    for rep in reports:
        (fault,) = rep["faults"]
        assert "rank 1 could not write its part" in fault["message"]
        assert "No space left" in fault["message"]
    # The first save stays the published one, with nothing left of the failed one.
    assert layout.read_latest(str(ckpt))["version"] == "v000001"
    assert sorted(p.name for p in ckpt.iterdir()) == ["LATEST", "v000001"]


def test_a_damaged_part_makes_every_rank_refuse_the_load(tmp_path):
    ckpt = tmp_path / "ckpt"
    _run(2, _config(steps=2, save=dict(after=2, path=str(ckpt))), tmp_path / "save")
    part = next(ckpt.glob("v*/chunk-00001.rank01.bin"))
    data = bytearray(part.read_bytes())
    data[7] ^= 0xFF
    part.write_bytes(bytes(data))
    out = tmp_path / "load"
    codes = run_ranks(2, _config(steps=1, load=str(ckpt)), out)
    # Only rank 1 reads that part, yet both refuse, naming it.
    assert codes == [1, 1], logs(out)
    for rank in range(2):
        text = (out / f"rank{rank}.log").read_text()
        assert "CheckpointError" in text and "chunk-00001.rank01.bin" in text, text[-2000:]


def test_a_process_group_of_one_rank_wraps_unsharded(tmp_path):
    """process_group=<a group of one rank>: every rank trains a model of its own, on its own
    rows, with no collectives."""
    config = _config(steps=3, group_size=1, state_dict=True)
    _run(2, config, tmp_path)
    for rep in _reports(tmp_path, 2):
        assert rep["world_size"] == 1 and rep["bytes_sent"] == 0
    # Rank 0 trained alone on the first half of every global batch.
    _, params = _reference(config, rows=slice(0, BATCH // 2))
    assert_params_close(torch.load(tmp_path / "params.pt"), params)


def test_ranks_wrapping_with_different_options_are_refused(tmp_path):
    config = _config(steps=1, rank_overrides={"1": {"max_grad_norm": 2.0}})
    codes = run_ranks(2, config, tmp_path)
    assert codes == [1, 1], logs(tmp_path)
    for rank, other in ((0, 1), (1, 0)):
        text = (tmp_path / f"rank{rank}.log").read_text()
        assert f"rank {other} passed other wrap options than rank {rank}" in text, text[-2000:]


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_a_rank_that_dies_or_raises_fails_the_others_with_a_clear_error(how, tmp_path):
    timeout = 30
    codes = run_ranks(2, _config(steps=5, die=dict(rank=1, step=2, how=how), timeout=timeout),
                      tmp_path, timeout=120)
    assert codes[0] == 0 and codes[1] != 0, logs(tmp_path)
    error = json.loads((tmp_path / "error0.json").read_text())
    # (run_ranks fails the test if rank 0 hangs instead of raising.)
    assert "rank 0 of 2" in error["message"] and "resume" in error["message"]


def test_launched_with_torchrun(tmp_path):
    config = _config(steps=2)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), json.dumps(config), str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses, _ = _reference(config)
    assert_losses_close(json.loads((tmp_path / "result.json").read_text())["losses"], losses)
