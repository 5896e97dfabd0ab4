"""CUDA kernels of the fused per-token quantization ops against the reference (the spec).

* ``hadamard_quantize_per_token`` (csrc/quant/hadamard_quant.cu): bit-identical packed codes,
  scales and zero points to ``reference.hadamard_quantize_per_token`` evaluated on the same CUDA
  tensor and on a CPU copy, and to the unfused CUDA ops (``hadamard_transform`` →
  ``quantize_per_token`` → ``pack_int4``), for every Hadamard size family (K = 1 and the eleven
  base orders, m from 1 up), LLaMA sizes, M = 1 / odd M / many rows per CTA, fp16/bf16/fp32.
* ``rmsnorm_quantize_per_token`` (csrc/quant/rmsnorm_quant.cu): bit-identical to
  ``reference.rmsnorm_quantize_per_token``. (The one documented exception — the float64 sum
  of squares rounding to a different float32 mean square because its order differs — has a
  probability of order 1e-7 per row and did not occur in these sweeps' design.)

* ``quantize_per_token_packed`` (the packed mode of csrc/quant/row_quant.cuh): bit-identical to
  the reference and to the unfused CUDA ``quantize_per_token`` → ``pack_int4``.

Outputs are poisoned before each call (the caching allocator's free blocks are filled with
junk) so unwritten elements fail. Tests marked ``cuda`` skip without a GPU or the extension.
"""
from __future__ import annotations

import pytest
import torch

import ostquant.ops as O
from ostquant.ops import reference as ref

pytestmark = pytest.mark.cuda

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DT_IDS = ["bf16", "fp16", "fp32"]
FUSED_OPS = {"hadamard_quantize_per_token", "rmsnorm_quantize_per_token",
             "quantize_per_token_packed"}

# Hadamard sizes n = K·m: powers of two 2..32768, every base order K (with m = 1, 2, small and
# large), LLaMA sizes 576 = 36·16, 11008 = 172·64, 14336 = 28·512, 28672 = 28·1024.
HAD_SIZES = [2, 8, 64, 128, 1024, 4096, 16384, 32768,
             12, 24, 12 * 64, 20 * 4, 20 * 64, 28 * 8, 14336, 28672, 36 * 2, 576, 40 * 32,
             52 * 16, 60 * 128, 108 * 2, 108 * 64, 140 * 32, 156 * 64, 172, 172 * 8, 11008,
             172 * 128]
HAD_ROWS = [1, 3, 129]
# Sizes whose fused kernel does not fit one CTA's shared memory (bf16: n·6 bytes > 227 KB; any
# dtype: n·4 bytes): the op falls back to the unfused kernels, still bit-identical while the
# row fits the hadamard_transform kernel (n ≤ 58112 on H100) or the scale is a power of two.
HAD_FALLBACK = [52 * 1024, 65536]
RMS_SIZES = [2, 6, 64, 130, 576, 1536, 4096, 5120, 11008, 14336, 40000]
RMS_ROWS = [1, 7, 300]
SETTINGS = [(4, False, 1.0), (4, True, 0.9), (3, False, 0.95), (2, True, 1.0)]
SET_IDS = ["a4", "s4c.9", "a3c.95", "s2"]


# --------------------------------------------------------------------------- helpers

def _poison_cuda_cache():
    """Fill freed blocks of the CUDA caching allocator with junk, so a kernel that forgets to
    write part of its output returns junk instead of (possibly matching) zeros."""
    big = torch.empty(1 << 26, dtype=torch.uint8, device="cuda").fill_(0xA5)
    small = [torch.empty(1 << 19, dtype=torch.uint8, device="cuda").fill_(0x5A)
             for _ in range(16)]
    torch.cuda.synchronize()
    del big, small


