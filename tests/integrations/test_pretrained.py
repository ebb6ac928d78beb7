"""transformers checkpoints in and out of heteromem: `hm.from_pretrained` (meta-device build,
weights streamed from the folder), `hm.export_pretrained` (a folder transformers loads back,
sharded, with PEFT adapters merged on request) and `hm.unwrap`.

Every model is a tiny Llama built from a config and saved with `save_pretrained` into a
temporary folder: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "runtime"))

import heteromem as hm  # noqa: E402
from wrap_helpers import (assert_losses_close, assert_params_close, lm_batches,  # noqa: E402
                          paging_kwargs, train_lm)

VOCAB = 128
LR, WEIGHT_DECAY = 3e-3, 0.01


def _config(tied: bool = False):
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=tied)


@pytest.fixture
def folder(tmp_path):
    """A saved fp32 Llama in three shards with its index, and the model itself."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config())
    path = tmp_path / "llama"
    model.save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path, model


def _batches(count: int) -> list[torch.Tensor]:
    return lm_batches(VOCAB, count, seed=2)


_train = train_lm


def _wrap_kwargs(model) -> dict:
    return dict(device="cpu", dtype=torch.float32, lr=LR, weight_decay=WEIGHT_DECAY,
                **paging_kwargs(model, 4))


def test_from_pretrained_gives_the_files_values_and_trains_like_transformers(folder):
    path, saved = folder
    model, opt = hm.from_pretrained(path, **_wrap_kwargs(saved))
    assert not model.training  # as transformers' from_pretrained returns it
    assert hm.report(model).chunks >= 4
    got, want = model.state_dict(), saved.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())  # bit-identical

    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    ropt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    batches = _batches(10)
    assert_losses_close(_train(model, opt, batches), _train(ref, ropt, batches))
    assert_params_close(model.state_dict(), ref.state_dict())


def test_wrap_of_a_meta_model_with_the_folder_equals_from_pretrained(folder):
    path, saved = folder
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(_config())
    model, _ = hm.wrap(meta, weights=path, device="cpu", dtype=torch.bfloat16, chunk_mb=0.05)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.state_dict().items())
    # The rotary buffers (not in the files) are computed as the model computes them.
    assert torch.equal(model.model.rotary_emb.inv_freq.float(),
                       saved.model.rotary_emb.inv_freq.to(torch.bfloat16).float())


def test_the_dtype_is_the_checkpoints(tmp_path):
    torch.manual_seed(0)
    saved = transformers.LlamaForCausalLM(_config()).to(torch.bfloat16)
    saved.save_pretrained(tmp_path)
    model, _ = hm.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    got = model.state_dict()
    assert got["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert all(torch.equal(got[k], v) for k, v in saved.state_dict().items())


@pytest.mark.parametrize("tied", [False, True])
def test_export_round_trips_through_transformers(tmp_path, tied):
    torch.manual_seed(0)
    saved = transformers.LlamaForCausalLM(_config(tied))
    saved.save_pretrained(tmp_path / "in")
    model, opt = hm.from_pretrained(tmp_path / "in", **_wrap_kwargs(saved))
    model.train()
    _train(model, opt, _batches(2))
    trained = model.state_dict()
    out = tmp_path / "out"
    hm.export_pretrained(model, out, max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for k, t in trained.items()
        if not (tied and k == "lm_head.weight"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert back.config.tie_word_embeddings == tied
    state = back.state_dict()
    assert set(state) == set(trained)
    assert all(torch.equal(state[k], v) for k, v in trained.items())  # bit-identical
    # Exporting again into the same folder as one file leaves no stale shards behind.
    hm.export_pretrained(model, out)
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]
    again = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert again.state_dict().keys() == state.keys()


def test_export_in_another_dtype(tmp_path, folder):
    path, saved = folder
    model, _ = hm.from_pretrained(path, device="cpu", dtype=torch.float32)
    hm.export_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert back.dtype == torch.bfloat16
    want = saved.state_dict()
    assert all(torch.equal(v, want[k].to(torch.bfloat16)) for k, v in back.state_dict().items())


def _lora_config():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           lora_dropout=0.0)


def test_lora_on_from_pretrained_trains_and_exports_merged(tmp_path, folder):
    path, saved = folder
    model, opt = hm.from_pretrained(path, peft_config=_lora_config(), **_wrap_kwargs(saved))
    assert isinstance(model, peft.PeftModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base = {n: v for n, v in model.state_dict().items() if "lora_" not in n}
    assert all(torch.equal(base[n], saved.state_dict()[
        n.replace("base_model.model.", "").replace(".base_layer", "")]) for n in base)
    model.train()
    losses = _train(model, opt, _batches(1) * 4)  # one batch again and again: it must fall
    assert losses[-1] < losses[0]

    out = tmp_path / "merged"
    hm.export_pretrained(model, out, merged=True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    # The same as PEFT's own merge of the unwrapped model, bit for bit.
    want = hm.unwrap(model).merge_and_unload().state_dict()
    got = merged.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[q], saved.state_dict()[q])  # the adapters did change it


def test_lora_on_a_meta_model_with_wrap_weights(folder):
    path, saved = folder
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(_config())
    model = peft.get_peft_model(base, _lora_config())
    model, opt = hm.wrap(model, weights=path, device="cpu", dtype=torch.float32, lr=LR)
    state = model.state_dict()
    b = "base_model.model.model.layers.1.self_attn.v_proj"
    assert torch.equal(state[f"{b}.base_layer.weight"],
                       saved.state_dict()["model.layers.1.self_attn.v_proj.weight"])
    # The adapters are made as PEFT makes them: B zero, so the model starts as the base.
    assert not state[f"{b}.lora_B.default.weight"].any()
    assert state[f"{b}.lora_A.default.weight"].abs().sum() > 0
    ids = _batches(1)[0]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, saved(input_ids=ids).logits,
                              atol=1e-5)


def test_attn_implementation_passes_through(folder):
    path, _ = folder
    model, _ = hm.from_pretrained(path, device="cpu", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def test_from_pretrained_and_export_errors(tmp_path, folder):
    path, _ = folder
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(hm.CheckpointError, match="holds no weights"):
        hm.from_pretrained(tmp_path / "empty", device="cpu")
    with pytest.raises(ValueError, match="is not a folder"):
        hm.from_pretrained(tmp_path / "nowhere", device="cpu")
    with pytest.raises(TypeError, match="weights= is not an argument here"):
        hm.from_pretrained(path, weights=path)

    model, _ = hm.from_pretrained(path, device="cpu", peft_config=_lora_config())
    with pytest.raises(ValueError, match="PEFT model: pass merged=True"):
        hm.export_pretrained(model, tmp_path / "x")
    plain, _ = hm.from_pretrained(path, device="cpu")
    with pytest.raises(ValueError, match="not a PEFT model"):
        hm.export_pretrained(plain, tmp_path / "x", merged=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        hm.export_pretrained(plain, tmp_path / "file")
    with pytest.raises(hm.NotWrappedError, match="save_pretrained"):
        hm.export_pretrained(transformers.LlamaForCausalLM(_config()), tmp_path / "x")
