"""Prints a pytest-benchmark JSON as one table per group: median time and spread, Gparam/s,
GB/s, each row's speedup over the group's baselines and its share of the memory-bandwidth
ceiling (the copy, triad and in-place rows of the same device and size, from the same run).

    .venv/bin/python bench/summarize.py /tmp/bench_adam_cpu.json
    .venv/bin/python bench/summarize.py bench/results/<gpu>-<date>-<commit>.json

Accepts the JSON that `pytest --benchmark-json` / `--benchmark-autosave` writes, and the GPU
record bench/gpu_run.py writes (which holds that JSON under "benchmarks"). Rows get their role
(subject, baseline, ceiling), label and byte counts from the extra_info the bench files record.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROLE_ORDER = {"subject": 0, "baseline": 1, "ceiling": 2}


def load(path: Path) -> tuple[dict, list[dict]]:
    """Returns (machine description, benchmark entries) from either JSON layout."""
    data = json.loads(path.read_text())
    record: dict = {}
    if isinstance(data.get("benchmarks"), dict) or ("benchmarks" in data and "device" in data):
        record, data = data, data.get("benchmarks")
        if data is None:
            raise SystemExit(f"{path}: the GPU record holds no benchmark results "
                             f"(benchmarks exit code {record.get('benchmarks_exit_code')})")
    machine = dict(data.get("machine_info", {}).get("heteromem", {}))
    machine.setdefault("date", record.get("date") or data.get("datetime"))
    machine.setdefault("commit", record.get("commit") or data.get("commit_info", {}).get("id"))
    if record.get("device") and not machine.get("gpu"):
        machine["gpu"] = {"name": record["device"], "capability": record.get("device_capability")}
    return machine, data.get("benchmarks", [])


RATE_LABELS = {"gparam_per_s": "Gparam/s", "gb_per_s": "GB/s"}


def row_of(bench: dict, stat: str) -> dict:
    """One table row. Every extra_info rate ("<what>_per_s") was computed from the median by
    the bench file; it is rescaled to the chosen statistic."""
    info, stats = bench.get("extra_info", {}), bench["stats"]
    seconds = stats[stat]
    role = info.get("role") or ("baseline" if info.get("baseline") else "subject")
    rates = {key: value * stats["median"] / seconds for key, value in info.items()
             if key.endswith("_per_s") and isinstance(value, (int, float))}
    return {
        "case": info.get("case", bench["name"]),
        "role": role,
        "device": info.get("device"),
        "size": info.get("params") or info.get("adam_params"),
        "impl": info.get("impl"),
        "time": seconds,
        "iqr": stats.get("iqr", 0.0),
        "median": stats["median"],
        "min": stats["min"],
        "max": stats["max"],
        "rounds": stats.get("rounds"),
        "rates": rates,
        "gbs": rates.get("gb_per_s"),
    }


def ceilings(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    """(device, size) -> {kernel: GB/s} from the bandwidth (role "ceiling") rows."""
    found: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["role"] == "ceiling" and row["gbs"]:
            found.setdefault((row["device"], row["size"]), {})[row["impl"]] = row["gbs"]
    return found


def ceiling_for(row: dict, table: dict[tuple, dict[str, float]]) -> dict[str, float]:
    """The ceiling of the row's device and size, else the largest size measured on its device."""
    if (row["device"], row["size"]) in table:
        return table[(row["device"], row["size"])]
    same_device = sorted((size or 0, value) for (device, size), value in table.items()
                         if device == row["device"])
    return same_device[-1][1] if same_device else {}


