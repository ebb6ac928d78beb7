"""`make gpu-test`: on a CUDA machine, run the `cuda` tests and the benchmarks, and write one
record, bench/results/<gpu>-<date>-<commit>.json, which is committed as the project's record
of GPU truth (device, torch, build, commit, test outcome, every benchmark's statistics).

The commit comes from HETEROMEM_COMMIT when the tree has no .git (a copied working tree).
Exits non-zero when a test failed, after writing the record.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
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


def main() -> int:
    import torch

    import heteromem

    if not torch.cuda.is_available():
        print("gpu_run.py: no CUDA GPU visible; `make gpu-test` is for a CUDA machine", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        junit, bench_json = Path(tmp) / "junit.xml", Path(tmp) / "bench.json"
        tests_rc = subprocess.call([sys.executable, "-m", "pytest", "-m", "cuda", "tests/", "-q",
                                    f"--junitxml={junit}"], cwd=ROOT)
        bench_rc = subprocess.call([sys.executable, "-m", "pytest", "bench/", "-q",
                                    f"--benchmark-json={bench_json}"], cwd=ROOT)
        tests = test_summary(junit)
        benchmarks = json.loads(bench_json.read_text()) if bench_json.exists() else None
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
