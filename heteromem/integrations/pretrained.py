"""`hm.from_pretrained`: a transformers causal-LM folder straight into a wrapped model, built on
the meta device and filled tensor by tensor from its safetensors files, never whole in RAM."""

from __future__ import annotations

import copy
import os

import torch

from heteromem.runtime import weights as wfiles
from heteromem.runtime.wrap import wrap

_WHAT = "hm.from_pretrained"


def from_pretrained(path: str | os.PathLike, *, config: object = None,
                    attn_implementation: str | None = None, peft_config: object = None,
                    **wrap_kwargs) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
    """Loads the transformers causal LM in the folder `path` and wraps it: returns
    `hm.wrap`'s `(model, optimizer)`.

    The config comes from the folder (or `config`); the model is built on the meta device
    with `transformers.AutoModelForCausalLM.from_config` (`attn_implementation` passes
    through), in the dtype the config records (else the weights' own), so `state_dict()` and
    `hm.export_pretrained` give that dtype back; its weights then stream from the folder's
    safetensors files into the chunks (`hm.wrap(..., weights=path)`). `peft_config` (a PEFT
    config such as `LoraConfig`) adds adapters before wrapping, as `peft.get_peft_model`
    does; only they are then trained. The model is in eval mode, as transformers'
    `from_pretrained` returns it: call `model.train()` to train with dropout.
    `wrap_kwargs` are `hm.wrap`'s (`device`, `dtype` (the compute dtype), `device_memory`,
    `host_memory`, `nvme_dir`, `lr`, ...).
    """
    import transformers

    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise ValueError(f"{_WHAT}: path={path!r} is not a folder; give a local folder written "
                         "by save_pretrained (download hub models first, e.g. with "
                         "huggingface_hub.snapshot_download)")
    for key in ("weights", "init"):
        if key in wrap_kwargs:
            raise TypeError(f"{_WHAT}: {key}= is not an argument here: the weights are the "
                            "folder's; use hm.wrap(model, ..., weights=...) for other sources")
    files, _ = wfiles.weight_files(path, f"{_WHAT}: path")  # a folder without weights: now
    if config is None:
        config = transformers.AutoConfig.from_pretrained(path)
    else:
        config = copy.deepcopy(config)  # from_config records the dtype in it
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=_model_dtype(config, files), **kwargs)
    if model.can_generate() and os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    model.eval()
    if peft_config is not None:
        import peft

        model = peft.get_peft_model(model, peft_config)
    return wrap(model, weights=path, **wrap_kwargs)


def _model_dtype(config: object, files: list[str]) -> torch.dtype:
    """As transformers' dtype="auto": the config's dtype, else the first floating tensor's in
    the weights, else float32."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    for entry in wfiles.read_headers(files).values():
        found = wfiles.torch_dtype(entry.dtype)
        if found is not None and found.is_floating_point:
            return found
    return torch.float32
