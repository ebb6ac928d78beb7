"""`HeteromemTrainer`: `transformers.Trainer` for a model wrapped with `hm.wrap`.

A plain `Trainer` cannot train a wrapped model, for four reasons this subclass removes:

- Accelerate wraps the optimizer and, to move its state to the device, calls
  `optimizer.state_dict()`, which heteromem refuses (the state lives in chunks). The wrapped model
  places itself, so device placement is turned off (inputs still go to `args.device`).
- Trainer clips with `clip_grad_norm_(model.parameters())`, but parameters carry no `.grad`
  (gradients live in the chunks). `args.max_grad_norm` becomes the heteromem optimizer's
  `max_grad_norm`, applied inside `opt.step()` where the global norm is known; the norm it
  computed is logged as `grad_norm`.
- Checkpoints would save `optimizer.state_dict()`; here they hold an `hm.save_checkpoint` of
  model and optimizer under `<checkpoint>/heteromem/` (plus the scheduler and everything else
  Trainer saves), and `resume_from_checkpoint=` loads it with `hm.load_checkpoint`.
- Trainer's fp16/bf16 flags add autocast and a GradScaler over `.grad`; with heteromem the
  compute dtype is `hm.wrap(dtype=...)`, so those flags are refused.
"""

from __future__ import annotations

import os
import warnings

import torch

import heteromem as hm

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover: the module is only imported by transformers users
    raise ImportError("heteromem.integrations.hf needs `transformers`: pip install transformers") from exc

__all__ = ["CHECKPOINT_DIR", "HeteromemTrainer"]

# Subfolder of each Trainer checkpoint (`checkpoint-<step>/`) holding the heteromem checkpoint.
CHECKPOINT_DIR = "heteromem"
_SCHEDULER_NAME = "scheduler.pt"


