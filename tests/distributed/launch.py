"""Starting N ranks of a script the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR/PORT in
the environment), but without torchrun's habit of killing every rank when one exits: the
failure tests need to see what the surviving ranks do."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, config: dict, out: Path, timeout: float = 300) -> list[int]:
    """Runs worker.py on `world` ranks with `config` (JSON) and results under `out`; returns
    the exit codes. Each rank's output goes to out/rank<r>.log."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        log = open(out / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), json.dumps(config), str(out)],
                                       env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    try:
        for proc, log in procs:
            codes.append(proc.wait(timeout=timeout))
            log.close()
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                log.close()
    return codes


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("rank*.log")))
