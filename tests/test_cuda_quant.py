"""CUDA kernels of the packing / quantization ops against the reference (the specification).

Every comparison is exact: codes, scales and zero points must be bit-identical to
``ostquant.ops.reference`` evaluated both on the same CUDA tensor and on a CPU copy.
Tests marked ``cuda`` skip cleanly without a GPU or without the compiled extension.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ostquant.ops as O
from ostquant.ops import reference as ref

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (shape): odd K, LLaMA sizes, M = 1, leading dims, K not a multiple of the vector width,
# rows longer than the register cache (re-read path), 1-D input.
SHAPES = [(1, 33), (8, 33), (4, 576), (2, 3, 576), (16, 4096), (3, 11008), (1, 1), (5, 2),
          (64, 130), (1000, 576), (2, 40000), (33,)]
KV_SHAPES = [(1, 64), (2, 5, 3, 64), (4, 9, 128), (3, 2), (7, 6), (5, 130), (64,)]
CUDA_OPS = {"pack_int4", "unpack_int4", "quantize_per_token", "quantize_kv"}


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
    """Random rows spanning several orders of magnitude, with outlier channels and special rows
    (zero, constant, all positive, all negative, exact half-way ties, denormals)."""
    g = torch.Generator().manual_seed(seed)
    K = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    rows = x.view(-1, K)
    rows *= torch.exp(2.0 * torch.randn(rows.shape[0], 1, generator=g))
    if K > 4:
        rows[:, :: max(1, K // 7)] *= 25.0
    special = [
        torch.zeros(K),
        torch.full((K,), 0.37),
        torch.rand(K, generator=g) + 0.1,
        -(torch.rand(K, generator=g) + 0.1),
        (torch.arange(K) % 17 - 8).float() * 0.5,  # many exact .5 ties after division
        torch.full((K,), -3.0),
    ]
    if dtype == torch.float32:
        special.append(torch.randn(K, generator=g) * 1e-40)  # denormals
        special.append(torch.randn(K, generator=g) * 1e30)
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
    for name, g, w in zip(("codes", "scale", "zero"), got, want):
        _assert_same(g, w, f"{what} {name}")


# --------------------------------------------------------------------------- CPU: the spec

def test_reference_scale_uses_true_division():
    """The reference divides by the number of levels with IEEE division (not a reciprocal
    multiply, which CUDA uses for tensor / Python scalar): the kernels rely on it."""
    x = torch.rand(4096, 64) * 10
    for bits, sym in ((4, True), (8, True), (4, False), (8, False)):
        scale, _ = ref.compute_qparams(x, bits, sym, 0.9)
        xn = x.numpy()
        qmin, qmax = ref.qrange(bits)
        if sym:
            want = (np.abs(xn).max(-1, keepdims=True) * np.float32(0.9)) / np.float32(qmax)
        else:
            hi = np.maximum(xn.max(-1, keepdims=True), 0) * np.float32(0.9)
            lo = np.minimum(xn.min(-1, keepdims=True), 0) * np.float32(0.9)
            want = (hi - lo) / np.float32(qmax - qmin)
        assert want.dtype == np.float32
        assert np.array_equal(scale.numpy(), want), (bits, sym)


# --------------------------------------------------------------------------- registration

@pytest.mark.cuda
def test_cuda_kernels_registered():
    assert set(O.cuda_ops()) >= CUDA_OPS
    for name in CUDA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ostquant::{name}", "CUDA")


# --------------------------------------------------------------------------- pack / unpack

PACK_SHAPES = [(1, 2), (33, 34), (4, 7, 576), (3, 11008), (1000, 18), (2,), (5, 0), (0, 8)]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", PACK_SHAPES)
def test_pack_int4_matches_reference(shape):
    q = torch.randint(-8, 8, shape, dtype=torch.int8)
    _poison_cuda_cache()
    got = O.pack_int4(q.cuda())
    _assert_same(got, ref.pack_int4(q), "pack_int4")
    _assert_same(got, ref.pack_int4(q.cuda()), "pack_int4 (reference on cuda)")


@pytest.mark.cuda
def test_pack_int4_uses_low_nibble_of_any_int8():
    q = torch.arange(-128, 128, dtype=torch.int8).reshape(4, 64)
    _assert_same(O.pack_int4(q.cuda()), ref.pack_int4(q), "pack_int4 full int8 range")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", PACK_SHAPES)
def test_unpack_int4_matches_reference(shape):
    packed_shape = (*shape[:-1], shape[-1] // 2)
    p = torch.randint(0, 256, packed_shape, dtype=torch.uint8)
    _poison_cuda_cache()
    got = O.unpack_int4(p.cuda())
    _assert_same(got, ref.unpack_int4(p), "unpack_int4")
    assert torch.equal(O.pack_int4(got).cpu(), p)


@pytest.mark.cuda
def test_pack_unpack_misaligned_and_strided_views():
    n = 4099 * 2
    buf = torch.randint(-8, 8, (n + 2,), dtype=torch.int8, device="cuda")
    q = buf[1 : n + 1]  # contiguous, but not 16-byte aligned
    _assert_same(O.pack_int4(q), ref.pack_int4(q.cpu()), "pack_int4 misaligned")
    q2 = torch.randint(-8, 8, (64, 48), dtype=torch.int8, device="cuda").t()  # non-contiguous
    _assert_same(O.pack_int4(q2), ref.pack_int4(q2.cpu()), "pack_int4 transposed")
    pbuf = torch.randint(0, 256, (n + 1,), dtype=torch.uint8, device="cuda")
    p = pbuf[1:]
    _assert_same(O.unpack_int4(p), ref.unpack_int4(p.cpu()), "unpack_int4 misaligned")


# --------------------------------------------------------------------------- per-token quant

@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_quantize_per_token_matches_reference(shape, dtype, bits, sym, clip):
    x = _data(shape, dtype, seed=len(shape) * 1000 + shape[-1])
    xc = x.cuda()
    _poison_cuda_cache()
    got = O.quantize_per_token(xc, bits, sym, clip)
    what = f"quantize_per_token{tuple(shape)} {dtype} bits={bits} sym={sym} clip={clip}"
    _check_triplet(got, ref.quantize_per_token(xc, bits, sym, clip), what + " vs cuda reference")
    _check_triplet(got, ref.quantize_per_token(x, bits, sym, clip), what + " vs cpu reference")


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_quantize_per_token_low_bits(bits, sym):
    x = _data((37, 4096), torch.bfloat16, seed=bits)
    got = O.quantize_per_token(x.cuda(), bits, sym, 0.95)
    _check_triplet(got, ref.quantize_per_token(x, bits, sym, 0.95), f"bits={bits} sym={sym}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_quantize_per_token_views(dtype):
    x = _data((9, 576), dtype)
    buf = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
    view = buf[1:].view(9, 576)  # contiguous, misaligned: scalar-load path
    view.copy_(x.cuda())
    _check_triplet(O.quantize_per_token(view, 4, False, 1.0),
                   ref.quantize_per_token(x, 4, False, 1.0), "misaligned view")
    xt = _data((576, 9), dtype).cuda().t()  # non-contiguous
    _check_triplet(O.quantize_per_token(xt, 8, True, 0.9),
                   ref.quantize_per_token(xt.cpu(), 8, True, 0.9), "transposed view")


@pytest.mark.cuda
def test_quantize_per_token_other_device_and_stream():
    x = _data((128, 4096), torch.float16).cuda()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = O.quantize_per_token(x, 4, False, 1.0)
    s.synchronize()
    _check_triplet(got, ref.quantize_per_token(x, 4, False, 1.0), "side stream")
    if torch.cuda.device_count() > 1:
        x1 = x.to("cuda:1")
        got1 = O.quantize_per_token(x1, 4, False, 1.0)
        assert got1[0].device == x1.device
        _check_triplet(got1, got, "cuda:1")


def _nonfinite_rows(dtype):
    x = _data((12, 64), dtype, seed=5).float()
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2, 7] = -float("inf")
    x[3, :] = float("nan")
    x[4, 0], x[4, 1] = float("inf"), -float("inf")
    return x.to(dtype)  # rows 5.. are finite


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_quantize_per_token_nonfinite_rows(dtype, sym):
    """On the GPU NaN/Inf are not rejected (that would need a sync): they propagate into the
    row's scale/zero exactly as in the reference, and never into other rows."""
    x = _nonfinite_rows(dtype).cuda()
    q, s, z = O.quantize_per_token(x, 4, sym, 0.9)
    rq, rs, rz = ref.quantize_per_token(x, 4, sym, 0.9)
    torch.testing.assert_close(s, rs, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(z, rz, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(s[0]) and torch.isnan(s[3])
    _assert_same(q[5:], rq[5:], "codes of the finite rows")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_quantize_kv_nonfinite_rows(dtype):
    x = _nonfinite_rows(dtype).cuda()
    p, s, z = O.quantize_kv(x)
    rp, rs, rz = ref.quantize_kv(x)
    torch.testing.assert_close(s, rs, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(z, rz, rtol=0, atol=0, equal_nan=True)
    _assert_same(p[5:], rp[5:], "codes of the finite rows")


# --------------------------------------------------------------------------- KV quant

@pytest.mark.cuda
@pytest.mark.parametrize("shape", KV_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_quantize_kv_matches_reference(shape, dtype):
    x = _data(shape, dtype, seed=shape[-1])
    if dtype != torch.float16 and x.dim() > 1 and x.shape[0] > 2:
        x.view(-1, shape[-1])[2] = 1e6  # scale beyond float16 range: clamped to 65504
        x.view(-1, shape[-1])[-1] = 1e-9  # scale underflows float16: becomes 1
    xc = x.cuda()
    _poison_cuda_cache()
    got = O.quantize_kv(xc)
    what = f"quantize_kv{tuple(shape)} {dtype}"
    _check_triplet(got, ref.quantize_kv(xc), what + " vs cuda reference")
    _check_triplet(got, ref.quantize_kv(x), what + " vs cpu reference")


@pytest.mark.cuda
def test_quantize_kv_misaligned_view():
    x = _data((6, 64), torch.bfloat16)
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    view = buf[1:].view(6, 64)  # starts at an odd element
    view.copy_(x.cuda())
    _check_triplet(O.quantize_kv(view), ref.quantize_kv(x), "misaligned view")


# --------------------------------------------------------------------------- opcheck

def _opcheck_cases():
    x = _data((4, 5, 576), torch.bfloat16)
    return [
        ("pack_int4", (torch.randint(-8, 8, (6, 64), dtype=torch.int8),)),
        ("unpack_int4", (torch.randint(0, 256, (6, 32), dtype=torch.uint8),)),
        ("quantize_per_token", (x, 4, False, 1.0)),
        ("quantize_per_token", (x.float(), 8, True, 0.9)),
        ("quantize_kv", (_data((2, 3, 4, 128), torch.float16),)),
    ]


@pytest.mark.cuda
@pytest.mark.parametrize("case", range(5))
def test_opcheck_cuda(case):
    name, args = _opcheck_cases()[case]
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(torch.ops.ostquant, name).default, args)


# --------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    ("pack_int4", lambda: (torch.zeros(4, 5, dtype=torch.int8),), "last dim of q must be even"),
    ("pack_int4", lambda: (torch.zeros(4, 6),), "q must have dtype in (int8)"),
    ("pack_int4", lambda: (torch.zeros((), dtype=torch.int8),), "q must have at least 1 dims"),
    ("unpack_int4", lambda: (torch.zeros(4, 6, dtype=torch.int8),),
     "packed must have dtype in (uint8)"),
    ("quantize_per_token", lambda: (torch.zeros(4, 6, dtype=torch.int32), 4, False, 1.0),
     "x must have dtype in (float16, bfloat16, float32)"),
    ("quantize_per_token", lambda: (torch.zeros(4, 6, dtype=torch.float64), 4, False, 1.0),
     "x must have dtype in"),
    ("quantize_per_token", lambda: (torch.randn(4, 6), 5, False, 1.0),
     "bits must be one of (2, 3, 4, 8), got 5"),
    ("quantize_per_token", lambda: (torch.randn(4, 6), 4, False, 0.0),
     "clip_ratio must be in (0, 1], got 0.0"),
    ("quantize_per_token", lambda: (torch.randn(4, 6), 4, True, 1.5),
     "clip_ratio must be in (0, 1], got 1.5"),
    ("quantize_per_token", lambda: (torch.randn(0, 6), 4, False, 1.0),
     "x is empty (shape (0, 6)); nothing to compute"),
    ("quantize_per_token", lambda: (torch.randn(4, 0), 4, False, 1.0), "x is empty"),
    ("quantize_per_token", lambda: (torch.tensor(1.0), 4, False, 1.0),
     "x must have at least 1 dims"),
    ("quantize_kv", lambda: (torch.randn(4, 7),), "head_dim (last dim of x) must be even, got 7"),
    ("quantize_kv", lambda: (torch.randn(0, 2, 64),), "x is empty"),
    ("quantize_kv", lambda: (torch.zeros(4, 64, dtype=torch.int8),), "x must have dtype in"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: f"{c[0]}-{c[2][:30]}")
def test_bad_input_raises_value_error(case):
    name, make_args, msg = case
    op = getattr(torch.ops.ostquant, name)
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in make_args())
    with pytest.raises(ValueError) as cuda_err:
        op(*args)
    assert f"ostquant.{name}: " in str(cuda_err.value)
    assert msg in str(cuda_err.value)
    # The CUDA kernel's checks say the same as the Python checks of the reference path.
    with pytest.raises(ValueError) as cpu_err:
        op(*make_args())
    assert str(cuda_err.value) == str(cpu_err.value)
