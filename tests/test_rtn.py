"""RTN baselines and the KV fake-quant attention hook on tiny random models."""
import copy

import pytest
import torch
from torch import nn

from ostquant.baselines import apply_rtn
from ostquant.models import (AttentionHookConfig, disable_kv_fake_quant, enable_kv_fake_quant,
                             get_attention_hook, install_attention_hook, remove_attention_hook)
from ostquant.nn import QuantLinear
from tiny_models import tiny_model

PRESETS = ["w4a16kv16", "w4a4kv16", "w4a4kv4"]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def test_w16a16kv16_is_identity(ids):
    model = tiny_model("llama")
    ref = _logits(model, ids)
    q = apply_rtn(copy.deepcopy(model), "w16a16kv16")
    assert torch.equal(_logits(q, ids), ref)
    assert not any(isinstance(m, QuantLinear) for m in q.modules())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_presets_change_logits_but_stay_finite(family, ids):
    model = tiny_model(family)
    ref = _logits(model, ids)
    outs = {}
    for p in PRESETS:
        q = apply_rtn(copy.deepcopy(model), p)
        out = _logits(q, ids)
        assert torch.isfinite(out).all(), p
        assert not torch.equal(out, ref), p
        assert (out - ref).abs().max() < 10 * ref.abs().max(), p
        qlins = [n for n, m in q.named_modules() if isinstance(m, QuantLinear)]
        assert len(qlins) == 14, p  # 7 projections x 2 layers
        assert isinstance(q.lm_head, nn.Linear) and not isinstance(q.lm_head, QuantLinear)
        assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight)
        outs[p] = out
    assert not torch.equal(outs["w4a4kv16"], outs["w4a4kv4"])
    # the original model is untouched
    assert torch.equal(_logits(model, ids), ref)


def test_reused_weights_give_identical_model(ids):
    model = tiny_model("llama")
    first = apply_rtn(copy.deepcopy(model), "w4a16kv16")
    fresh = apply_rtn(copy.deepcopy(model), "w4a4kv4")
    reused = apply_rtn(copy.deepcopy(model), "w4a4kv4", reuse_weights_from=first)
    assert torch.equal(_logits(fresh, ids), _logits(reused, ids))
    for (n1, m1), (n2, m2) in zip(fresh.named_modules(), reused.named_modules()):
        if isinstance(m1, QuantLinear):
            assert m1.config() == m2.config() and torch.equal(m1.qweight, m2.qweight)
    with pytest.raises(ValueError, match="reuse_weights_from"):
        apply_rtn(copy.deepcopy(model), "w4a4kv4", reuse_weights_from=model)


def test_kv_hook_runs_and_quantizes_to_16_levels(ids):
    model = tiny_model("llama")
    seen = []

    def observer(module, q, k, v):
        seen.append((module.layer_idx, q.detach().clone(), k.detach().clone(),
                     v.detach().clone()))

    install_attention_hook(model, AttentionHookConfig(kv_bits=4, observer=observer))
    assert model.config._attn_implementation == "ostquant_sdpa"
    _logits(model, ids)
    assert [s[0] for s in seen] == [0, 1]  # once per layer per forward
    for _, q, k, v in seen:
        assert q.shape == (2, 4, 24, 16)
        assert k.shape == v.shape == (2, 2, 24, 16)  # per KV head, before repeat_kv
        for x in (k, v):
            rows = x.reshape(-1, 16)
            for r in rows:
                levels = torch.unique(r)
                assert len(levels) <= 16
                # the values sit on one uniform grid: offsets are integer multiples of a step
                step = (levels[1:] - levels[:-1]).min()
                k_int = (r - r.min()) / step
                assert torch.allclose(k_int, k_int.round(), atol=1e-3)


def test_kv_on_off_and_disable_restores(ids):
    model = tiny_model("llama")
    ref = _logits(model, ids)
    enable_kv_fake_quant(model, 4)
    assert get_attention_hook(model).kv_bits == 4
    kv4 = _logits(model, ids)
    assert torch.isfinite(kv4).all() and not torch.equal(kv4, ref)
    enable_kv_fake_quant(model, 8)
    kv8 = _logits(model, ids)
    assert (kv8 - ref).abs().max() < (kv4 - ref).abs().max()
    disable_kv_fake_quant(model)
    assert model.config._attn_implementation == "sdpa"
    assert get_attention_hook(model) is None
    assert torch.equal(_logits(model, ids), ref)


def test_kv_hook_on_eager_base(ids):
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    ref = _logits(model, ids)
    calls = []
    install_attention_hook(model, AttentionHookConfig(observer=lambda *a: calls.append(1)))
    assert model.config._attn_implementation == "ostquant_eager"
    assert torch.allclose(_logits(model, ids), ref, atol=1e-6)
    assert len(calls) == 2
    enable_kv_fake_quant(model, 4)  # keeps the observer
    _logits(model, ids)
    assert len(calls) == 4
    remove_attention_hook(model)
    assert model.config._attn_implementation == "eager"


def test_hook_survives_deepcopy(ids):
    model = apply_rtn(tiny_model("llama"), "w4a4kv4")
    clone = copy.deepcopy(model)
    assert torch.equal(_logits(model, ids), _logits(clone, ids))
    assert get_attention_hook(clone).kv_bits == 4


def test_generation_with_cache_runs(ids):
    model = apply_rtn(tiny_model("llama"), "w4a4kv4")
    with torch.no_grad():
        out = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def _hadamard_available():
    try:
        import ostquant.transforms.hadamard_matrices  # noqa: F401
        from ostquant import ops
        ops.hadamard_transform(torch.randn(2, 16), 0.25)
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _hadamard_available(), reason="Hadamard transform not available yet")
def test_q_k_hadamard_preserves_attention(ids):
    model = tiny_model("llama")
    ref = _logits(model, ids)
    install_attention_hook(model, AttentionHookConfig(q_k_hadamard=True))
    assert torch.allclose(_logits(model, ids), ref, atol=1e-4)
