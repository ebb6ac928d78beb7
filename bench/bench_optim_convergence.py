"""Convergence of heteromem.optim on the package's GPT and the demo's synthetic task
(arithmetic sequences, heteromem.cli.demo.synthetic_batch): fp32 AdamW, AdamW8bit and AGD
from the same initial weights on the same batches, 300 steps, several seeds. AdamW and
AdamW8bit use the demo's lr; AGD runs at that lr and at a third of it (its preconditioner, the
root of the second moment of the *difference* of the first moment, is smaller than Adam's, so
the same lr takes larger steps).

    .venv/bin/python bench/bench_optim_convergence.py              # the tables in docs/optim.md
    .venv/bin/python bench/bench_optim_convergence.py --optimizers AGD,"AGD lr/3"
    .venv/bin/pytest bench/bench_optim_convergence.py --benchmark-json=/tmp/conv.json

Each case records its loss every 10 steps and its final loss (the mean of the last 20 steps,
as single-batch losses are noisy) in extra_info; the time is that of the whole run.
HETEROMEM_BENCH_QUICK=1 trains 3 steps (a smoke run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import pytest
import torch

import heteromem.optim
from conftest import quick_mode
from heteromem.cli.demo import synthetic_batch
from heteromem.models.gpt import GPT, GPTConfig

CONFIG = dict(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128)
BATCH, SEQ, LR, WEIGHT_DECAY = 16, 64, 3e-3, 0.01  # the demo's task, lr and weight decay
STEPS, SEEDS, TAIL = 300, (0, 1, 2), 20

OPTIMIZERS: dict[str, Callable] = {
    "AdamW (fp32)": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY),
    "AdamW8bit": lambda ps: heteromem.optim.AdamW8bit(ps, lr=LR, weight_decay=WEIGHT_DECAY),
    "AGD": lambda ps: heteromem.optim.AGD(ps, lr=LR, weight_decay=WEIGHT_DECAY),
    "AGD lr/3": lambda ps: heteromem.optim.AGD(ps, lr=LR / 3, weight_decay=WEIGHT_DECAY),
}


def train(name: str, seed: int, steps: int) -> list[float]:
    """Losses of `steps` steps of the named optimizer from the seed's initial weights."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**CONFIG))
    opt = OPTIMIZERS[name](model.parameters())
    gen = torch.Generator().manual_seed(1000 + seed)
    losses = []
    for _ in range(steps):
        data = synthetic_batch(BATCH, SEQ, CONFIG["vocab_size"], gen)
        loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def final_loss(losses: list[float]) -> float:
    return statistics.fmean(losses[-TAIL:])


@pytest.mark.parametrize("seed", SEEDS[:1] if quick_mode() else SEEDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_convergence(benchmark, name: str, seed: int) -> None:
    steps = 3 if quick_mode() else STEPS
    benchmark.group = "optim-convergence"
    result: list[list[float]] = []
    benchmark.pedantic(lambda: result.append(train(name, seed, steps)), rounds=1, iterations=1)
    losses = result[-1]
    assert all(loss == loss for loss in losses), f"{name} diverged: {losses}"
    benchmark.extra_info.update(case=f"{name} seed {seed}", role="subject", optimizer=name,
                                seed=seed, steps=steps, losses_every_10=losses[::10],
                                final_loss=final_loss(losses), config=CONFIG, batch=BATCH, lr=LR)


def main(argv: list[str] | None = None) -> int:
    """Prints the markdown tables of docs/optim.md: final losses per seed and the curves."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help=f"comma-separated, from: {', '.join(OPTIMIZERS)} (AdamW (fp32), "
                             "the reference of the ratios, always runs)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown --optimizers {unknown}; choose from {list(OPTIMIZERS)}")
    names = ["AdamW (fp32)"] + [n for n in names if n != "AdamW (fp32)"]
    start = time.time()
    runs = {name: [train(name, seed, STEPS) for seed in SEEDS] for name in names}
    print(f"{STEPS} steps, seeds {SEEDS}, GPT {CONFIG}, batch {BATCH}x{SEQ}, lr {LR}, "
          f"weight decay {WEIGHT_DECAY}; {time.time() - start:.0f} s\n")
    base = [final_loss(losses) for losses in runs["AdamW (fp32)"]]
    print("| optimizer | final loss per seed (mean of last 20 steps) | mean | vs AdamW (fp32) |")
    print("|---|---|---|---|")
    for name, per_seed in runs.items():
        finals = [final_loss(losses) for losses in per_seed]
        ratios = [f / b for f, b in zip(finals, base)]
        print(f"| {name} | {', '.join(f'{f:.4f}' for f in finals)} | "
              f"{statistics.fmean(finals):.4f} | {', '.join(f'{r:.3f}' for r in ratios)} |")
    print("\n| step | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for step in list(range(0, STEPS, 25)) + [STEPS - 1]:
        cells = [f"{statistics.fmean(losses[step] for losses in runs[name]):.3f}"
                 for name in names]
        print(f"| {step + 1} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
