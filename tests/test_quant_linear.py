"""QuantLinear against the fake-quant math it implements; replacement, save/load, generation."""
import os

import pytest
import torch
from torch import nn

import ostquant.ops as O
from ostquant.nn import QuantLinear, load_quantized_state, replace_linear, save_quantized_state
from ostquant.nn.serialization import CheckpointError
from ostquant.quant import fake_quant, fake_quant_kv, fake_quant_weight, get_preset


def _had(x):
    return O.hadamard_transform(x, x.shape[-1] ** -0.5)


@pytest.mark.parametrize("abits", [16, 4])
@pytest.mark.parametrize("act_sym", [False, True])
@pytest.mark.parametrize("online_hadamard", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_equals_fake_quant_math(abits, act_sym, online_hadamard, dtype):
    lin = nn.Linear(128, 96, bias=True).to(dtype)
    x = torch.randn(2, 7, 128).to(dtype)
    q = QuantLinear.from_linear(lin, abits=abits, act_sym=act_sym, online_hadamard=online_hadamard)
    y = q(x)
    assert y.shape == (2, 7, 96) and y.dtype == dtype
    w = lin.weight.float()
    xin = x.float()
    if online_hadamard:
        w = _had(w)
        xin = _had(x).float()
    wq = fake_quant_weight(w, 4, sym=True, clip_search=True)
    xq = fake_quant(xin, abits, sym=act_sym)
    expected = nn.functional.linear(xq, wq, lin.bias.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_online_hadamard_preserves_function_without_quant_error_budget():
    # With the Hadamard folded into the weight, W4A16 error must stay comparable to plain W4A16.
    lin = nn.Linear(576, 64)
    x = torch.randn(16, 576)
    with torch.no_grad():
        _check_hadamard_error(lin, x)


def _check_hadamard_error(lin, x):
    y = lin(x)
    e_plain = (QuantLinear.from_linear(lin)(x) - y).pow(2).mean()
    e_had = (QuantLinear.from_linear(lin, online_hadamard=True)(x) - y).pow(2).mean()
    assert float(e_had) < 3 * float(e_plain)
    assert float(e_had) < 0.05 * float(y.pow(2).mean())


def test_dtype_cast_keeps_float32_scales():
    lin = nn.Linear(64, 32)
    q = QuantLinear.from_linear(lin, abits=4)
    scale = q.w_scale.clone()
    q = q.to(torch.bfloat16)
    assert q.w_scale.dtype == torch.float32 and torch.equal(q.w_scale, scale)
    assert q.bias.dtype == torch.bfloat16 and q.qweight.dtype == torch.uint8
    y = q(torch.randn(3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_fake_quant_ste_gradient_is_identity():
    x = torch.randn(4, 64, requires_grad=True)
    y = fake_quant(x, 4, sym=False)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert not torch.equal(y.detach(), x.detach())


def test_fake_quant_kv_equals_runtime_cache_values():
    from ostquant.ops import reference as ref

    x = torch.randn(2, 5, 3, 64) * 3
    p, s, z = O.quantize_kv(x)
    assert torch.equal(fake_quant_kv(x, 4), ref.dequantize_kv(p, s, z))


def test_quant_linear_bad_config_and_input():
    with pytest.raises(ValueError, match="abits"):
        QuantLinear(64, 32, abits=8)
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantLinear(48, 32)
    q = QuantLinear.from_linear(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="in_features"):
        q(torch.randn(3, 63))
    with pytest.raises(TypeError):
        QuantLinear.from_linear(nn.Conv1d(3, 3, 1))
    assert q(torch.randn(0, 64)).shape == (0, 32)


def _tiny_llama(vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("preset", ["w4a16kv16", "w4a4kv16"])
def test_replace_all_linears_still_generates(preset):
    model = _tiny_llama()
    cfg = get_preset(preset)
    replace_linear(model, wbits=cfg.wbits, abits=cfg.abits)
    n_q = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_q == 2 * 7 and isinstance(model.lm_head, nn.Linear)
    ids = torch.tensor([[1, 5, 9, 3]])
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)
    assert torch.isfinite(model(ids).logits).all()


def test_save_load_roundtrip_and_corrupt_checkpoint(tmp_path):
    model = _tiny_llama()
    replace_linear(model, abits=4)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    ref_logits = model(ids).logits
    path = os.path.join(tmp_path, "q.safetensors")
    save_quantized_state(model, path)

    fresh = _tiny_llama()
    torch.nn.init.normal_(fresh.model.layers[0].self_attn.q_proj.weight)  # must be overwritten
    load_quantized_state(fresh, path)
    assert isinstance(fresh.model.layers[1].mlp.down_proj, QuantLinear)
    assert torch.equal(fresh(ids).logits, ref_logits)

    # state_dict round trip too
    again = _tiny_llama()
    replace_linear(again, abits=4)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(ids).logits, ref_logits)

    bad = os.path.join(tmp_path, "bad.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 3])
    with pytest.raises(CheckpointError):
        load_quantized_state(_tiny_llama(), bad)
    with open(bad, "wb") as f:
        f.write(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_quantized_state(_tiny_llama(), bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized_state(_tiny_llama(), os.path.join(tmp_path, "missing.safetensors"))
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    with pytest.raises(CheckpointError, match="q_proj|match"):
        load_quantized_state(other, path)
