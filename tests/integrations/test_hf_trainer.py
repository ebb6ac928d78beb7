"""`transformers.Trainer` on a wrapped model (heteromem.integrations.HeteromemTrainer).

A tiny Llama in fp32 under a 40% device budget, trained by HeteromemTrainer, must log the same
losses (and gradient norms) as the same Trainer run on an unwrapped copy with torch's AdamW and
the same LR schedule, with gradient accumulation and clipping on both: the reference clips
through Trainer (`clip_grad_norm_`), heteromem inside `opt.step()`. A run resumed from a
Trainer checkpoint (holding an hm.save_checkpoint) continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only: never reach the network
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "runtime"))

import heteromem as hm  # noqa: E402
from heteromem.integrations import CHECKPOINT_DIR, HeteromemTrainer  # noqa: E402
from wrap_helpers import (assert_losses_close, assert_pages, paging_kwargs,  # noqa: E402
                          param_bytes)

VOCAB = 128
LR, WEIGHT_DECAY, CLIP = 3e-3, 0.1, 0.5   # CLIP is below the gradient norms: it really clips


def _llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   attention_dropout=0.0)
    return transformers.LlamaForCausalLM(cfg)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, rows: int = 24, seq: int = 16) -> None:
        self.ids = torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out: Path, **overrides) -> transformers.TrainingArguments:
    kwargs = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  max_steps=6, logging_steps=1, max_grad_norm=CLIP, use_cpu=True, report_to=[],
                  save_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential",
                  seed=0, lr_scheduler_type="linear", warmup_steps=2)
    return transformers.TrainingArguments(**{**kwargs, **overrides})


def _schedule(opt, args):
    return transformers.get_linear_schedule_with_warmup(opt, args.warmup_steps, args.max_steps)


def _wrap(model, **wrap_kwargs):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    return hm.wrap(model, opt, device="cpu", dtype=torch.float32,
                   **paging_kwargs(model, 4), **wrap_kwargs)


def _logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def _reference(tmp_path: Path) -> transformers.Trainer:
    torch.manual_seed(0)
    ref = _llama()
    args = _args(tmp_path / "ref")
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    trainer = transformers.Trainer(model=ref, args=args, train_dataset=_Tokens(),
                                   optimizers=(opt, _schedule(opt, args)))
    trainer.train()
    return trainer


@pytest.mark.parametrize("clip_in", ["wrap", "trainer"])
def test_trainer_matches_plain_trainer_with_accumulation_and_clipping(tmp_path, clip_in):
    ref = _reference(tmp_path)
    torch.manual_seed(0)
    model = _llama()
    total = param_bytes(model, 4)
    if clip_in == "wrap":   # hm.wrap clips; Trainer's own clipping is off
        model, opt = _wrap(model, max_grad_norm=CLIP)
        args = _args(tmp_path / "hm", max_grad_norm=0.0)
    else:                   # Trainer's max_grad_norm is handed to the heteromem optimizer
        model, opt = _wrap(model)
        args = _args(tmp_path / "hm")
    assert_pages(model, total)
    trainer = HeteromemTrainer(model=model, args=args, train_dataset=_Tokens(),
                               optimizers=(opt, _schedule(opt, args)))
    trainer.train()
    assert opt.max_grad_norm == CLIP
    assert len(_logged(trainer, "loss")) == 6
    assert_losses_close(_logged(trainer, "loss"), _logged(ref, "loss"))
    # The logged norm is the one opt.step() computed before clipping, as Trainer logs it.
    assert_losses_close(_logged(trainer, "grad_norm"), _logged(ref, "grad_norm"), tol=1e-4)
    assert min(_logged(ref, "grad_norm")) > CLIP
    report = hm.report(model)
    assert report.bytes_h2d > 0 and report.bytes_d2h > 0
    assert report.tiers["device"].peak_bytes <= report.tiers["device"].budget_bytes


def _hm_trainer(out: Path, **args_overrides) -> tuple[HeteromemTrainer, torch.nn.Module]:
    torch.manual_seed(0)
    model, opt = _wrap(_llama(), max_grad_norm=CLIP)
    args = _args(out, max_grad_norm=0.0, **args_overrides)
    return HeteromemTrainer(model=model, args=args, train_dataset=_Tokens(),
                            optimizers=(opt, _schedule(opt, args))), model


def test_resume_from_a_trainer_checkpoint_continues_exactly(tmp_path):
    out = tmp_path / "run"
    whole, _ = _hm_trainer(out, save_strategy="steps", save_steps=3)
    whole.train()
    want = _logged(whole, "loss")
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / CHECKPOINT_DIR / "LATEST").is_file()
    assert (checkpoint / "model.safetensors").is_file()          # Trainer's export, as usual
    assert not (checkpoint / "optimizer.pt").exists()            # the state is in heteromem/

    # A new process: fresh model (other initial weights: the checkpoint must overwrite them).
    torch.manual_seed(123)
    model, opt = _wrap(_llama(), max_grad_norm=CLIP)
    args = _args(tmp_path / "resumed", max_grad_norm=0.0)
    resumed = HeteromemTrainer(model=model, args=args, train_dataset=_Tokens(),
                               optimizers=(opt, _schedule(opt, args)))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = _logged(resumed, "loss")
    assert len(got) == 6   # the first three come from the checkpoint's trainer_state.json
    assert got == want, (got, want)
    assert resumed.lr_scheduler.last_epoch == whole.lr_scheduler.last_epoch


def test_save_model_exports_weights_that_from_pretrained_reads(tmp_path):
    trainer, model = _hm_trainer(tmp_path / "run", max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    fresh = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.float32)
    trained = model.state_dict()
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_trainer_refuses_what_it_cannot_do(tmp_path):
    torch.manual_seed(0)
    model, opt = _wrap(_llama(), max_grad_norm=1.0)
    data = _Tokens()
    with pytest.raises(ValueError, match="max_grad_norm"):
        HeteromemTrainer(model=model, args=_args(tmp_path, max_grad_norm=0.5), train_dataset=data,
                         optimizers=(opt, None))
    other = torch.optim.AdamW(_llama().parameters())
    with pytest.raises(ValueError, match="optimizer hm.wrap returned"):
        HeteromemTrainer(model=model, args=_args(tmp_path, max_grad_norm=0.0), train_dataset=data,
                         optimizers=(other, None))
    with pytest.raises(ValueError, match="must be a model returned by hm.wrap"):
        HeteromemTrainer(model=_llama(), args=_args(tmp_path), train_dataset=data)
    with pytest.raises(ValueError, match="bf16"):
        HeteromemTrainer(model=model, args=_args(tmp_path, max_grad_norm=0.0, bf16=True),
                         train_dataset=data)


def test_step_in_backward_with_clipping_and_accumulation_trains_like_plain_trainer(tmp_path):
    """step_in_backward=True under Trainer's defaults: clipping (below the norms, so it fires)
    and gradient accumulation (2 micro-batches): updates start in the last micro-batch of each
    step, are redone clipped, and the run logs what a plain Trainer logs."""
    torch.manual_seed(0)
    ref = _llama()
    ref_args = _args(tmp_path / "ref")
    ropt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    reference = transformers.Trainer(model=ref, args=ref_args, train_dataset=_Tokens(),
                                     optimizers=(ropt, _schedule(ropt, ref_args)))
    reference.train()
    torch.manual_seed(0)
    model, opt = _wrap(_llama(), step_in_backward=True)
    args = _args(tmp_path / "hm")
    trainer = HeteromemTrainer(model=model, args=args, train_dataset=_Tokens(),
                               optimizers=(opt, _schedule(opt, args)))
    trainer.train()
    assert_losses_close(_logged(trainer, "loss"), _logged(reference, "loss"))
    assert_losses_close(_logged(trainer, "grad_norm"), _logged(reference, "grad_norm"))
    assert opt.in_backward.chunks_updated > 0
    report = hm.report(model)
    assert report.speculative_updates > 0 and report.updates_redone > 0
