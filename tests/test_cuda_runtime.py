"""QuantLinear and the reference-only ops on CUDA tensors agree with the CPU reference.

Skipped without a GPU (the `cuda` marker in conftest.py)."""
import pytest
import torch
from torch import nn

import ostquant.ops as O
from ostquant.nn import QuantLinear

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("abits", [16, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("online_hadamard", [False, True])
def test_quant_linear_cuda_matches_cpu(abits, dtype, online_hadamard):
    lin = nn.Linear(576, 96)
    q_cpu = QuantLinear.from_linear(lin, abits=abits, online_hadamard=online_hadamard)
    q_gpu = QuantLinear.from_linear(lin.cuda(), abits=abits, online_hadamard=online_hadamard)
    assert torch.equal(q_gpu.qweight.cpu(), q_cpu.qweight)
    x = torch.randn(3, 17, 576)
    y_cpu = q_cpu(x.to(dtype).float()).float()
    y_gpu = q_gpu.to(dtype)(x.to(dtype).cuda()).float().cpu()
    torch.testing.assert_close(y_gpu, y_cpu, rtol=2e-2, atol=2e-2 * y_cpu.abs().max().item())


def test_int4_kv_attention_cuda_matches_cpu():
    b, smax, hkv, hq, d = 2, 40, 2, 6, 64
    caches = [torch.zeros(b, smax, hkv, d // 2, dtype=torch.uint8)] + \
        [torch.zeros(b, smax, hkv, dtype=torch.float16) for _ in range(2)]
    vcaches = [c.clone() for c in caches]
    k, v = torch.randn(b, smax, hkv, d), torch.randn(b, smax, hkv, d)
    O.kv_cache_append(k, v, *caches, *vcaches, torch.zeros(b, dtype=torch.int32))
    lens = torch.tensor([5, 33], dtype=torch.int32)
    q = torch.randn(b, 3, hq, d)
    ref = O.int4_kv_attention(q, *caches, *vcaches, lens)
    out = O.int4_kv_attention(q.cuda(), *[c.cuda() for c in caches], *[c.cuda() for c in vcaches],
                              lens.cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_features", [512, 1536])  # 2^9 and 12·2^7 (a K×K stage)
def test_quant_linear_fused_hadamard_quant_equals_unfused(dtype, in_features):
    """On CUDA, an A4 QuantLinear with an online Hadamard runs one fused Hadamard + quantize +
    pack kernel; it must give exactly the unfused kernels' result."""
    torch.manual_seed(0)
    lin = nn.Linear(in_features, 96).cuda()
    q = QuantLinear.from_linear(lin, abits=4, online_hadamard=True).to(dtype)
    x = (torch.randn(37, in_features, device="cuda") * 3).to(dtype)
    got = q(x)
    h = O.hadamard_transform(x, in_features ** -0.5)
    c, s, z = O.quantize_per_token(h, 4, q.act_sym, q.act_clip_ratio)
    want = O.int4_gemm(O.pack_int4(c), s, None if q.act_sym else z, q.qweight, q.w_scale,
                       q.w_sum, q.bias, out_dtype=dtype)
    assert torch.equal(got, want)


@pytest.mark.parametrize("preset", ["w4a4kv4", "w4a4kv16"])
def test_decoder_fused_norm_quant_on_cuda(preset):
    """CUDA's default fuses RMSNorm + quantization for the qkv and gate|up inputs: logits close
    to the unfused path (codes move by one step only where the float64 and float32 mean squares
    round differently)."""
    from ostquant.runtime import QuantizedCausalLM
    m = QuantizedCausalLM.random("tiny", preset, num_layers=2, dtype=torch.bfloat16,
                                 device="cuda")
    ids = torch.randint(0, 256, (2, 24), device="cuda", generator=torch.Generator(
        "cuda").manual_seed(3))
    fused = m(ids, m.new_cache(2, 24))
    for lay in m.layers:
        lay.fused_norm_quant = False
    plain = m(ids, m.new_cache(2, 24))
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused.float(), plain.float(), rtol=0,
                               atol=0.05 * plain.float().abs().max().item())


@pytest.mark.parametrize("online_hadamard", [False, True])
@pytest.mark.parametrize("M", [5, 37])
def test_quant_linear_int8_codes_equal_packed(online_hadamard, M, monkeypatch):
    """Where the GEMM reads int8 activation codes (the Hopper kernel, M > 16) the A4 layer
    quantizes to int8 codes; its output is bit-identical to the packed-code path's."""
    torch.manual_seed(1)
    lin = nn.Linear(1536, 256).cuda()
    q = QuantLinear.from_linear(lin, abits=4, online_hadamard=online_hadamard).to(torch.bfloat16)
    x = (torch.randn(M, 1536, device="cuda") * 3).to(torch.bfloat16)
    dtypes = []
    real = O.int4_gemm
    monkeypatch.setattr(O, "int4_gemm", lambda xq, *a, **k: dtypes.append(xq.dtype) or
                        real(xq, *a, **k))
    got = q(x)
    assert dtypes == [torch.int8 if q.takes_codes(x) else torch.uint8]
    monkeypatch.setattr(O, "int4_gemm_takes_codes", lambda *a, **k: False)
    want = q(x)
    assert dtypes[-1] == torch.uint8
    assert torch.equal(got, want)
