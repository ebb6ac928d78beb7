"""PEFT / LoRA under hm.wrap: the frozen base weights are paged (chunks without gradients or
optimizer state), only the adapters are trained, their optimizer state is tiny, and training
matches an unwrapped PEFT model under torch's AdamW. The adapters a wrapped PeftModel saves
load back into an unwrapped one, which can then be merged.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only: never reach the network
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "runtime"))

import heteromem as hm  # noqa: E402
from wrap_helpers import (assert_losses_close, assert_pages, assert_params_close,  # noqa: E402
                          paging_kwargs, param_bytes)

VOCAB = 128
LR, WEIGHT_DECAY = 1e-2, 0.01
TARGETS = ["q_proj", "v_proj"]


def _base() -> torch.nn.Module:
    # Four layers: the adapters of every layer share one trainable chunk that stays on the
    # device through backward, so two layers leave too little of a 40% budget besides it.
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _lora(base: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    # init_lora_weights=False: B starts random, not zero, so the adapters change the output
    # from the first step and every adapter gets a non-trivial gradient.
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                          init_lora_weights=False)
    return peft.get_peft_model(base, cfg)


def _batches(count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(0, VOCAB, (2, 16), generator=gen) for _ in range(count)]


def _train(model, opt, batches, accumulate: int = 1) -> list[float]:
    losses = []
    for i, ids in enumerate(batches):
        loss = model(input_ids=ids, labels=ids).loss
        (loss / accumulate).backward()
        losses.append(loss.item())
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    return losses


def _pair(**wrap_kwargs):
    """(reference PEFT model with torch AdamW, wrapped copy with its optimizer, bytes)."""
    ref = _lora(_base())
    model = copy.deepcopy(ref)
    trainable = [p for p in ref.parameters() if p.requires_grad]
    ropt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
    total = param_bytes(ref, 4)
    # No optimizer passed: wrap builds AdamW over the trainable (adapter) parameters only.
    model, opt = hm.wrap(model, device="cpu", dtype=torch.float32, lr=LR,
                         weight_decay=WEIGHT_DECAY, **paging_kwargs(ref, 4), **wrap_kwargs)
    assert_pages(model, total)
    return ref, ropt, model, opt


def test_lora_with_updates_during_backward_matches_adamw():
    """step_in_backward: the adapters' chunks are updated while the backward still runs
    through the frozen base (its chunks paged back in for the input gradients)."""
    ref, ropt, model, opt = _pair(step_in_backward=True)
    batches = _batches(6)
    assert_losses_close(_train(model, opt, batches), _train(ref, ropt, batches))
    assert_params_close(model.state_dict(), ref.state_dict())
    assert opt.in_backward.chunks_updated > 0


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lora_pages_frozen_base_and_matches_adamw(accumulate):
    ref, ropt, model, opt = _pair()
    adapter = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    total = sum(p.numel() for p in ref.parameters())
    assert 0 < adapter < total / 20
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    # The optimizer holds exactly the adapter parameters.
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == lora

    batches = _batches(8)
    assert_losses_close(_train(model, opt, batches, accumulate),
                        _train(ref, ropt, batches, accumulate))
    assert_params_close(model.state_dict(), ref.state_dict())

    chunks = model._heteromem.manager.chunks
    frozen = [c for c in chunks if not c.trainable]
    assert len(frozen) >= 4 and all(c.master is None and c.states is None for c in frozen)
    report = hm.report(model)
    assert report.bytes_h2d > 0
    assert report.tiers["device"].peak_bytes <= report.tiers["device"].budget_bytes
    # Host tier: every parameter once (4 B each in fp32) plus the adapters' optimizer state:
    # in fp32 the host copy is the master, so exp_avg + exp_avg_sq + the fp32 gradient
    # accumulation buffer = 12 B per adapter parameter (chunk alignment adds a little).
    states = report.tiers["host"].current_bytes - total * 4
    assert 0 < states <= 12 * adapter * 1.1, (states, adapter)
    assert states < 0.1 * 12 * total   # what full fine-tuning's state would be


def test_save_pretrained_of_a_wrapped_peft_model_saves_the_trained_adapters(tmp_path):
    ref, ropt, model, opt = _pair()
    _train(model, opt, _batches(3))
    trained = model.state_dict()
    model.save_pretrained(tmp_path)   # PEFT reads model.state_dict(): full tensors
    assert (tmp_path / "adapter_model.safetensors").is_file()

    # Load into an unwrapped model built from the same base weights, and merge there: the
    # wrapped model's base weights are placeholders while paged, so merging in place fails.
    loaded = peft.PeftModel.from_pretrained(_base(), tmp_path)
    state = loaded.state_dict()
    lora = [n for n in trained if "lora_" in n]
    assert lora and all(torch.equal(state[n], trained[n]) for n in lora)

    ids = _batches(1)[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        merged = loaded.merge_and_unload()
        assert isinstance(merged, transformers.LlamaForCausalLM)
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_lora_under_heteromem_trainer_matches_trainer_and_checkpoints_adapters(tmp_path):
    from heteromem.integrations import CHECKPOINT_DIR, HeteromemTrainer

    ids = torch.cat(_batches(4))
    data = [{"input_ids": row, "labels": row} for row in ids]

    def args(out):
        return transformers.TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=2, logging_steps=1, max_grad_norm=1.0, use_cpu=True, report_to=[],
            save_strategy="steps", save_steps=2, disable_tqdm=True,
            train_sampling_strategy="sequential", lr_scheduler_type="constant")

    ref, ropt, model, opt = _pair()
    plain = transformers.Trainer(model=ref, args=args(tmp_path / "ref"), train_dataset=data,
                                 optimizers=(ropt, None))
    plain.train()
    trainer = HeteromemTrainer(model=model, args=args(tmp_path / "hm"), train_dataset=data,
                               optimizers=(opt, None))
    trainer.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (trainer, plain)]
    assert len(losses[0]) == 2
    assert_losses_close(*losses)
    checkpoint = tmp_path / "hm" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert (checkpoint / CHECKPOINT_DIR / "LATEST").is_file()
