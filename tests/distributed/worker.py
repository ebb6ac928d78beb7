"""One rank of a sharded training run, driven by a JSON config (see test_sharded.py).

argv: <config json> <output folder>. Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
as torchrun sets them; with "no_dist" the run is a single process without torch.distributed.
Rank 0 writes result.json (the global losses, and what the run saw); ranks write
report<r>.json; "state_dict" makes rank 0 write the gathered full state dict to params.pt,
"optimizer_state" the gathered opt.state_dict() to optimizer.pt.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "runtime"))

import heteromem as hm  # noqa: E402
from wrap_helpers import gpt_batches, gpt_pair  # noqa: E402


def main() -> None:
    config = json.loads(sys.argv[1])
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    if config.get("no_dist"):
        rank, world = 0, 1
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(
            seconds=config.get("timeout", 60)))
        rank, world = dist.get_rank(), dist.get_world_size()

    cfg, model, _ = gpt_pair(checkpoint=config.get("checkpoint", False))
    start = None
    if config.get("start_seed") is not None:  # loaded through load_state_dict after wrapping
        torch.manual_seed(config["start_seed"])
        start = type(model)(cfg).state_dict()
    for name in config.get("frozen", []):
        model.get_parameter(name).requires_grad_(False)
    dtype = getattr(torch, config.get("dtype", "float32"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.get("optimizer"):  # a heteromem.optim class by name, with its keyword arguments
        opt = getattr(hm.optim, config["optimizer"])(trainable, **config["optimizer_kwargs"])
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1,
                                eps=1e-5)  # see EPS in test_sharded.py
    kwargs = dict(device="cpu", dtype=dtype, chunk_mb=config["chunk_mb"],
                  device_memory=config["device_memory"],
                  max_grad_norm=config.get("clip"), keep_on_device=config.get("keep", ()))
    kwargs.update(config.get("rank_overrides", {}).get(str(rank), {}))
    if config.get("group_size"):  # shard over subgroups of this size instead of the world
        kwargs["process_group"], _ = dist.new_subgroups(config["group_size"])
    if config.get("host_memory"):
        kwargs.update(host_memory=config["host_memory"], nvme_dir=config["nvme_dir"])
    model, opt = hm.wrap(model, opt, **kwargs)
    if start is not None:
        model.load_state_dict(start)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
                 if config.get("schedule") else None)

    if config.get("load"):
        extra = hm.load_checkpoint(config["load"], model, opt)
        if scheduler is not None:
            scheduler.load_state_dict(extra["scheduler"])

    accum = config.get("accum", 1)
    batches = gpt_batches(cfg, config["skip"] + config["steps"], seed=1,
                          batch=config["batch"] * accum)[config["skip"]:]
    per_rank = config["batch"] // world
    losses, skipped, faults = [], [], []
    started = time.monotonic()
    try:
        for step, (idx, tgt) in enumerate(batches):
            die = config.get("die")
            if die and die["rank"] == rank and die["step"] == step:
                if die["how"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("this rank fails on purpose")
            total = 0.0
            for micro in range(accum):
                rows = slice(micro * config["batch"] + rank * per_rank,
                             micro * config["batch"] + (rank + 1) * per_rank)
                loss = model(idx[rows], tgt[rows]) / accum
                if config.get("overflow_at") == [rank, step]:
                    loss = loss * float("inf")
                opt.backward(loss)
                total += loss.item()
            before = opt.skipped_steps
            fault = config.get("nvme_fault")
            if fault and fault["step"] == step and fault["rank"] == rank:
                model._heteromem.manager.nvme.engine.inject_fault(fault["op"], fault["errno"], 1)
            try:
                opt.step()
            except OSError as exc:  # an NVMe fault, here or on another rank: nothing changed
                faults.append(dict(step=step, errno=exc.errno, message=str(exc)))
                model._heteromem.manager.nvme.engine.clear_faults()
            opt.zero_grad()
            if scheduler is not None:
                scheduler.step()
            skipped.append(opt.skipped_steps - before)
            if config.get("eval"):  # inference between steps gathers chunks too
                model.eval()
                with torch.no_grad():
                    model(idx[:1], tgt[:1])
                model.train()
            if world > 1:
                t = torch.tensor([total], dtype=torch.float64)
                dist.all_reduce(t)
                total = t.item() / world
            losses.append(total)
            broken = config.get("broken_save")
            if broken and step + 1 == broken["after"]:
                if rank == broken["rank"]:  # this rank's disk is full
                    from heteromem.runtime.checkpoint import save as save_module

                    def full(path, parts):
                        raise OSError(28, "No space left on device", path)
                    save_module._write_file = full
                try:
                    hm.save_checkpoint(broken["path"], model, opt)
                except RuntimeError as exc:
                    faults.append(dict(step=step, errno=None, message=str(exc)))
            if config.get("save") and step + 1 == config["save"]["after"]:
                # A flash save goes on in the background while the next steps train.
                hm.save_checkpoint(config["save"]["path"], model, opt,
                                   blocking=config["save"].get("blocking", True),
                                   extra={"scheduler": scheduler.state_dict() if scheduler else None})
        hm.wait_checkpoint(model)
    except hm.DistributedError as exc:
        (out / f"error{rank}.json").write_text(json.dumps(
            dict(message=str(exc), seconds=time.monotonic() - started)))
        # NOTE: as docs/distributed.md tells users: a process that exits with its gloo groups
        # alive can abort in their teardown ("terminate called without an active exception",
        # pytorch/pytorch#190489). Even after destroy_process_group() the abort was seen, rarely
        # and only under load (twice in ~30 runs of the suite): gloo's threads still talking to
        # the dead peer. What this test checks (the clear error above) is written by now, so
        # the process leaves without running torch's teardown.
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    report = hm.report(model)
    (out / f"report{rank}.json").write_text(json.dumps(dict(
        peak_device=report.tiers["device"].peak_bytes,
        budget_device=report.tiers["device"].budget_bytes,
        host_current=report.tiers["host"].current_bytes,
        nvme_peak=report.tiers["nvme"].peak_bytes,
        bytes_sent=report.bytes_sent, bytes_received=report.bytes_received,
        rank=report.rank, world_size=report.world_size, chunks=report.chunks,
        skipped=skipped, faults=faults, scale=opt.scaler.scale if opt.scaler is not None else None,
        text=str(report))))
    if config.get("state_dict"):
        state = model.state_dict()  # collective: every rank gathers
        if rank == 0:
            torch.save(state, out / "params.pt")
    if config.get("optimizer_state"):
        state = opt.state_dict()  # collective too
        if rank == 0:
            torch.save(state, out / "optimizer.pt")
    if config.get("export"):
        hm.export_safetensors(out / "model.safetensors", model)
    if rank == 0:
        (out / "result.json").write_text(json.dumps(dict(
            losses=losses, skipped=skipped,
            scale=opt.scaler.scale if opt.scaler is not None else None)))
    if world > 1 and not config.get("no_dist"):
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except BaseException:  # noqa: BLE001
        # NOTE: exit 1 with the traceback, without torch's teardown of gloo groups that may
        # still talk to a peer that is gone, which can abort instead (pytorch/pytorch#190489;
        # seen under load when every rank refused a load).
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
