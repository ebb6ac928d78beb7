"""`make gpu-test`: on a CUDA machine, run the `cuda` tests and the benchmarks, and write one
record, bench/results/<gpu>-<date>-<commit>.json, which is committed as the project's record
of GPU truth (device, torch, build, commit, test outcome, every benchmark's statistics).

The commit comes from HETEROMEM_COMMIT when the tree has no .git (a copied working tree).
Exits non-zero when a test failed, after writing the record.

GPU time is often lent by the minute, so the run keeps to a deadline: HETEROMEM_GPU_SECONDS
(default 1800) for tests and benchmarks together. Each bench file runs in its own pytest
process, most important first, each with what is left of the deadline; a file that runs out
of time is recorded as timed out and the others keep their results. Arguments name the bench
files to run (default: all of them, in BENCH_ORDER).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commit() -> str:
    if os.environ.get("HETEROMEM_COMMIT"):
        return os.environ["HETEROMEM_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def test_summary(junit: Path) -> dict:
    if not junit.exists():
        return {"error": "pytest wrote no junit report"}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failures = [
        f"{case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:300]}"
        for case in suite.iter("testcase")
        for bad in list(case.findall("failure")) + list(case.findall("error"))
    ]
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return {"total": total, "passed": total - skipped - failed, "failed": failed,
            "skipped": skipped, "failures": failures}


# GPU targets first: the issues' GPU targets live in bench_wrap (paging vs plain training),
# bench_attention (fused attention vs SDPA flash/cuDNN) and bench_adam (CUDA op vs copy
# bandwidth); the disk benches need no GPU and come last.
BENCH_ORDER = ["bench/bench_wrap.py", "bench/bench_attention.py", "bench/bench_adam.py",
               "bench/bench_nvme_step.py", "bench/bench_nvme.py"]


def run_with_deadline(cmd: list[str], deadline: float) -> int:
    """Runs cmd in ROOT until it ends or the deadline passes; 124 when it was stopped."""
    left = deadline - time.monotonic()
    if left <= 5:
        print(f"gpu_run.py: no time left for {' '.join(cmd[3:])}", file=sys.stderr)
        return 124
    try:
        return subprocess.run(cmd, cwd=ROOT, timeout=left).returncode
    except subprocess.TimeoutExpired:
        print(f"gpu_run.py: {' '.join(cmd[3:])} stopped at the deadline", file=sys.stderr)
        return 124


def run_benches(files: list[str], tmp: Path, deadline: float) -> tuple[dict[str, int], dict | None]:
    """Each file in its own pytest run; returns (exit code per file, merged benchmark JSON)."""
    codes: dict[str, int] = {}
    merged: dict | None = None
    for k, name in enumerate(files):
        out = tmp / f"bench{k}.json"
        codes[name] = run_with_deadline([sys.executable, "-m", "pytest", name, "-q",
                                         f"--benchmark-json={out}"], deadline)
        if not out.exists():
            continue
        data = json.loads(out.read_text())
        if merged is None:
            merged = data
        else:
            merged["benchmarks"].extend(data.get("benchmarks", []))
    return codes, merged


def main() -> int:
    import torch

    import heteromem

    if not torch.cuda.is_available():
        print("gpu_run.py: no CUDA GPU visible; `make gpu-test` is for a CUDA machine", file=sys.stderr)
        return 2
    deadline = time.monotonic() + float(os.environ.get("HETEROMEM_GPU_SECONDS", "") or 1800)
    files = sys.argv[1:] or BENCH_ORDER
    gpu = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        tests_rc = run_with_deadline([sys.executable, "-m", "pytest", "-m", "cuda", "tests/",
                                      "-q", f"--junitxml={junit}"], deadline)
        tests = test_summary(junit)
        bench_codes, benchmarks = run_benches(files, Path(tmp), deadline)
    bench_rc = max(bench_codes.values(), default=0)
    now = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "device": gpu,
        "device_capability": "%d.%d" % torch.cuda.get_device_capability(0),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "build_info": {k: v for k, v in vars(heteromem.build_info()).items()},
        "commit": commit(),
        "date": now.isoformat(timespec="seconds"),
        "tests": {"exit_code": tests_rc, **tests},
        "benchmarks_exit_code": bench_rc,
        "benchmarks_exit_codes": bench_codes,
        "benchmarks": benchmarks,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = ROOT / "bench" / "results" / f"{slug}-{now:%Y%m%d}-{record['commit']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {out.relative_to(ROOT)}: tests {tests}")
    if benchmarks is not None:
        subprocess.call([sys.executable, str(ROOT / "bench" / "summarize.py"), str(out)])
    return 0 if tests_rc == 0 and bench_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
