"""What the planner needs to know of a model: parameter count, the largest parameter (it sets
the chunk size) and, for activations, the transformer shape. From a parameter count, a
`transformers` config (a dict, a config object or a config.json path), a torch module, or a
named preset.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class ModelSpec:
    """A model on paper. `layers`/`hidden`/`vocab` are None when unknown (no activation
    estimate then); `largest` is the largest single parameter's element count."""

    name: str
    params: int
    largest: int
    layers: int | None = None
    hidden: int | None = None
    vocab: int | None = None
    heads: int | None = None
    # The linear layers' shapes, for LoRA adapter sizes: MLP width and key/value width.
    inter: int | None = None
    kv: int | None = None

    def lora_params(self, rank: int) -> int:
        """Parameters of LoRA adapters of rank `rank` on every linear layer of every block
        (q, k, v, o and the three MLP matrices of a Llama block: rank x (in + out) each)."""
        if self.layers is None or self.hidden is None:
            raise ValueError("hm.plan: lora_rank needs the model's shape (give a preset or a "
                             "config, not params=); pass trainable= (a fraction) instead")
        h = self.hidden
        inter = self.inter or 4 * h
        kv = self.kv or h
        per_layer = (2 * (h + h) + 2 * (h + kv) + 3 * (h + inter)) * rank
        return self.layers * per_layer


def _llama(name: str, layers: int, hidden: int, inter: int, vocab: int, heads: int,
           kv_heads: int, tied: bool = False) -> ModelSpec:
    head = hidden // heads
    attn = hidden * hidden * 2 + hidden * kv_heads * head * 2
    per_layer = attn + 3 * hidden * inter + 2 * hidden
    embed = vocab * hidden
    params = layers * per_layer + embed * (1 if tied else 2) + hidden
    return ModelSpec(name, params, max(embed, hidden * inter), layers, hidden, vocab, heads,
                     inter, kv_heads * head)


PRESETS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec("gpt2", 124_439_808, 50257 * 768, 12, 768, 50257, 12),
    "llama-7b": _llama("llama-7b", 32, 4096, 11008, 32000, 32, 32),
    "llama-13b": _llama("llama-13b", 40, 5120, 13824, 32000, 40, 40),
    "llama-70b": _llama("llama-70b", 80, 8192, 28672, 32000, 64, 8),
    "llama3-8b": _llama("llama3-8b", 32, 4096, 14336, 128256, 32, 8),
    "llama3-70b": _llama("llama3-70b", 80, 8192, 28672, 128256, 64, 8),
    "llama3-405b": _llama("llama3-405b", 126, 16384, 53248, 128256, 128, 8),
    # A 1-trillion-parameter dense transformer on paper (GPT-3-like shape, scaled).
    "dense-1t": _llama("dense-1t", 96, 25600, 102400, 128256, 160, 160),
}


def _from_hf_config(cfg: dict, name: str) -> ModelSpec:
    get = cfg.get
    hidden = get("hidden_size") or get("n_embd") or get("d_model")
    layers = get("num_hidden_layers") or get("n_layer") or get("num_layers")
    vocab = get("vocab_size")
    heads = get("num_attention_heads") or get("n_head")
    if not (hidden and layers and vocab and heads):
        raise ValueError(f"hm.plan: config {name!r} lacks hidden_size/num_hidden_layers/"
                         "vocab_size/num_attention_heads; pass params= (a parameter count) instead")
    inter = get("intermediate_size") or get("n_inner") or 4 * hidden
    kv = get("num_key_value_heads") or heads
    tied = bool(get("tie_word_embeddings", cfg.get("model_type") in ("gpt2",)))
    spec = _llama(name, layers, hidden, inter, vocab, heads, kv, tied)
    if cfg.get("model_type") == "gpt2":  # 2-matrix MLP, biases, learned positions
        per_layer = 12 * hidden * hidden + 13 * hidden
        params = layers * per_layer + vocab * hidden + get("n_positions", 1024) * hidden + 2 * hidden
        spec = replace(spec, params=params, largest=vocab * hidden)
    return spec


def describe_model(model: object = None, *, params: int | None = None) -> ModelSpec:
    """A ModelSpec from a preset name, a config (dict, object with to_dict(), or a path to a
    config.json), a torch module, or `params=` alone."""
    if model is None:
        if params is None or isinstance(params, bool) or int(params) <= 0:
            raise ValueError("hm.plan: give a model (preset name, config, module) or params=N "
                             "(a positive parameter count)")
        n = int(params)
        # Unknown shape: the chunk must still hold the largest parameter; assume ~2% of the model.
        return ModelSpec(f"{n / 1e9:.3g}B parameters", n, max(1, n // 50))
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, torch.nn.Module):
        sizes = [p.numel() for p in model.parameters()]
        if not sizes:
            raise ValueError("hm.plan: the module has no parameters")
        return ModelSpec(type(model).__name__, sum(sizes), max(sizes))
    if isinstance(model, (str, os.PathLike)):
        key = os.fspath(model)
        if key.lower() in PRESETS:
            return PRESETS[key.lower()]
        if os.path.isdir(key):
            key = os.path.join(key, "config.json")
        if os.path.isfile(key):
            with open(key, encoding="utf-8") as f:
                return _from_hf_config(json.load(f), os.path.basename(os.path.dirname(key)) or key)
        raise ValueError(f"hm.plan: {key!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                         "nor a config.json file or a folder holding one")
    if isinstance(model, dict):
        return _from_hf_config(model, model.get("_name_or_path") or model.get("model_type", "config"))
    if hasattr(model, "to_dict"):
        cfg = model.to_dict()
        return _from_hf_config(cfg, cfg.get("_name_or_path") or cfg.get("model_type", "config"))
    raise TypeError(f"hm.plan: cannot describe a {type(model).__name__}; pass a preset name, a "
                    "transformers config, a config.json path, a torch module or params=N")
