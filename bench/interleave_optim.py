"""Optimizer steps measured interleaved in one process: each round runs every implementation
once, in rotating order, so that all of them see the same machine state (a shared 2-core VM's
memory bandwidth drifts by 2x over seconds, which sequential benchmark groups cannot cancel).

    .venv/bin/python bench/interleave_optim.py --size 40M --variant fp32
    .venv/bin/python bench/interleave_optim.py --size 40M --impls heteromem-adam,deepspeed-cpu-adam

Each repeat allocates fresh buffers (so no implementation keeps a lucky placement), runs
--rounds rounds and takes each implementation's median; the ratios are per repeat (a
baseline's median over the row's), then summarised over repeats as median [min..max].
The step builders are bench_optim.py's.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

import heteromem
from bench_optim import BETAS, EPS, IMPLS, LR, VARIANTS, WEIGHT_DECAY, BUILDERS, torch_fused_adamw
from bench_adam import optimizer_step
from conftest import _cpu_model, size_label


def parse_size(text: str) -> int:
    text = text.strip().upper().replace("_", "")
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def build(impl: str, numel: int, lowp: torch.dtype | None):
    if impl in BUILDERS:
        return BUILDERS[impl](numel, "cpu", lowp)
    if impl == "torch-fused-adamw":
        return optimizer_step(torch_fused_adamw, numel, "cpu", lowp)
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.ops.op_builder import CPUAdamBuilder
    CPUAdamBuilder().load()
    return optimizer_step(lambda ps: DeepSpeedCPUAdam(ps, lr=LR, betas=BETAS, eps=EPS,
                                                      weight_decay=WEIGHT_DECAY,
                                                      adamw_mode=True), numel, "cpu", lowp)


def one_repeat(impls: list[str], numel: int, lowp: torch.dtype | None,
               rounds: int) -> dict[str, list[float]]:
    steps = {impl: build(impl, numel, lowp) for impl in impls}
    for fn in steps.values():  # lazy state, first-touch
        fn()
        fn()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(rounds):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for impl in order:
            start = time.perf_counter()
            steps[impl]()
            times[impl].append(time.perf_counter() - start)
    del steps
    gc.collect()
    return times


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}.." \
           f"{fmt.format(max(values))}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="40M", help="parameters (default 40M)")
    parser.add_argument("--variant", choices=list(VARIANTS), default="fp32")
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help=f"comma-separated, from: {', '.join(IMPLS)}")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per repeat (default 20)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats (default 5)")
    args = parser.parse_args(argv)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        parser.error(f"unknown --impls {unknown}; choose from {list(IMPLS)}")
    numel, lowp = parse_size(args.size), VARIANTS[args.variant]
    print(f"{size_label(numel)} parameters, {args.variant}, {args.repeats} repeats x "
          f"{args.rounds} rounds, {_cpu_model()}, torch threads {torch.get_num_threads()}, "
          f"heteromem simd {heteromem.build_info().cpu_simd}", flush=True)
    medians: dict[str, list[float]] = {impl: [] for impl in impls}
    for repeat in range(args.repeats):
        times = one_repeat(impls, numel, lowp, args.rounds)
        line = []
        for impl in impls:
            medians[impl].append(statistics.median(times[impl]))
            line.append(f"{impl} {medians[impl][-1] * 1e3:.2f} ms")
        print(f"repeat {repeat}: " + ", ".join(line), flush=True)
    baselines = [i for i in impls if IMPLS[i][1] == "baseline"]
    print(f"\n{'case':<22} {'median ms [min..max over repeats]':<36} "
          + " ".join(f"{'x vs ' + IMPLS[b][0]:<30}" for b in baselines))
    for impl in impls:
        cells = [f"{IMPLS[impl][0]:<22}", f"{spread([m * 1e3 for m in medians[impl]]):<36}"]
        for b in baselines:
            ratios = [bt / it for bt, it in zip(medians[b], medians[impl])]
            cells.append(f"{'base' if b == impl else spread(ratios) + 'x':<30}")
        print(" ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
