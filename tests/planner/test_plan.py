"""hm.plan: figures against hand-computed ones, plans at scale, overflows named, model
descriptions from configs and modules matching real parameter counts, calibration, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import heteromem as hm
from heteromem.planner import Figures, ModelSpec, calibrate, describe_model

GiB = 2**30
FIG = Figures(h2d_gbps=20.0, d2h_gbps=10.0, cpu_adam_gparams=2.0, nvme_read_gbps=4.0,
              nvme_write_gbps=2.0, gpu_tflops=100.0, source="test")


def test_bytes_and_times_match_a_hand_computation():
    """1e9 parameters (largest 1e7, shape unknown), bf16, a 2 GiB GPU, 18 GiB host.
    Chunk: max(32 Mi elements, 1e7) = 33,554,432 elements = 64 MiB; working set: 1 chunk for
    the largest parameter + 2 prefetched + 1 = 4 chunks = 256 MiB; device fixed: 256 MiB +
    1 GiB CUDA reserve; 768 MiB left holds 805,306,368 // 14 = 57,521,883 parameters' state,
    rounded down to whole chunks: 33,554,432. The rest, 966,445,568 parameters, stay on the
    host with 12 bytes of state and 4 of gradient accumulation room each, next to 2e9 bytes of
    bf16 parameters (those whose states moved to the device keep their host copy)."""
    model = ModelSpec("toy", params=10**9, largest=10**7)
    p = hm.plan(model, gpu_memory=2 * GiB, host_memory="18GiB", figures=FIG)
    assert p.fits and p.overflow is None
    assert p.chunk_bytes == 64 * 2**20 and p.working_chunks == 4
    assert p.state_params == {"device": 33_554_432, "host": 966_445_568, "nvme": 0}
    assert p.tiers["device"].needed == 256 * 2**20 + GiB + 33_554_432 * 14
    assert p.tiers["host"].needed == 2 * 10**9 + 966_445_568 * (12 + 4)
    assert p.tiers["nvme"].needed == 0
    tokens = 2048
    assert p.step_seconds["GPU compute"] == pytest.approx(8 * 1e9 * tokens / 100e12)
    assert p.step_seconds["host->GPU copies"] == pytest.approx(2 * 966_445_568 * 2 / 20e9)
    assert p.step_seconds["GPU->host copies"] == pytest.approx(966_445_568 * 2 / 10e9)
    assert p.step_seconds["CPU Adam"] == pytest.approx(966_445_568 / 2e9)
    assert p.bound == "CPU Adam" and p.step_time_lower_bound == p.step_seconds["CPU Adam"]
    assert "activations not counted" in str(p)
    # 16 GiB without NVMe: the host is short by the difference.
    short = hm.plan(model, gpu_memory=2 * GiB, host_memory="16GiB", figures=FIG)
    assert short.overflow == ("host", 2 * 10**9 + 966_445_568 * 16 - 16 * GiB)


def test_chunks_that_do_not_fit_go_to_nvme_whole_in_one_copy():
    """Same toy with a 10 GiB host and a disk: the host keeps a staging pool (4 slots of a
    chunk image, 2 + 3 x 4 bytes an element, plus an fp32 gradient region) and a cache of
    (working set + 1) chunks of values and accumulation room; the rest holds whole chunks in
    proportion, the other chunks' images (14 bytes a parameter) go to NVMe once, plus 4 spare
    slots."""
    model = ModelSpec("toy", params=10**9, largest=10**7)
    p = hm.plan(model, gpu_memory=2 * GiB, host_memory=10 * GiB, nvme="1TB", figures=FIG)
    chunk = 33_554_432
    staging = 4 * (chunk * (2 + 3 * 4) + chunk * 4)
    cache = 5 * chunk * (2 + 4)
    off_device = 10**9 - chunk
    room = 10 * GiB - staging - cache - chunk * 2
    on_nvme = math.ceil(off_device * (1 - room / (off_device * 18)))  # rounded up: host <= budget
    on_host = off_device - on_nvme
    assert p.fits and p.state_params == {"device": chunk, "host": on_host, "nvme": on_nvme}
    assert p.tiers["nvme"].needed == on_nvme * 14 + 4 * chunk * 14
    assert p.tiers["host"].needed == on_host * 18 + chunk * 2 + staging + cache
    assert p.tiers["host"].needed <= 10 * GiB
    read = on_nvme * 2 * 2 + on_nvme * 14
    write = on_nvme * (2 + 2 + 12)
    assert p.step_seconds["NVMe"] == pytest.approx(read / 4e9 + write / 2e9)
    assert p.bound == "NVMe"


def test_8bit_optimizers_need_less_host_and_nvme_than_adamw():
    """The toy of the hand computation above with AdamW8bit: 6.03125 bytes of state a
    parameter (fp32 master 4, two uint8 moments 2, two fp32 scales per 256: 1/32) instead of
    12, so 805,306,368 // (6.03125 + 2) = 100,272,926 parameters' state fits the device's
    768 MiB, rounded down to 2 whole chunks; the rest stay on the host with 6.03125 bytes of
    state and 4 of accumulation room, beside 2e9 bytes of bf16 parameters. In fp32 the
    parameter is the master: 2.03125 bytes (AdamW: 8)."""
    model = ModelSpec("toy", params=10**9, largest=10**7)
    chunk = 33_554_432
    adamw = hm.plan(model, gpu_memory=2 * GiB, host_memory="18GiB", figures=FIG)
    p = hm.plan(model, gpu_memory=2 * GiB, host_memory="18GiB", figures=FIG,
                optimizer="adamw8bit")
    assert (p.optimizer, p.state_bytes_per_param) == ("AdamW8bit", 6.03125)
    assert (adamw.optimizer, adamw.state_bytes_per_param) == ("AdamW", 12)
    assert p.fits and p.state_params == {"device": 2 * chunk, "host": 10**9 - 2 * chunk, "nvme": 0}
    off = 10**9 - 2 * chunk
    assert p.tiers["device"].needed == 256 * 2**20 + GiB + 2 * chunk * 257 // 32
    assert p.tiers["host"].parts["optimizer states"] == off * 193 // 32
    assert p.tiers["host"].needed == 2 * 10**9 + off * 4 + off * 193 // 32
    assert p.tiers["host"].needed < adamw.tiers["host"].needed
    assert "AdamW8bit (6.031 bytes of state a parameter)" in str(p)
    # The CPU step is priced at the one calibrated rate (Adam's), and the plan says so.
    assert p.step_seconds["CPU AdamW8bit"] == pytest.approx(off / 2e9)
    assert any("calibrated Adam rate" in n for n in p.notes)
    for name, master_less in (("adamw", 8), ("agd", 8), ("adam8bit", 2.03125)):
        fp32 = hm.plan(model, gpu_memory=2 * GiB, host_memory="18GiB", figures=FIG,
                       dtype=torch.float32, optimizer=name)
        assert fp32.state_bytes_per_param == master_less
        assert fp32.tiers["host"].parts["optimizer states"] == pytest.approx(
            fp32.state_params["host"] * master_less, abs=1)
    # With a 10 GiB host and a disk: fewer parameters go to NVMe, and their images (and the
    # spare slots and staging slots) hold 8.03125 bytes a parameter instead of 14.
    adamw = hm.plan(model, gpu_memory=2 * GiB, host_memory=10 * GiB, nvme="1TB", figures=FIG)
    p = hm.plan(model, gpu_memory=2 * GiB, host_memory=10 * GiB, nvme="1TB", figures=FIG,
                optimizer="AdamW8bit")
    assert p.fits and 0 < p.state_params["nvme"] < adamw.state_params["nvme"]
    assert p.tiers["nvme"].needed == (math.ceil(p.state_params["nvme"] * 257 / 32)
                                      + 4 * chunk * 257 // 32)
    assert p.tiers["nvme"].needed < adamw.tiers["nvme"].needed
    assert p.tiers["host"].parts["NVMe staging"] == 4 * (chunk * 257 // 32 + chunk * 4)
    assert p.tiers["host"].needed <= 10 * GiB


def test_an_unknown_optimizer_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"unknown optimizer 'sgd'; use one of \['adam', "
                                         r"'adam8bit', 'adamw', 'adamw8bit', 'agd'\]"):
        hm.plan("llama-7b", gpu="h100", host_memory="2TiB", optimizer="sgd")
    with pytest.raises(ValueError, match="unknown optimizer"):
        hm.plan("llama-7b", gpu="h100", host_memory="2TiB", optimizer=torch.optim.SGD)


def test_frozen_parameters_need_no_state():
    """LoRA on a 70B model: the adapters train, the base is frozen (2 bytes a parameter on
    the host, nothing on NVMe), as `trainable=` plans a trainable fraction."""
    p = hm.plan("llama-70b", gpu="rtx4090", host_memory="256GiB", nvme="4TiB", lora_rank=16,
                figures=FIG)
    assert p.fits and p.trainable_params == hm.planner.models.PRESETS["llama-70b"].lora_params(16)
    assert p.tiers["nvme"].needed == 0 and p.step_seconds["CPU Adam"] < 1
    full = hm.plan("llama-70b", gpu="rtx4090", host_memory="256GiB", nvme="4TiB", figures=FIG)
    assert full.state_params["nvme"] > 0 and full.step_time_lower_bound > p.step_time_lower_bound
    half = hm.plan("llama-70b", gpu="rtx4090", host_memory="256GiB", nvme="4TiB",
                   trainable=0.5, figures=FIG)
    assert half.trainable_params == pytest.approx(full.model.params / 2, abs=1)
    with pytest.raises(ValueError, match="trainable"):
        hm.plan("llama-70b", gpu="rtx4090", host_memory="256GiB", trainable=1.5)
    with pytest.raises(ValueError, match="not both"):
        hm.plan("llama-70b", gpu="rtx4090", host_memory="256GiB", trainable=0.1, lora_rank=8)


def test_lora_over_a_base_larger_than_the_host_sends_only_frozen_chunks_to_nvme():
    """LoRA on a 70B base with 64 GiB of host memory (the bf16 base is 128 GiB): as hm.wrap
    plans it, the adapters' states stay off NVMe, only frozen chunks go to NVMe, and the host keeps
    two frozen-image staging slots and a values-only cache, not trainable staging."""
    from heteromem.memory.nvme import staging_bytes

    p = hm.plan("llama-70b", gpu="rtx4090", host_memory="64GiB", nvme="4TiB", lora_rank=16,
                figures=FIG)
    assert p.fits, str(p)
    assert p.state_params["nvme"] == 0
    assert p.state_params["host"] + p.state_params["device"] == p.trainable_params
    frozen = p.model.params - p.trainable_params
    assert 0 < p.tiers["nvme"].parts["parameters and optimizer states (one copy)"] < frozen * 2
    assert p.tiers["nvme"].parts["parameters and optimizer states (one copy)"] > 60 * GiB
    chunk = p.chunk_bytes // 2
    assert p.tiers["host"].parts["NVMe staging"] == staging_bytes(chunk, 2, torch.bfloat16,
                                                                  trainable=False)
    assert p.tiers["host"].needed <= 64 * GiB
    # The whole model trainable on the same host needs trainable staging (nine times larger).
    full = hm.plan("llama-70b", gpu="rtx4090", host_memory="64GiB", nvme="4TiB", figures=FIG)
    assert full.tiers["host"].parts["NVMe staging"] > 8 * p.tiers["host"].parts["NVMe staging"]


def test_70b_on_one_24gb_gpu_and_1t_on_eight_gpus():
    p = hm.plan("llama-70b", gpu_memory="24GiB", host_memory="512GiB", nvme="4TiB", figures=FIG)
    assert p.fits, str(p)
    assert sum(p.state_params.values()) == p.model.params
    assert p.state_params["nvme"] > 0 and p.tiers["host"].needed <= 512 * GiB
    assert p.tiers["device"].needed <= 24 * GiB
    big = hm.plan("dense-1t", gpu="h100", gpus=8, host_memory="6TiB", nvme="60TB", figures=FIG)
    assert big.model.params > 10**12 and big.fits, str(big)
    assert sum(big.state_params.values()) == pytest.approx(big.model.params, abs=8)
    assert big.tiers["device"].needed <= 80 * GiB


def test_each_overflow_names_its_tier():
    toy = ModelSpec("toy", params=10**9, largest=10**7, layers=8, hidden=4096, vocab=32000)
    device = hm.plan(toy, gpu_memory=2 * GiB, host_memory="64GiB", batch=64, figures=FIG)
    assert not device.fits and device.overflow[0] == "device"
    host = hm.plan(toy, gpu_memory=40 * GiB, host_memory="1GiB", figures=FIG)
    assert host.overflow[0] == "host" and "give nvme=" in str(host)
    states = hm.plan(toy, gpu_memory=3 * GiB, host_memory="6GiB", figures=FIG)
    assert states.overflow[0] == "host" and "give nvme=" in str(states)
    # With a disk, the host still needs the staging pool and a small cache.
    tiny = hm.plan(toy, gpu_memory=3 * GiB, host_memory="256MiB", nvme="1TB", figures=FIG)
    assert tiny.overflow[0] == "host" and "staging pool and a cache" in str(tiny)
    disk = hm.plan(toy, gpu_memory=3 * GiB, host_memory="6GiB", nvme="1GB", figures=FIG)
    assert disk.overflow[0] == "nvme"
    assert "NO: the nvme tier is short" in str(disk)


def test_models_from_configs_and_modules_count_their_real_parameters():
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    gpt2 = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=90, n_positions=64)
    for cfg, cls in ((llama, transformers.LlamaForCausalLM), (gpt2, transformers.GPT2LMHeadModel)):
        real = sum(p.numel() for p in cls(cfg).parameters())
        assert describe_model(cfg).params == real
        assert describe_model(cfg.to_dict()).params == real
    module = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 5))
    spec = describe_model(module)
    assert spec.params == 10 * 20 + 20 + 20 * 5 + 5 and spec.largest == 200
    assert describe_model("llama-7b").params == pytest.approx(6.74e9, rel=0.01)


def test_config_json_path_and_bad_inputs(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(model_type="llama", hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, vocab_size=50)))
    assert describe_model(str(tmp_path)).layers == 2
    with pytest.raises(ValueError, match="neither a preset"):
        hm.plan("no-such-model", gpu_memory="24GiB", host_memory="64GiB")
    with pytest.raises(ValueError, match="gpu_memory"):
        hm.plan("llama-7b", host_memory="64GiB")
    with pytest.raises(ValueError, match="unknown gpu"):
        hm.plan("llama-7b", gpu="tpu", host_memory="64GiB")
    with pytest.raises(ValueError, match="params=N"):
        hm.plan(gpu_memory="24GiB", host_memory="64GiB")


def test_calibration_is_stored_and_used(tmp_path, monkeypatch):
    monkeypatch.setenv("HETEROMEM_CACHE_DIR", str(tmp_path / "cache"))
    fig = calibrate(str(tmp_path), params=1_000_000)
    assert fig.cpu_adam_gparams > 0 and fig.nvme_write_gbps > 0 and fig.nvme_read_gbps > 0
    assert fig.source.startswith("calibrated")
    p = hm.plan("gpt2", gpu_memory="8GiB", host_memory="16GiB")
    assert p.figures.source == fig.source
    assert p.figures.cpu_adam_gparams == pytest.approx(fig.cpu_adam_gparams)


def test_command_line(tmp_path):
    env = dict(os.environ, HETEROMEM_CACHE_DIR=str(tmp_path))
    ok = subprocess.run([sys.executable, "-m", "heteromem", "plan", "llama-70b", "--gpu-memory",
                         "24GiB", "--host-memory", "512GiB", "--nvme", "4TiB"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "fits       yes" in ok.stdout, ok.stdout + ok.stderr
    short = subprocess.run([sys.executable, "-m", "heteromem", "plan", "--params", "7e9",
                            "--gpu", "rtx4090", "--host-memory", "32GiB"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert short.returncode == 1 and "NO: the host tier" in short.stdout
    # 5e9 parameters whose AdamW state does not fit 32 GiB of host memory; AdamW8bit's does.
    cmd = [sys.executable, "-m", "heteromem", "plan", "--params", "5e9", "--gpu", "rtx4090",
           "--host-memory", "32GiB", "--optimizer"]
    adamw = subprocess.run(cmd + ["adamw"], capture_output=True, text=True, env=env, timeout=120)
    assert adamw.returncode == 1 and "NO: the host tier" in adamw.stdout, adamw.stdout
    eight = subprocess.run(cmd + ["AdamW8bit"], capture_output=True, text=True, env=env,
                           timeout=120)
    assert eight.returncode == 0, eight.stdout + eight.stderr
    assert "AdamW8bit (6.031 bytes of state a parameter)" in eight.stdout
    assert "fits       yes" in eight.stdout
    bad = subprocess.run(cmd + ["sgd"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'sgd'" in bad.stderr, bad.stderr


def test_sharding_over_gpus_is_accounted_as_wrap_shards():
    one = hm.plan("llama-7b", gpu="h100", host_memory="2TiB", figures=FIG)
    four = hm.plan("llama-7b", gpu="h100", gpus=4, host_memory="2TiB", figures=FIG)
    params = four.model.params
    # Sharded: no states on the GPUs, every rank's reduced fp32 gradient part on the host,
    # and room to sum a few whole chunks' local gradients before they are reduced.
    assert four.state_params["device"] == 0 and four.state_params["host"] == params
    chunk = four.chunk_bytes // 2  # bf16 elements
    transient = (four.working_chunks + 1) * chunk * 4 * 4
    assert four.tiers["host"].parts["fp32 gradients"] == params * 4 + transient
    # One GPU: the accumulation room of the chunks on the host (some states are on the GPU).
    assert one.tiers["host"].parts["fp32 gradients"] == one.state_params["host"] * 4
    assert four.tiers["device"].parts["gradient reduction"] == chunk * 4 + -(-chunk // 4) * 4
    # Collectives: 3/4 of (bf16 parameters twice + fp32 gradients) at the default 20 GB/s.
    assert four.step_seconds["collectives"] == pytest.approx(0.75 * params * 8 / 20e9)
    assert one.step_seconds["collectives"] == 0
