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