def fmt_rate(value: float) -> str:
    """Three significant-ish digits without scientific notation."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.3f}"


def time_unit(seconds: list[float]) -> tuple[str, float]:
    """One unit per table, picked so its fastest row reads as a number above 1."""
    smallest = min(seconds)
    return ("us", 1e6) if smallest < 1e-3 else ("ms", 1e3) if smallest < 1.0 else ("s", 1.0)


def render(title: str, rows: list[dict], ceiling_table: dict[tuple, dict[str, float]],
           stat: str) -> str:
    """One group as an aligned text table."""
    rows = sorted(rows, key=lambda r: (ROLE_ORDER.get(r["role"], 9), r["time"]))
    baselines = [r for r in rows if r["role"] == "baseline"]
    unit, scale = time_unit([r["time"] for r in rows])
    rate_keys = sorted({k for r in rows for k in r["rates"]},
                       key=lambda k: (list(RATE_LABELS).index(k) if k in RATE_LABELS else -1, k))
    kinds = sorted({k for r in rows if r["role"] != "ceiling"
                    for k in ceiling_for(r, ceiling_table)})
    header = ["case", f"{stat} {unit}", "IQR %", f"min..max {unit}", "rounds"]
    header += [RATE_LABELS.get(k, k.replace("_per_s", "/s")) for k in rate_keys]
    header += [f"x vs {b['case']}" for b in baselines] + [f"% {k} BW" for k in kinds]
    lines = []
    for r in rows:
        cells = [r["case"], f"{r['time'] * scale:.3f}", f"{100 * r['iqr'] / r['median']:.1f}",
                 f"{r['min'] * scale:.3f}..{r['max'] * scale:.3f}", str(r["rounds"] or "-")]
        cells += ["-" if k not in r["rates"] else fmt_rate(r["rates"][k]) for k in rate_keys]
        cells += ["base" if b is r else f"{b['time'] / r['time']:.2f}x" for b in baselines]
        ceiling = ceiling_for(r, ceiling_table) if r["role"] != "ceiling" else {}
        cells += [f"{100 * r['gbs'] / ceiling[k]:.0f}%" if k in ceiling and r["gbs"] else "-"
                  for k in kinds]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([f"== {title}", fmt(header), fmt(["-" * w for w in widths])]
                     + [fmt(c) for c in lines])


def describe(machine: dict) -> str:
    """The header: when, which commit, on what (from conftest.py's machine_info)."""
    build = machine.get("build_info") or {}
    gpu = machine.get("gpu") or {}
    parts = [
        f"date {machine.get('date')}",
        f"commit {str(machine.get('commit'))[:10]}" + (" (dirty)" if machine.get("dirty") else ""),
        f"cpu {machine.get('cpu_model', '?')} x{machine.get('cpu_affinity') or '?'} "
        f"(torch threads {machine.get('torch_threads', '?')})",
        f"torch {machine.get('torch_version', '?')}",
        f"heteromem {build.get('version', '?')} simd {build.get('cpu_simd', '?')}"
        f" cuda kernels {'yes' if build.get('cuda_kernels') else 'no'}",
    ]
    if gpu:
        sm = f" (sm {gpu['capability']})" if gpu.get("capability") else ""
        parts.append(f"gpu {gpu.get('name')}{sm}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON or a bench/results record")
    parser.add_argument("--stat", choices=["median", "min", "mean"], default="median",
                        help="the time that rates and ratios use (default: median; min is the "
                             "least disturbed run on a noisy shared machine)")
    args = parser.parse_args(argv)
    machine, benches = load(args.json)
    if not benches:
        print(f"{args.json}: no benchmark results in this file", file=sys.stderr)
        return 1
    groups: dict[str, list[dict]] = {}
    for bench in benches:
        groups.setdefault(bench.get("group") or bench["name"], []).append(row_of(bench, args.stat))
    all_rows = [r for rows in groups.values() for r in rows]
    ceiling_table = ceilings(all_rows)
    # Smaller sizes first; within a size, the order the run measured the groups.
    first_seen = {name: i for i, name in enumerate(groups)}
    order = sorted(groups, key=lambda g: (min(r["size"] or 0 for r in groups[g]), first_seen[g]))
    print(describe(machine))
    for name in order:
        print()
        print(render(name, groups[name], ceiling_table, args.stat))
    print(f"\nx vs B: B's {args.stat} time / this row's (above 1: faster than B). % BW: this "
          "row's GB/s / that ceiling's GB/s (same device and size). Bytes are logical (each "
          "element read or written once); GB = 1e9 bytes. Rates use the " + args.stat + " time.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
