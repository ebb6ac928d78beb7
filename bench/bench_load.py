"""Loading a transformers checkpoint: `hm.from_pretrained` against reading its files.

    .venv/bin/python bench/bench_load.py [--params 0.7e9] [--dtype bf16] [--dir PATH]
                                          [--cases lora,lora-nvme,full-nvme] [--json PATH]
    .venv/bin/pytest bench/bench_load.py            # the same run as a benchmark
    HETEROMEM_BENCH_QUICK=1 .venv/bin/pytest bench/bench_load.py --benchmark-disable  # smoke

A Llama checkpoint of about `--params` parameters is written under `--dir` (default:
$HETEROMEM_BENCH_DIR or build/bench) shard by shard from random values, so it never exists
whole in RAM here either; it is kept and reused by later runs with the same size. Then, in
one process and with the files dropped from the page cache before each measurement
(posix_fadvise DONTNEED, so both read from the drive):

- baselines: every file read once, front to back, into one reused buffer (the time to read
  the files: the issue's baseline); and read into one fresh buffer of the checkpoint's size
  (the least a load into host-resident parameters does: every page faulted in once);
- each case, twice: `hm.from_pretrained(folder, ...)` on the CPU, with the wall time (the
  faster run) and the peak RSS growth (VmHWM after resetting it through /proc/self/clear_refs,
  minus RSS before; the larger run);
  - `lora`: LoRA adapters (r=8 on q/v) over the frozen base; bf16 compute.
  - `lora-nvme`: the same LoRA load with `nvme_dir` and a host budget of the adapters, two
    frozen-image staging slots and a values-only cache of 3 chunks, so the frozen base's
    chunks go to NVMe; the files hold them in the compute dtype (bf16), so they are read from
    the files when needed and nothing is copied (docs/nvme.md).
  - `full-nvme`: every parameter trainable, bf16 compute, `host_memory` of a 2-slot staging
    pool and a host cache of two chunks (the least it takes), so every chunk (parameters and
    optimizer states) goes to `nvme_dir`; each chunk's values (and fp32 master, their upcast)
    are read from the files until its first update, and its moments start as the zeros of a
    fresh slot, so the load writes nothing.

Targets (issue 16): RSS growth at most 0.3x the checkpoint's bytes, load time at most 1.5x the
read time. With `nvme_dir`, a wrap touches one chunk's values at a time (the staging slot it
fills) plus the read-ahead of the weights; the run reports what it is.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

from heteromem.memory.host_plan import cache_floor
from heteromem.memory.nvme import staging_bytes
from heteromem.runtime.wrap import DEFAULT_CHUNK_ELEMS

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

QUICK_PARAMS = 2_000_000
SHARD_BYTES = 500 * 10**6


def _quick() -> bool:
    return os.environ.get("HETEROMEM_BENCH_QUICK", "") not in ("", "0")


def llama_config(params: float):
    """A Llama config of about `params` parameters (hidden 2048 and 5504-wide MLPs, as a
    1B-class model; the layer count sets the size)."""
    import transformers

    if params < 50e6:
        return transformers.LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=352,
                                        num_hidden_layers=max(1, int(params // 300_000)),
                                        num_attention_heads=4, num_key_value_heads=4)
    hidden, inter, vocab = 2048, 5504, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                    num_hidden_layers=layers, num_attention_heads=16,
                                    num_key_value_heads=16, tie_word_embeddings=False)


def write_checkpoint(folder: Path, config, dtype: torch.dtype) -> int:
    """Writes random weights for `config` as transformers' sharded safetensors (one shard in
    memory at a time) plus config.json; returns the bytes of tensor data."""
    import transformers
    from safetensors.torch import save_file

    marker = folder / "complete"
    if marker.exists():
        return int(marker.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    shapes = [(n, t.shape) for n, t in model.state_dict().items()]
    groups, size = [[]], 0
    for name, shape in shapes:
        nbytes = shape.numel() * dtype.itemsize
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=gen) * 0.02).to(dtype) for n, s in group}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.dtype = dtype
    config.save_pretrained(folder)
    marker.write_text(str(total))
    return total


def drop_cache(folder: Path) -> None:
    """Evicts the folder's files from the page cache, so the next read comes from the drive."""
    os.sync()
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(folder: Path) -> float:
    """Seconds to read every safetensors file once into a reused 64 MiB buffer."""
    buf = bytearray(64 * 2**20)
    view = memoryview(buf)
    start = time.perf_counter()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - start


