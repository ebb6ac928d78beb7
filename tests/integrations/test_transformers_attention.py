"""attn_implementation="heteromem" (heteromem.integrations.transformers): registration, and a
small Llama (grouped-query heads) and GPT-2 giving the loss, gradients and greedy generations
of "sdpa", with plain causal attention, with padding (the SDPA fallback) and with a KV cache.
On CPU the op itself falls back to SDPA, so there the test checks the routing and the semantics
(causal alignment, GQA, cache prefill/decode); the `cuda` tests run the kernels in bf16."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import heteromem as hm  # noqa: E402
import heteromem.integrations.transformers as hm_transformers  # noqa: E402

VOCAB = 128


def llama_config(**overrides):
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=256,
                                    **overrides)


def gpt2_config(**overrides):
    # attn_pdrop=0: attention dropout is not implemented by the kernel (it would fall back).
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                   n_positions=256, attn_pdrop=0.0, resid_pdrop=0.0,
                                   embd_pdrop=0.0, bos_token_id=0, eos_token_id=1, **overrides)


MODELS = {
    "llama": (transformers.LlamaForCausalLM, llama_config),
    "gpt2": (transformers.GPT2LMHeadModel, gpt2_config),
}


@pytest.fixture(autouse=True, scope="module")
def registered():
    assert hm_transformers.register() == "heteromem"


def build(model: str, impl: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    cls, config = MODELS[model]
    torch.manual_seed(0)
    return cls._from_config(config(), attn_implementation=impl).to(device=device, dtype=dtype)


def loss_and_grads(model, ids, attention_mask=None):
    model.zero_grad()
    loss = model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_register_adds_the_attention_and_its_mask_builder():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    assert AttentionInterface._global_mapping["heteromem"] is hm_transformers.attention_forward
    assert AttentionMaskInterface._global_mapping["heteromem"] is sdpa_mask
    assert hm_transformers.register("heteromem") == "heteromem"  # idempotent


@pytest.mark.parametrize("model_name", list(MODELS))
def test_attention_is_routed_through_the_op(model_name, monkeypatch):
    calls = []
    original = hm_transformers.attention

    def spy(q, k, v, causal=False, scale=None):
        calls.append((tuple(q.shape), tuple(k.shape), causal))
        return original(q, k, v, causal=causal, scale=scale)

    monkeypatch.setattr(hm_transformers, "attention", spy)
    model = build(model_name, "heteromem")
    model(input_ids=torch.randint(0, VOCAB, (2, 12)))
    kv_heads = 2 if model_name == "llama" else 4  # GQA reaches the op unexpanded
    assert calls == [((2, 4, 12, 16), (2, kv_heads, 12, 16), True)] * 2


@pytest.mark.parametrize("model_name", list(MODELS))
def test_loss_and_grads_equal_sdpa(model_name):
    ids = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(build(model_name, "sdpa"), ids)
    loss, grads = loss_and_grads(build(model_name, "heteromem"), ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("model_name", list(MODELS))
def test_padding_mask_uses_sdpa_semantics(model_name, monkeypatch):
    monkeypatch.setattr(hm_transformers, "_warned", set())
    ids = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in the first row
    ref_loss, ref_grads = loss_and_grads(build(model_name, "sdpa"), ids, mask)
    with pytest.warns(hm.HeteromemWarning, match="attention mask"):
        loss, grads = loss_and_grads(build(model_name, "heteromem"), ids, mask)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("model_name", list(MODELS))
def test_cached_generation_equals_sdpa(model_name):
    """Prefill (causal, q_len == kv_len) then one-token decode steps (q_len 1, not causal)."""
    prompt = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    outs = {}
    for impl in ("sdpa", "heteromem"):
        model = build(model_name, impl).eval()
        with torch.no_grad():
            outs[impl] = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                        max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(outs["heteromem"], outs["sdpa"])


def test_static_cache_prefill_matches_sdpa():
    """An empty static cache prefills with more (empty) key slots than queries and no mask: the
    slots past the prompt must be ignored, as SDPA's top-left causal mask does there."""
    from transformers import StaticCache

    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    logits = {}
    for impl in ("sdpa", "heteromem"):
        model = build("llama", impl).eval()
        cache = StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            logits[impl] = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(logits["heteromem"], logits["sdpa"], rtol=1e-5, atol=1e-5)


def test_dropout_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(hm_transformers, "_warned", set())
    model = build("llama", "heteromem")
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    with pytest.warns(hm.HeteromemWarning, match="dropout"):
        model(input_ids=torch.randint(0, VOCAB, (1, 8)))


@pytest.mark.cuda
@pytest.mark.parametrize("model_name", list(MODELS))
def test_cuda_bf16_loss_and_grads_match_sdpa(model_name):
    """The kernels inside real models: bf16 loss and gradients against bf16 SDPA, both judged
    against an fp32 SDPA run (the kernel's error at most about SDPA's own)."""
    ids = torch.randint(0, VOCAB, (4, 200), generator=torch.Generator().manual_seed(5)).cuda()
    ref_loss, ref_grads = loss_and_grads(build(model_name, "sdpa", "cuda"), ids)
    sdpa_loss, sdpa_grads = loss_and_grads(build(model_name, "sdpa", "cuda", torch.bfloat16), ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hm.HeteromemWarning)  # the kernel path, no fallback
        loss, grads = loss_and_grads(build(model_name, "heteromem", "cuda", torch.bfloat16), ids)
    assert abs(loss.float() - ref_loss) <= 2 * abs(sdpa_loss.float() - ref_loss) + 1e-2
    for name, grad in grads.items():
        err, sdpa_err = rel_err(grad, ref_grads[name]), rel_err(sdpa_grads[name], ref_grads[name])
        assert err <= 2 * sdpa_err + 1e-3, f"{name}: {err:.3g} vs SDPA's {sdpa_err:.3g}"
