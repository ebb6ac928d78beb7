"""PEFT (LoRA) models in heteromem's loading and export: the names their base weights have in
a transformers checkpoint, adapters made on a meta-device base model, and merged weights.

Nothing here imports `peft`: a model is a PEFT model only if `peft` is already imported and
the model is one of its `PeftModel`s.
"""

from __future__ import annotations

import re
import sys

import torch

_PREFIX = "base_model.model."
_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                  "lora_magnitude_vector")


def is_peft_model(model: object) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def file_name(name: str) -> str:
    """The name a PEFT model's tensor has in its base model's checkpoint:
    `base_model.model.X.base_layer.weight` -> `X.weight`; a `modules_to_save` copy and its
    `original_module` both come from `X.weight`."""
    if name.startswith(_PREFIX):
        name = name[len(_PREFIX):]
    name = name.replace(".base_layer.", ".")
    name = name.replace(".original_module.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


def _lora_layers(model: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            yield module


def adapter_params(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter parameters of a LoRA layer (every adapter), not its base layer's."""
    out = []
    for part in _ADAPTER_PARTS:
        container = getattr(layer, part, None)
        if container is not None:
            out.extend(container.parameters())
    return out


def meta_adapters(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, object]]:
    """(LoRA layer, adapter name, its `init_lora_weights`) of every adapter whose weights are
    on the meta device. Checks they can be made without base weights (refused: DoRA, and initialisations such as
    PiSSA or LoftQ that are computed from the base weights)."""
    if not is_peft_model(model):
        return []
    out = []
    configs = getattr(model, "peft_config", {})
    for layer in _lora_layers(model):
        for adapter in list(layer.lora_A.keys()) + list(layer.lora_embedding_A.keys()):
            params = [p for part in _ADAPTER_PARTS if (c := getattr(layer, part, None)) is not None
                      and adapter in c for p in _params_of(c[adapter])]
            if not any(p.is_meta for p in params):
                continue
            config = configs.get(adapter)
            init = getattr(config, "init_lora_weights", True)
            if getattr(config, "use_dora", False):
                raise ValueError(f"hm.wrap: PEFT adapter {adapter!r} uses DoRA, whose magnitude "
                                 "vector is computed from the base weights, which are on the "
                                 "meta device; build the PEFT model on a materialised model")
            if init not in (True, False, "gaussian"):
                raise ValueError(f"hm.wrap: PEFT adapter {adapter!r} has init_lora_weights="
                                 f"{init!r}, computed from the base weights, which are on the "
                                 "meta device; use True, False or 'gaussian' (or build the PEFT "
                                 "model on a materialised model)")
            out.append((layer, adapter, init))
    return out


def _params_of(value: object) -> list[torch.nn.Parameter]:
    if isinstance(value, torch.nn.Parameter):
        return [value]
    return list(value.parameters())


def materialize_adapter(layer: torch.nn.Module, adapter: str, init: object) -> None:
    """Makes a meta adapter's weights on the CPU as PEFT makes them: the layers' default
    init, then `reset_lora_parameters` with the adapter's `init_lora_weights`."""
    from heteromem.runtime.materialize import to_materialized

    for part in ("lora_A", "lora_B"):
        module = getattr(layer, part)
        if adapter in module:
            for p in module[adapter].parameters():
                to_materialized(p, torch.empty(p.shape, dtype=p.dtype))
            module[adapter].reset_parameters()
    for part in ("lora_embedding_A", "lora_embedding_B"):
        params = getattr(layer, part)
        if adapter in params:
            p = params[adapter]
            # PEFT draws both from a normal distribution when it builds them.
            to_materialized(p, torch.randn(p.shape).to(p.dtype))
    layer.reset_lora_parameters(adapter, init)


def merged_entries(model: torch.nn.Module, state, what: str) -> dict[str, tuple]:
    """A wrapped PEFT model's weights as its base model has them with the active adapters
    merged (what `merge_and_unload()` gives), for `runtime/checkpoint/export.stream`:
    name -> (dtype, shape, source). Each LoRA layer is merged when its base weight is
    written, by PEFT's own `merge()` on that layer's values (so the numbers are PEFT's), and
    forgotten at once: one layer's weights at a time."""
    from heteromem.runtime.state_dict import _slot_names

    slots = _slot_names(model)
    merge_of: dict[int, _LayerMerge] = {}
    adapters: set[int] = set()
    for layer in _lora_layers(model):
        adapters.update(id(p) for p in adapter_params(layer))
        if getattr(layer, "merged", False):
            raise ValueError(f"{what}: a LoRA layer of this model has merged adapters already "
                             "(merge_adapter() before wrapping); unmerge them before wrapping")
        job = _LayerMerge(layer, state)
        for p in layer.get_base_layer().parameters(recurse=False):
            merge_of[id(p)] = job
    active = set(getattr(model, "active_adapters", None) or [])
    out: dict[str, tuple] = {}
    for name, t in type(model).state_dict(model, keep_vars=True).items():
        if not isinstance(t, torch.Tensor) or id(t) in adapters or ".original_module." in name:
            continue
        copy = re.search(r"\.modules_to_save\.([^.]+)\.", name)
        if copy and copy.group(1) not in active:
            continue
        target = file_name(name)
        if target in out:  # tied: written once, under its first name
            continue
        slot = slots.get(name)
        dtype = slot.orig_dtype if slot is not None else t.dtype
        shape = torch.Size(slot.shape) if slot is not None else t.shape
        job = merge_of.get(id(t))
        if job is not None:
            out[target] = (dtype, shape, job.source(t))
        else:
            out[target] = (dtype, shape, slot if slot is not None else t)
    return out


class _LayerMerge:
    """One LoRA layer's merge, made when its first base tensor is asked for."""

    def __init__(self, layer: torch.nn.Module, state) -> None:
        self.layer, self.state = layer, state
        self.merged: dict[int, torch.Tensor] | None = None

    def source(self, param: torch.Tensor):
        def value() -> torch.Tensor:
            if self.merged is None:
                self.merged = self._merge()
            out = self.merged.pop(id(param))
            if not self.merged:
                self.merged = None
            return out
        return value

    def _merge(self) -> dict[int, torch.Tensor]:
        from heteromem.runtime.state_dict import _Masters

        layer = self.layer
        params = list(layer.parameters())
        masters = _Masters(self.state.manager)
        saved = [(p, p.data) for p in params]
        merged_before = list(layer.merged_adapters)
        try:
            # In chunk order, so each chunk (read from NVMe, or gathered) is read once.
            for p in sorted(params, key=lambda q: q._heteromem_slot.chunk.index):
                slot = p._heteromem_slot
                p.data = masters.get(slot.chunk)[slot.range].view(slot.shape).to(
                    "cpu", slot.orig_dtype, copy=True)
            with torch.no_grad():
                layer.merge(safe_merge=False, adapter_names=None)
            base = layer.get_base_layer()
            return {id(p): p.data for p in base.parameters(recurse=False)}
        finally:
            for p, data in saved:
                p.data = data
            layer.merged_adapters[:] = merged_before