def read_into_fresh_memory(folder: Path, total: int) -> float:
    """Seconds to read every file into one new buffer of the checkpoint's size: the least a
    load into host-resident parameters does (each page faulted in once, each byte read)."""
    start = time.perf_counter()
    buf = torch.empty(total + 2**20, dtype=torch.uint8)
    view, done = memoryview(buf.numpy()), 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(view[done:done + 64 * 2**20])
                if not n:
                    break
                done += n
    seconds = time.perf_counter() - start
    del buf
    return seconds


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _case_kwargs(case: str, config, params: int, scratch: Path) -> dict:
    largest = config.vocab_size * config.hidden_size
    if case == "lora":
        import peft

        return dict(peft_config=peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    if case in ("full-nvme", "lora-nvme"):
        nvme = scratch / "nvme"
        nvme.mkdir(exist_ok=True)
        # The default chunk: at least the largest parameter (the embedding), else an eighth
        # of the model up to 64 MiB of bf16.
        chunk = max(largest, min(DEFAULT_CHUNK_ELEMS, -(-params // 8)))
        # A small host budget: a 2-slot staging pool and a cache of a few chunks, so every
        # chunk (parameters, and optimizer states where trainable) goes to NVMe.
        # (chunk_mb pinned to that chunk: LoRA's adapters would otherwise move the default.)
        kwargs = dict(nvme_dir=str(nvme), chunk_mb=chunk * 2 / 2**20)
        if case == "full-nvme":
            staging = staging_bytes(chunk, 2, torch.bfloat16)
            return dict(kwargs, host_memory=staging + cache_floor(chunk, torch.bfloat16, 2),
                        nvme_staging=staging)
        # LoRA: the adapters stay on the host (fp32 master, moments and gradients: 18 bytes a
        # parameter, a slot's padding each), the frozen base goes to NVMe with frozen-image
        # staging slots and a cache of values only: the chunks a layer pins, one read ahead.
        h = config.hidden_size
        adapters = config.num_hidden_layers * 2 * (8 * 2 * h + 2 * 256)
        host = (staging_bytes(chunk, 2, torch.bfloat16, trainable=False)
                + 3 * chunk * 2 + adapters * 18)
        return dict(kwargs, host_memory=host, **_case_kwargs("lora", config, params, scratch))
    raise ValueError(f"unknown case {case!r}; use lora, lora-nvme or full-nvme")


def load_case(case: str, folder: Path, config, params: int, scratch: Path) -> dict:
    import heteromem as hm

    kwargs = _case_kwargs(case, config, params, scratch)
    gc.collect()
    drop_cache(folder)
    before = _rss()
    exact = _reset_peak()
    start = time.perf_counter()
    model, opt = hm.from_pretrained(folder, device="cpu", dtype=torch.bfloat16, lr=1e-4,
                                    **kwargs)
    seconds = time.perf_counter() - start
    peak = _peak_rss() if exact else _rss()
    report = hm.report(model)
    result = dict(case=case, seconds=seconds, rss_growth=peak - before, peak_exact=exact,
                  host_bytes=report.tiers["host"].peak_bytes,
                  nvme_bytes=report.tiers["nvme"].current_bytes)
    del model, opt, report
    gc.collect()
    return result


def run(params: float, dtype: torch.dtype, cases: list[str], base: Path) -> dict:
    config = llama_config(params)
    folder = base / f"llama-{int(params):d}-{str(dtype).split('.')[-1]}"
    data_bytes = write_checkpoint(folder, config, dtype)
    n = data_bytes // dtype.itemsize
    drop_cache(folder)
    read = read_files(folder)
    drop_cache(folder)
    read_again = read_files(folder)  # the drive's speed varies: the faster of two
    drop_cache(folder)
    fresh = read_into_fresh_memory(folder, sum(f.stat().st_size for f in
                                               folder.glob("*.safetensors")))
    out = dict(params=n, checkpoint_bytes=data_bytes, read_seconds=min(read, read_again),
               read_into_fresh_seconds=fresh,
               torch=torch.__version__, date=time.strftime("%Y-%m-%d"), cases=[])
    scratch = base / f"load-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        for case in cases:
            # The drive and the (shared) CPU vary: the faster of two loads, the larger RSS.
            runs = [load_case(case, folder, config, n, scratch)
                    for _ in range(2)]
            r = min(runs, key=lambda x: x["seconds"])
            r["rss_growth"] = max(x["rss_growth"] for x in runs)
            r["all_seconds"] = [x["seconds"] for x in runs]
            r["time_ratio"] = r["seconds"] / out["read_seconds"]
            r["fresh_ratio"] = r["seconds"] / out["read_into_fresh_seconds"]
            r["rss_ratio"] = r["rss_growth"] / data_bytes
            out["cases"].append(r)
    finally:
        import shutil
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _print(result: dict) -> None:
    gb, ckpt, read = 1e9, result["checkpoint_bytes"], result["read_seconds"]
    print(f"checkpoint: {result['params'] / 1e9:.3f}B parameters, {ckpt / gb:.2f} GB; reading "
          f"its files: {read:.2f} s ({ckpt / gb / read:.2f} GB/s); into fresh memory of their "
          f"size: {result['read_into_fresh_seconds']:.2f} s")
    print(f"{'case':>10} {'load s':>8} {'x read':>7} {'x fresh':>8} {'RSS +GB':>8} "
          f"{'x ckpt':>7} {'host GB':>8} {'nvme GB':>8}")
    for c in result["cases"]:
        print(f"{c['case']:>10} {c['seconds']:>8.2f} {c['time_ratio']:>7.2f} "
              f"{c['fresh_ratio']:>8.2f} {c['rss_growth'] / gb:>8.2f} {c['rss_ratio']:>7.2f} "
              f"{c['host_bytes'] / gb:>8.2f} {c['nvme_bytes'] / gb:>8.2f}")


def _base_dir() -> Path:
    return Path(os.environ.get("HETEROMEM_BENCH_DIR", "") or ROOT / "build" / "bench")


def test_load(benchmark):
    params = QUICK_PARAMS if _quick() else 0.7e9
    benchmark.group = "load"
    result = benchmark.pedantic(run, args=(params, torch.bfloat16, ["lora", "lora-nvme",
                                                                 "full-nvme"], _base_dir()), rounds=1, iterations=1)
    for case in result["cases"]:
        assert case["seconds"] > 0 and case["rss_growth"] > 0, case
    benchmark.extra_info.update(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=0.7e9)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--cases", default="lora,lora-nvme,full-nvme")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base = Path(args.dir) if args.dir else _base_dir()
    result = run(args.params, dtype, args.cases.split(","), base)
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