def _data(shape, dtype, seed=0):
    """Rows over several orders of magnitude, outlier channels, special rows (zero, constant,
    all positive, all negative, exact halves)."""
    g = torch.Generator().manual_seed(seed)
    K = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    rows = x.view(-1, K)
    rows *= torch.exp(1.5 * torch.randn(rows.shape[0], 1, generator=g))
    if K > 4:
        rows[:, :: max(1, K // 7)] *= 25.0
    special = [torch.zeros(K), torch.full((K,), 0.37), torch.rand(K, generator=g) + 0.1,
               -(torch.rand(K, generator=g) + 0.1), (torch.arange(K) % 17 - 8).float() * 0.5]
    for i, row in enumerate(special):
        j = 1 + 2 * i
        if j < rows.shape[0]:
            rows[j] = row
    return x.to(dtype)


def _assert_same(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    got, want = got.cpu(), want.cpu()
    if not torch.equal(got, want):
        diff = (got != want).nonzero()
        first = tuple(diff[0].tolist())
        raise AssertionError(f"{what}: {diff.shape[0]} of {got.numel()} elements differ, first "
                             f"at {first}: got {got[first].item()!r}, want {want[first].item()!r}")


def _check_triplet(got, want, what):
    for name, g, w in zip(("packed", "scale", "zero"), got, want):
        _assert_same(g, w, f"{what} {name}")


def test_fused_cuda_kernels_registered():
    assert set(O.cuda_ops()) >= FUSED_OPS
    for name in FUSED_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ostquant::{name}", "CUDA")


# --------------------------------------------------------------------------- Hadamard + quant

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("rows", HAD_ROWS)
@pytest.mark.parametrize("n", HAD_SIZES)
def test_hadamard_quant_matches_reference(n, rows, dtype):
    x = _data((rows, n), dtype, seed=n + rows)
    xc = x.cuda()
    scale = n ** -0.5
    for (bits, sym, clip), sid in zip(SETTINGS, SET_IDS):
        _poison_cuda_cache()
        got = O.hadamard_quantize_per_token(xc, scale, bits, sym, clip)
        what = f"hadamard_quantize n={n} M={rows} {dtype} {sid}"
        _check_triplet(got, ref.hadamard_quantize_per_token(xc, scale, bits, sym, clip),
                       what + " vs cuda reference")
        if sid == "a4":  # the CPU reference is slow for large K: once per shape
            _check_triplet(got, ref.hadamard_quantize_per_token(x, scale, bits, sym, clip),
                           what + " vs cpu reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n", [64, 576, 4096, 11008, 14336])
def test_hadamard_quant_equals_unfused_cuda_ops(n, dtype):
    """Fused == the unfused CUDA op sequence QuantLinear uses today, bit for bit (the
    hadamard_transform kernel sums its K×K stage in the same order)."""
    xc = _data((37, n), dtype, seed=7).cuda()
    got = O.hadamard_quantize_per_token(xc)
    q, s, z = O.quantize_per_token(O.hadamard_transform(xc, n ** -0.5), 4, False, 1.0)
    _check_triplet(got, (O.pack_int4(q), s, z), f"fused vs unfused n={n} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n", [64, 12 * 4, 576, 11008, 14336, 108 * 128])
def test_hadamard_transform_kernel_is_the_ordered_reference(n, dtype):
    """What the fused op's bit-exactness vs the unfused CUDA ops rests on: the
    hadamard_transform kernel (shared butterflies, K×K stage summed k = 0..K−1) equals
    reference.hadamard_transform_ordered bit for bit."""
    xc = _data((33, n), dtype, seed=n).cuda()
    _poison_cuda_cache()
    _assert_same(O.hadamard_transform(xc, n ** -0.5),
                 ref.hadamard_transform_ordered(xc, n ** -0.5), f"hadamard_transform n={n}")


@pytest.mark.parametrize("n", HAD_FALLBACK)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_hadamard_quant_long_rows_fallback(n, dtype):
    """Rows too long for the fused kernel take the unfused kernels: still exact here (52·1024
    fits the hadamard_transform kernel; 65536's split path is exact for its power-of-two
    scale 2^-8)."""
    xc = _data((3, n), dtype, seed=n).cuda()
    _poison_cuda_cache()
    got = O.hadamard_quantize_per_token(xc)
    _check_triplet(got, ref.hadamard_quantize_per_token(xc, n ** -0.5, 4, False, 1.0),
                   f"fallback n={n} {dtype}")


def test_hadamard_quant_many_rows_and_leading_dims():
    x = _data((4, 1000, 64), torch.bfloat16, seed=11).cuda()  # 8 rows per CTA, 4000 rows
    _poison_cuda_cache()
    got = O.hadamard_quantize_per_token(x, 0.125, 4, False, 1.0)
    _check_triplet(got, ref.hadamard_quantize_per_token(x, 0.125, 4, False, 1.0), "4x1000x64")
    x = _data((5, 3, 20 * 2), torch.float16, seed=12).cuda()  # n = 40, n % 8 == 0, m = 2
    _check_triplet(O.hadamard_quantize_per_token(x, 0.3),
                   ref.hadamard_quantize_per_token(x, 0.3, 4, False, 1.0), "5x3x40")
    x = _data((9, 12), torch.float32, seed=13).cuda()  # n = 12: n % 8 != 0 (byte stores), m = 1
    _check_triplet(O.hadamard_quantize_per_token(x, 0.5),
                   ref.hadamard_quantize_per_token(x, 0.5, 4, False, 1.0), "9x12")


def test_hadamard_quant_misaligned_and_strided_views():
    n = 1024
    x = _data((6, n), torch.bfloat16, seed=14)
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    view = buf[1:].view(6, n)  # contiguous but not 16-byte aligned
    view.copy_(x.cuda())
    want = ref.hadamard_quantize_per_token(x, n ** -0.5, 4, False, 1.0)
    _check_triplet(O.hadamard_quantize_per_token(view), want, "misaligned view")
    xt = x.t().contiguous().cuda().t()  # non-contiguous
    _check_triplet(O.hadamard_quantize_per_token(xt), want, "transposed view")


# --------------------------------------------------------------------------- plain, packed

PACKED_SIZES = [2, 6, 64, 130, 576, 4096, 11008, 14336, 40000]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("rows", RMS_ROWS)
@pytest.mark.parametrize("K", PACKED_SIZES)
def test_quantize_per_token_packed_matches_reference(K, rows, dtype):
    x = _data((rows, K), dtype, seed=3 * K + rows)
    xc = x.cuda()
    for (bits, sym, clip), sid in zip(SETTINGS, SET_IDS):
        _poison_cuda_cache()
        got = O.quantize_per_token_packed(xc, bits, sym, clip)
        what = f"quantize_per_token_packed K={K} M={rows} {dtype} {sid}"
        _check_triplet(got, ref.quantize_per_token_packed(x, bits, sym, clip),
                       what + " vs cpu reference")
        q, sc, z = O.quantize_per_token(xc, bits, sym, clip)
        _check_triplet(got, (O.pack_int4(q), sc, z), what + " vs unfused cuda")


def test_quantize_per_token_packed_views_and_leading_dims():
    x = _data((3, 5, 4096), torch.bfloat16, seed=5)
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    xv = buf[1:].view(3, 5, 4096)
    xv.copy_(x.cuda())
    want = ref.quantize_per_token_packed(x, 4, False, 1.0)
    _check_triplet(O.quantize_per_token_packed(xv), want, "misaligned view")
    _check_triplet(O.quantize_per_token_packed(x.cuda().transpose(0, 1).contiguous()
                                               .transpose(0, 1)), want, "non-contiguous")


# --------------------------------------------------------------------------- RMSNorm + quant

@pytest.mark.parametrize("with_weight", [True, False], ids=["w", "now"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("rows", RMS_ROWS)
@pytest.mark.parametrize("K", RMS_SIZES)
def test_rmsnorm_quant_matches_reference(K, rows, dtype, with_weight):
    x = _data((rows, K), dtype, seed=K + rows)
    g = torch.Generator().manual_seed(K)
    w = (torch.rand(K, generator=g) * 2 - 0.5).to(dtype) if with_weight else None
    xc, wc = x.cuda(), (w.cuda() if w is not None else None)
    for (bits, sym, clip), sid in zip(SETTINGS, SET_IDS):
        _poison_cuda_cache()
        got = O.rmsnorm_quantize_per_token(xc, wc, 1e-5, bits, sym, clip)
        what = f"rmsnorm_quantize K={K} M={rows} {dtype} w={with_weight} {sid}"
        _check_triplet(got, ref.rmsnorm_quantize_per_token(xc, wc, 1e-5, bits, sym, clip),
                       what + " vs cuda reference")
        _check_triplet(got, ref.rmsnorm_quantize_per_token(x, w, 1e-5, bits, sym, clip),
                       what + " vs cpu reference")


def test_rmsnorm_quant_misaligned_views_and_eps_zero():
    K = 4096
    x = _data((5, K), torch.bfloat16, seed=21)
    w = torch.rand(K).to(torch.bfloat16)
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    xv = buf[1:].view(5, K)
    xv.copy_(x.cuda())
    wbuf = torch.empty(K + 1, dtype=w.dtype, device="cuda")
    wv = wbuf[1:]
    wv.copy_(w.cuda())
    want = ref.rmsnorm_quantize_per_token(x, w, 1e-6, 4, False, 1.0)
    _check_triplet(O.rmsnorm_quantize_per_token(xv, wv, 1e-6), want, "misaligned x and weight")
    _check_triplet(O.rmsnorm_quantize_per_token(x.cuda(), w.cuda()[None].expand(2, K)[1], 1e-6),
                   want, "weight view")
    x[1] = torch.randn(K).to(x.dtype)  # no zero row: eps = 0 is fine
    _check_triplet(O.rmsnorm_quantize_per_token(x.cuda(), None, 0.0),
                   ref.rmsnorm_quantize_per_token(x, None, 0.0, 4, False, 1.0), "eps = 0")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_nonfinite_rows(dtype):
    """NaN/Inf are not scanned for on the GPU: their rows get NaN scales (as the reference);
    the other rows are unaffected."""
    x = _data((8, 256), dtype, seed=31)
    x[0, 3] = float("nan")
    x[2, 7] = float("inf")
    xc = x.cuda()
    for got, want in (
            (O.hadamard_quantize_per_token(xc, 1 / 16),
             ref.hadamard_quantize_per_token(xc, 1 / 16, 4, False, 1.0)),
            (O.rmsnorm_quantize_per_token(xc, None, 1e-6),
             ref.rmsnorm_quantize_per_token(xc, None, 1e-6, 4, False, 1.0))):
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(got[1][0])
        _assert_same(got[0][3:], want[0][3:], "codes of the finite rows")


# --------------------------------------------------------------------------- int8 codes

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n", [12, 40, 64, 576, 4096, 11008, 14336, 52 * 1024])
def test_hadamard_quant_int8_codes(n, dtype):
    """packed=False (the Hopper GEMM's layout): the reference's codes, one per int8, and exactly
    the unpacked codes of packed=True (8-byte stores for n % 8 == 0, byte stores else; the
    fallback for rows too long for one CTA at 52·1024)."""
    x = _data((37, n), dtype, seed=n + 1)
    xc = x.cuda()
    for (bits, sym, clip), sid in zip(SETTINGS, SET_IDS):
        _poison_cuda_cache()
        got = O.hadamard_quantize_per_token(xc, n ** -0.5, bits, sym, clip, packed=False)
        what = f"hadamard_quantize codes n={n} {dtype} {sid}"
        assert got[0].dtype == torch.int8 and got[0].shape == (37, n)
        _check_triplet(got, ref.hadamard_quantize_per_token(xc, n ** -0.5, bits, sym, clip,
                                                            packed=False), what)
        p, sc, z = O.hadamard_quantize_per_token(xc, n ** -0.5, bits, sym, clip)
        _check_triplet(got, (O.unpack_int4(p), sc, z), what + " vs packed")


@pytest.mark.parametrize("with_weight", [True, False], ids=["w", "now"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("K", [2, 6, 130, 576, 4096, 11008, 40000])
def test_rmsnorm_quant_int8_codes(K, dtype, with_weight):
    """packed=False: the reference's codes one per int8 (vector stores for K % 8 == 0, pairs
    else, rows longer than the register cache re-read), == the unpacked packed=True codes."""
    x = _data((7, K), dtype, seed=K + 2)
    w = (torch.rand(K) * 2 - 0.5).to(dtype).cuda() if with_weight else None
    xc = x.cuda()
    for (bits, sym, clip), sid in zip(SETTINGS, SET_IDS):
        _poison_cuda_cache()
        got = O.rmsnorm_quantize_per_token(xc, w, 1e-5, bits, sym, clip, packed=False)
        what = f"rmsnorm_quantize codes K={K} {dtype} w={with_weight} {sid}"
        assert got[0].dtype == torch.int8 and got[0].shape == (7, K)
        _check_triplet(got, ref.rmsnorm_quantize_per_token(xc, w, 1e-5, bits, sym, clip,
                                                           packed=False), what)
        p, sc, z = O.rmsnorm_quantize_per_token(xc, w, 1e-5, bits, sym, clip)
        _check_triplet(got, (O.unpack_int4(p), sc, z), what + " vs packed")


# --------------------------------------------------------------------------- opcheck

def _opcheck_cases():
    xb = _data((4, 5, 576), torch.bfloat16)
    return [
        ("hadamard_quantize_per_token", (xb, 576 ** -0.5)),
        ("hadamard_quantize_per_token", (_data((3, 11008), torch.float16), 0.01, 3, True, 0.9)),
        ("hadamard_quantize_per_token", (_data((2, 64), torch.float32), 0.125, 4, False, 1.0)),
        ("rmsnorm_quantize_per_token", (xb, torch.rand(576).to(torch.bfloat16), 1e-6)),
        ("rmsnorm_quantize_per_token", (_data((3, 4096), torch.float16), None, 1e-5, 4, True)),
        ("quantize_per_token_packed", (xb,)),
        ("quantize_per_token_packed", (_data((3, 130), torch.float32), 3, True, 0.9)),
        ("hadamard_quantize_per_token", (xb, 576 ** -0.5, 4, False, 1.0, False)),
        ("rmsnorm_quantize_per_token", (xb, None, 1e-6, 4, True, 1.0, False)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck_cuda(case):
    name, args = _opcheck_cases()[case]
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(torch.ops.ostquant, name).default, args)


# --------------------------------------------------------------------------- bad input

_H = "hadamard_quantize_per_token"
_R = "rmsnorm_quantize_per_token"
_P = "quantize_per_token_packed"
BAD_INPUTS = [
    (_P, lambda: (torch.zeros(4, 64, dtype=torch.int8),), "x must have dtype in"),
    (_P, lambda: (torch.randn(0, 64),), "x is empty"),
    (_P, lambda: (torch.randn(4, 33),), "last dim of x must be even"),
    (_P, lambda: (torch.randn(4, 64), 8), "bits must be one of (2, 3, 4), got 8"),
    (_P, lambda: (torch.randn(4, 64), 4, False, 0.0), "clip_ratio must be in (0, 1]"),
    (_H, lambda: (torch.zeros(4, 64, dtype=torch.int32), 1.0), "x must have dtype in"),
    (_H, lambda: (torch.tensor(1.0), 1.0), "x must have at least 1 dims"),
    (_H, lambda: (torch.randn(0, 64), 1.0), "x is empty"),
    (_H, lambda: (torch.randn(4, 50), 1.0), "unsupported last dim of x"),
    (_H, lambda: (torch.randn(4, 1), 1.0), "last dim of x must be even"),
    (_H, lambda: (torch.randn(4, 64), 1.0, 8), "bits must be one of (2, 3, 4), got 8"),
    (_H, lambda: (torch.randn(4, 64), 1.0, 4, False, 0.0), "clip_ratio must be in (0, 1]"),
    (_R, lambda: (torch.zeros(4, 64, dtype=torch.float64), None, 1e-6), "x must have dtype in"),
    (_R, lambda: (torch.randn(4, 0), None, 1e-6), "x is empty"),
    (_R, lambda: (torch.randn(4, 7), None, 1e-6), "last dim of x must be even"),
    (_R, lambda: (torch.randn(4, 64, dtype=torch.bfloat16), torch.ones(64), 1e-6),
     "weight must have dtype in (bfloat16), got float32"),
    (_R, lambda: (torch.randn(4, 64), torch.ones(32), 1e-6), "weight must have shape (64,)"),
    (_R, lambda: (torch.randn(4, 64), None, -1e-6), "eps must be finite and >= 0, got -1e-06"),
    (_R, lambda: (torch.randn(4, 64), None, float("inf")), "eps must be finite and >= 0, got inf"),
    (_R, lambda: (torch.randn(4, 64), None, 1e-6, 5), "bits must be one of (2, 3, 4), got 5"),
    (_R, lambda: (torch.randn(4, 64), None, 1e-6, 4, True, 1.5), "clip_ratio must be in (0, 1]"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: f"{c[0][:7]}-{c[2][:30]}")
def test_bad_input_raises_value_error(case):
    name, make_args, msg = case
    op = getattr(torch.ops.ostquant, name)
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in make_args())
    with pytest.raises(ValueError) as cuda_err:
        op(*args)
    assert f"ostquant.{name}: " in str(cuda_err.value)
    assert msg in str(cuda_err.value)
    # The CUDA op's checks say the same as the Python checks of the reference path.
    with pytest.raises(ValueError) as cpu_err:
        op(*make_args())
    assert str(cuda_err.value) == str(cpu_err.value)


def test_rmsnorm_weight_on_another_device():
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        O.rmsnorm_quantize_per_token(x, torch.ones(64), 1e-6)
