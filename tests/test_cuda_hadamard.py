"""CUDA Hadamard transform kernel (csrc/hadamard/) against a float64 ``kron(H_K, H_m)``.

The kernel accumulates in float32 in its own order, so outputs are compared with a tolerance:
the output dtype's rounding (half an ulp of each value) plus a float32 accumulation allowance
relative to the row's RMS. Tests marked ``cuda`` skip without a GPU or the compiled extension;
the CPU tests at the bottom check the generated sign-bit table (csrc/hadamard/hadamard_tables.h)
against ``ostquant.transforms.hadamard_matrices``.
"""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import ostquant.ops as O
from ostquant.ops import reference as ref
from ostquant.transforms.hadamard_matrices import hadamard_factor, hadamard_matrix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SIZES = [2, 64, 128, 1024, 4096, 16384, 32768, 12 * 64, 20 * 64, 28 * 512, 36 * 16, 52 * 32,
         60 * 32, 108 * 128, 140 * 32, 156 * 64, 172 * 64]
BATCHES = [1, 3, 129]
# Relative rounding of one output value in each dtype (half an ulp, doubled for safety).
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -22}


def _exact(x: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 ``scale · x @ kron(H_K, H_m)ᵀ`` (dense for small n, factored above)."""
    n = x.shape[-1]
    xd = x.double()
    if n <= 4096:
        h = hadamard_matrix(n).to(device=x.device, dtype=torch.float64)
        return scale * (xd @ h.T)
    K, m = hadamard_factor(n)
    y = ref.fwht_pow2(xd.reshape(*x.shape[:-1], K, m))
    if K > 1:
        y = torch.matmul(hadamard_matrix(K).to(device=x.device, dtype=torch.float64), y)
    return scale * y.reshape(x.shape)


def _assert_close(got: torch.Tensor, x: torch.Tensor, scale: float, what: str):
    want = _exact(x, scale)
    assert got.shape == x.shape and got.dtype == x.dtype, what
    assert got.is_contiguous(), what
    g = got.double()
    assert torch.isfinite(g).all(), f"{what}: non-finite output"
    n = x.shape[-1]
    rms = want.pow(2).mean(-1, keepdim=True).sqrt()
    K, _ = hadamard_factor(n)
    # float32 accumulation: ~eps32 per butterfly stage and per term of the K x K stage.
    tol = EPS[x.dtype] * want.abs() + 8 * 2.0 ** -24 * (math.log2(2 * n) + K) * rms + 1e-30
    err = (g - want).abs()
    bad = err > tol
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {got.numel()} values off; first at {i}: "
                             f"got {g[i].item()!r}, want {want[i].item()!r}, tol {tol[i].item():.3g}")


def _poison_cuda_cache():
    big = torch.empty(1 << 26, dtype=torch.uint8, device="cuda").fill_(0xFF)  # NaN patterns
    torch.cuda.synchronize()
    del big


@pytest.mark.cuda
def test_hadamard_registered():
    assert "hadamard_transform" in O.cuda_ops()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", SIZES)
def test_hadamard_matches_dense(n, batch, dtype):
    g = torch.Generator().manual_seed(n * 1000 + batch)
    x = torch.randn(batch, n, generator=g).to(dtype).cuda()
    x_before = x.clone()
    _poison_cuda_cache()
    scale = n ** -0.5
    got = O.hadamard_transform(x, scale)
    torch.cuda.synchronize()
    assert torch.equal(x, x_before), "input modified"
    _assert_close(got, x, scale, f"n={n} batch={batch} {dtype}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hadamard_scale_default_and_unnormalized(dtype):
    x = torch.randn(5, 768).to(dtype).cuda()
    got = torch.ops.ostquant.hadamard_transform(x)
    assert got.dtype == dtype
    if dtype == torch.float32:
        _assert_close(got, x, 1.0, "scale=1")
    _assert_close(O.hadamard_transform(x, 0.25), x, 0.25, "scale=0.25")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(2, 3, 4, 128), (7, 576), (1, 1, 11008), (4096,), (2, 1),
                                   (3, 12), (5, 24), (2, 4), (300, 64)])
def test_hadamard_leading_dims_and_tiny(shape):
    x = torch.randn(shape).cuda()
    got = O.hadamard_transform(x, 0.5)
    _assert_close(got, x, 0.5, f"shape={shape}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hadamard_non_contiguous_and_offset(dtype):
    base = torch.randn(6, 2 * 576 + 1).to(dtype).cuda()
    views = [base[:, :576], base[:, 1:577], base[:, 577:], base.t().contiguous().t()[:, 2:578],
             torch.randn(576, 8).to(dtype).cuda().t(), base[::2, 3:3 + 576],
             # contiguous views that start mid-vector (offset 1 and 3 elements): realigned copy
             base.reshape(-1)[1:1 + 576], base.reshape(-1)[3:3 + 2 * 576].view(2, 576)]
    for i, v in enumerate(views):
        _assert_close(O.hadamard_transform(v, 576 ** -0.5), v, 576 ** -0.5, f"view {i}")


@pytest.mark.cuda
@pytest.mark.parametrize("n", [172 * 512, 65536, 12 * 16384])
def test_hadamard_long_rows(n):
    """Rows too long for one CTA's shared memory take the split (transpose) path."""
    x = torch.randn(3, n).cuda()
    for dtype in (torch.float32, torch.bfloat16):
        xx = x.to(dtype)
        _assert_close(O.hadamard_transform(xx, n ** -0.5), xx, n ** -0.5, f"n={n} {dtype}")


@pytest.mark.cuda
def test_hadamard_matches_reference_kernel():
    x = torch.randn(33, 11008, dtype=torch.bfloat16).cuda()
    got = O.hadamard_transform(x, 11008 ** -0.5).float()
    want = ref.hadamard_transform(x, 11008 ** -0.5).float()
    assert (got - want).abs().max().item() <= 2 ** -6 * want.abs().max().item()


@pytest.mark.cuda
def test_hadamard_involution_fp32():
    x = torch.randn(64, 14336).cuda()
    s = 14336 ** -0.5
    # kron(H_K, H_m) is not symmetric for Paley K, but H Hᵀ = n I: transform then multiply by Hᵀ.
    y = O.hadamard_transform(x, s)
    h28 = hadamard_matrix(28).to(device="cuda", dtype=torch.float32)
    z = ref.fwht_pow2(y.reshape(64, 28, 512))
    z = torch.matmul(h28.T, z).reshape(64, -1) * s
    assert (z - x).abs().max().item() < 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("case", range(4))
def test_hadamard_opcheck_cuda(case):
    args = [(torch.randn(4, 5, 576, dtype=torch.bfloat16), 576 ** -0.5),
            (torch.randn(3, 4096), 1.0),
            (torch.randn(2, 11008, dtype=torch.float16), 0.01),
            (torch.randn(8, 64), 0.125)][case]
    torch.library.opcheck(torch.ops.ostquant.hadamard_transform.default,
                          (args[0].cuda(), args[1]))


BAD_INPUTS = [
    (lambda: (torch.randn(4, 100),), "unsupported last dim of x"),
    (lambda: (torch.randn(4, 24 * 3),), "no Hadamard matrix construction for n=72"),
    (lambda: (torch.zeros(4, 64, dtype=torch.int32),),
     "x must have dtype in (float16, bfloat16, float32)"),
    (lambda: (torch.zeros(4, 64, dtype=torch.float64),), "x must have dtype in"),
    (lambda: (torch.randn(0, 64),), "x is empty (shape (0, 64)); nothing to compute"),
    (lambda: (torch.randn(4, 0),), "x is empty"),
    (lambda: (torch.tensor(1.0),), "x must have at least 1 dims"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c[1][:30])
def test_hadamard_bad_input_raises_value_error(case):
    make_args, msg = case
    op = torch.ops.ostquant.hadamard_transform
    args = tuple(a.cuda() for a in make_args())
    with pytest.raises(ValueError) as cuda_err:
        op(*args, 1.0)
    assert "ostquant.hadamard_transform: " in str(cuda_err.value)
    assert msg in str(cuda_err.value)
    with pytest.raises(ValueError) as cpu_err:
        op(*make_args(), 1.0)
    assert str(cuda_err.value) == str(cpu_err.value)


# --------------------------------------------------------------------------- CPU: sign table

def _load_generator():
    path = os.path.join(ROOT, "scripts", "gen_hadamard_tables.py")
    spec = importlib.util.spec_from_file_location("_gen_hadamard_tables", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hadamard_table_header_up_to_date():
    gen = _load_generator()
    with open(gen.HEADER) as f:
        assert f.read() == gen.render(), "run scripts/gen_hadamard_tables.py"


def test_hadamard_table_bits_decode_to_matrices():
    """Decode the header's sign bits (as the kernel does) and compare with H_K."""
    import re
    from ostquant.transforms.hadamard_matrices import SUPPORTED_K
    text = open(_load_generator().HEADER).read()
    entries = [tuple(map(int, t)) for t in re.findall(r"\{(\d+), (\d+), (\d+)\},", text)]
    words = [int(w, 16) for w in re.findall(r"0x([0-9a-f]{8})u", text)]
    assert [e[0] for e in entries] == list(SUPPORTED_K)
    for K, off, W in entries:
        h = hadamard_matrix(K)
        for k in range(K):
            for i in range(K):
                bit = (words[off + k * W + i // 32] >> (i % 32)) & 1
                assert (-1.0 if bit else 1.0) == h[i, k].item(), (K, i, k)
