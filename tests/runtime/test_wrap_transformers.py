"""hm.wrap on Hugging Face transformers models, the models people will actually wrap: tiny
Llama (RMSNorm, rotary buffers, grouped-query attention, untied head) and GPT-2 (Conv1D,
tied embeddings, attention biases), built from configs (no downloads). In fp32 under a 40%
device budget they must train exactly like a plain torch.optim.AdamW run.

A model that reads a parameter outside its owning module's forward would fail here (the
parameter is an empty placeholder while its chunk is not resident)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only: never reach the network
transformers = pytest.importorskip("transformers")

import heteromem as hm  # noqa: E402
from wrap_helpers import (assert_losses_close, assert_pages, assert_params_close,  # noqa: E402
                          lm_batches, paging_kwargs, param_bytes, train_lm)

VOCAB = 128


def _llama(attn: str) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2(attn: str) -> torch.nn.Module:
    # Four layers: the tied lm_head/wte chunk stays pinned through backward, so two layers
    # leave too little of a 40% budget for the largest module besides it.
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4,
                                  n_positions=64, bos_token_id=0, eos_token_id=0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  attn_implementation=attn)
    return transformers.GPT2LMHeadModel(cfg)


def _pair(build, attn: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ref = build(attn)
    ref.train()
    return ref, copy.deepcopy(ref)


def _train(model, opt, steps: int) -> list[float]:
    return train_lm(model, opt, lm_batches(VOCAB, steps, seed=1))


def _wrap_fp32(ref, model):
    """Wraps `model` (fp32, 40% budget, >= 4 chunks) and returns it with the two optimizers."""
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, opt = hm.wrap(model, opt, device="cpu", dtype=torch.float32, **paging_kwargs(ref, 4))
    assert_pages(model, param_bytes(ref, 4))
    return model, opt, ropt


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_transformers_causal_lm_fp32_matches_adamw(build, attn):
    ref, model = _pair(build, attn)
    model, opt, ropt = _wrap_fp32(ref, model)
    assert_losses_close(_train(model, opt, 10), _train(ref, ropt, 10))
    # GPT-2's key bias (middle third of c_attn.bias) has a zero true gradient and is left out
    # of the comparison by assert_params_close; see wrap_helpers.KEY_BIAS_SUFFIXES.
    assert_params_close(model.state_dict(), ref.state_dict())
    assert hm.report(model).bytes_h2d > 0


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_transformers_activation_checkpointing_matches_adamw(reentrant):
    """HF's own checkpointing switch wraps each decoder layer in torch.utils.checkpoint."""
    ref, model = _pair(_llama, "sdpa")
    kwargs = {"use_reentrant": reentrant}
    for m in (ref, model):
        enable = getattr(m, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(kwargs)
        else:  # transformers before the rename
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model, opt, ropt = _wrap_fp32(ref, model)
    assert_losses_close(_train(model, opt, 6), _train(ref, ropt, 6))
    assert_params_close(model.state_dict(), ref.state_dict())


def test_save_pretrained_of_a_wrapped_model_reloads_the_trained_weights(tmp_path):
    """model.state_dict() gives full tensors, so save_pretrained exports the trained model
    (DESIGN.md section 5), tied GPT-2 embeddings included."""
    torch.manual_seed(0)
    model = _gpt2("sdpa")
    model, opt = hm.wrap(model, device="cpu", dtype=torch.bfloat16, lr=1e-2,
                         **paging_kwargs(model, 2))
    initial = model.state_dict()
    _train(model, opt, 3)
    trained = model.state_dict()
    assert all(not torch.equal(trained[n], v) for n, v in initial.items() if "wte" in n)
    model.save_pretrained(tmp_path)
    # NOTE: the saved config records the compute dtype (bf16) as the model's dtype, so ask for
    # fp32 explicitly to compare with the fp32 master weights bit for bit.
    fresh = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float32)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, trained[name]), name