class HeteromemTrainer(Trainer):
    """`transformers.Trainer` for a model returned by `hm.wrap`.

    Takes the same arguments as `Trainer`. `optimizers=(opt, scheduler)`: `opt` must be the
    optimizer `hm.wrap` returned for this model (or None: that optimizer is used); `scheduler`
    may be None, then Trainer builds one from `args` (`lr_scheduler_type`, warm-up) over it.
    The learning rate and the other Adam hyper-parameters are those given to `hm.wrap`;
    `args.learning_rate`, `args.weight_decay` and `args.optim` are not used.

    Clipping: `args.max_grad_norm > 0` sets the optimizer's `max_grad_norm` (it must then be
    None or equal: a `ValueError` otherwise); `args.max_grad_norm=0` keeps the one given to
    `hm.wrap`, if any.
    """

    def __init__(self, model: torch.nn.Module | None = None, args=None, *args_, optimizers=(None, None),
                 **kwargs) -> None:
        state = getattr(model, "_heteromem", None)
        if state is None:
            raise ValueError("HeteromemTrainer: `model` must be a model returned by hm.wrap; wrap it "
                             "first (model_init is not supported either)")
        opt, scheduler = optimizers
        if opt is None:
            opt = state.optimizer
        if opt is None or opt is not state.optimizer:
            raise ValueError("HeteromemTrainer: optimizers[0] must be the optimizer hm.wrap returned "
                             "for this model (or None to use it); the model has "
                             + ("no trainable parameters" if state.optimizer is None else
                                "its own, and another optimizer would not update the chunks"))
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("HeteromemTrainer: optimizer_cls_and_kwargs is not supported; the "
                             "optimizer is the one hm.wrap returned")
        super().__init__(model, args, *args_, optimizers=(opt, scheduler), **kwargs)
        self._check_args(state, opt)
        self.hm_optimizer = opt
        # NOTE: with device placement on, Accelerate's AcceleratedOptimizer calls
        # optimizer.state_dict() to move the state (heteromem raises) and prepare_model calls
        # model.to(device); a wrapped model is already where it computes. Inputs are still
        # moved to args.device by Trainer._prepare_inputs.
        self.accelerator.device_placement = False

    def _check_args(self, state, opt) -> None:
        args = self.args
        if args.fp16 or args.bf16:
            raise ValueError("HeteromemTrainer: TrainingArguments fp16/bf16 add autocast and a "
                             "GradScaler over param.grad, which a wrapped model does not have; "
                             "leave them off and choose the compute dtype with hm.wrap(dtype=...) "
                             "(bf16 or fp32; fp16 loss scaling needs opt.backward(loss), which "
                             "Trainer does not call)")
        if state.manager.chunks and state.manager.chunks[0].dtype == torch.float16:
            raise ValueError("HeteromemTrainer: hm.wrap(dtype=torch.float16) needs opt.backward(loss) "
                             "for loss scaling, which Trainer does not call; use torch.bfloat16 or "
                             "torch.float32")
        if args.world_size > 1 or state.comm is not None:
            raise ValueError("HeteromemTrainer: distributed Trainer runs are not supported: "
                             "Trainer would wrap the model in DistributedDataParallel, which "
                             "reduces gradients a sharded heteromem model already reduces. "
                             "Train sharded models with a plain loop under torchrun "
                             "(docs/distributed.md)")
        if args.n_gpu > 1:
            raise ValueError(f"HeteromemTrainer: Trainer sees {args.n_gpu} GPUs and would use "
                             "DataParallel, which copies the model; make one GPU visible "
                             "(CUDA_VISIBLE_DEVICES)")
        wrapped, wanted = state.manager.device, torch.device(args.device)
        if wrapped.type != wanted.type or (wanted.index is not None and wrapped.index != wanted.index):
            raise ValueError(f"HeteromemTrainer: the model was wrapped for device {wrapped} but "
                             f"Trainer computes on {wanted}; pass hm.wrap(device=...) the same "
                             "device (for device='cpu', TrainingArguments(use_cpu=True))")
        clip = args.max_grad_norm
        # hm.wrap(step_in_backward=True) works with clipping (updates during backward are
        # checked against the norm and redone when it clips) and with gradient accumulation
        # (updates begin in the last micro-batch of each step, as Trainer's steps all have the
        # same number of micro-batches).
        if clip is not None and clip > 0:
            if opt.max_grad_norm is None:
                opt.max_grad_norm = float(clip)
            elif opt.max_grad_norm != float(clip):
                raise ValueError(f"HeteromemTrainer: hm.wrap(max_grad_norm={opt.max_grad_norm}) and "
                                 f"TrainingArguments(max_grad_norm={clip}) disagree; set one of "
                                 "them (max_grad_norm=0 in TrainingArguments keeps hm.wrap's)")

    # ------------------------------------------------------------------ placement, clipping

    def _move_model_to_device(self, model: torch.nn.Module, device: torch.device) -> None:
        """A wrapped model pages its own parameters: moving it would break the chunks."""

    def _clip_grad_norm(self, model: torch.nn.Module):
        """Clipping happens in `opt.step()` (the optimizer's `max_grad_norm`)."""
        return None

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm=None):
        """Not known before `opt.step()`; `_maybe_log_save_evaluate` logs the step's norm."""
        return grad_norm

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs) -> None:
        if grad_norm is None:
            grad_norm = self.hm_optimizer.last_grad_norm
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The model and optimizer state as an `hm.save_checkpoint`, the scheduler as Trainer
        saves it."""
        if not self.args.should_save:
            return
        hm.save_checkpoint(os.path.join(output_dir, CHECKPOINT_DIR), self.model, self.hm_optimizer)
        if self.lr_scheduler is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about saving scheduler state
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, _SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # NOTE: with a heteromem checkpoint, the weights come from it together with the
        # optimizer state (`_load_optimizer_and_scheduler`); the exported model file is only
        # read for a checkpoint saved with `save_only_model=True`.
        if not os.path.isdir(os.path.join(resume_from_checkpoint, CHECKPOINT_DIR)):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, CHECKPOINT_DIR)
        if not os.path.isdir(path):
            warnings.warn(f"HeteromemTrainer: {checkpoint} holds no heteromem checkpoint "
                          f"({CHECKPOINT_DIR}/; saved with save_only_model=True?): resuming with "
                          "its weights and a fresh optimizer state", hm.HeteromemWarning, stacklevel=2)
            return
        hm.load_checkpoint(path, self.model, self.hm_optimizer)
        scheduler_file = os.path.join(checkpoint, _SCHEDULER_NAME)
        if self.lr_scheduler is not None and os.path.isfile(scheduler_file):
            self.lr_scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))
