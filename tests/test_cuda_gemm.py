"""CUDA int4 GEMM kernels (csrc/gemm/) against the reference kernels (the specification).

* ``int4_gemm`` (W4A4): the integer sums are exact on every path and the kernels' epilogue
  repeats the reference's float32 operations one by one (no FMA contraction), so the output
  must be **bit-identical** to ``reference.int4_gemm``.
* ``w4a16_gemm``: float32 accumulation in a different order than the reference (and the
  weight scale applied after the sum instead of before), so outputs are compared with a
  tolerance: two ulps of the output dtype plus 2^-16 of Σ|x|·|w| for the float32 rounding.

Both ops dispatch by M and device: M <= 16 runs the small-M tensor-core kernels (with split-K
across CTAs when N is small); M > 16 runs the CUTLASS Hopper kernels on a compute capability 9.0
device when N % 8 == 0 (csrc/gemm/sm90/: one 128x128 tile, stream-K; fp16/bf16 only) and the
portable large-M path (unpack + at::_int_mm / at::mm + epilogue) otherwise. The M sweeps cover
both sides of each boundary; ``SM90_NK`` are shapes the CUTLASS path takes (N % 8 == 0) with K
tails that are not a multiple of its K tile (128 / 64), N not a multiple of its 128-channel
tile, and a small-N / long-K shape that stream-K splits along K. Before each call the CUDA caching allocator is
filled with 0xFF bytes (NaN in fp16/bf16/fp32, -1 in int32 workspaces), so an output element
(or split-K partial) a kernel forgets to write fails the comparison. Tests marked ``cuda`` skip
cleanly without a GPU or without the compiled extension.
"""
from __future__ import annotations

import pytest
import torch

import ostquant.ops as O
from ostquant.ops import reference as ref

M_SWEEP = [1, 3, 7, 16, 17, 64, 333]
# (N, K): K at the minimum granularity (32) and K % 128 != 0 tails, odd N, N below one CTA tile.
SMALL_NK = [(37, 32), (1, 32), (255, 96), (129, 160), (1001, 416)]
# LLaMA-2-7B / LLaMA-3-8B / LLaMA-2-13B projections (N = out_features, K = in_features).
MODEL_NK = {
    "7b-qkvo": (4096, 4096), "7b-up": (11008, 4096), "7b-down": (4096, 11008),
    "8b-kv": (1024, 4096), "8b-up": (14336, 4096), "8b-down": (4096, 14336),
    "13b-qkvo": (5120, 5120), "13b-down": (5120, 13824),
}
MODEL_M = [1, 7, 16, 17, 64, 333, 2048]
# Shapes the CUTLASS sm_90 path takes (N % 8 == 0): K = 32 (one partial K tile), K % 128 != 0,
# N below / not a multiple of one 128-channel tile, a stream-K shape (one output tile, long K).
SM90_NK = [(8, 32), (136, 96), (264, 160), (384, 416), (128, 14336), (1024, 4096)]
# Around 64 and 128 tokens (one 128-token tile and its edges); 1000 leaves a partial tile.
SM90_M = [17, 63, 64, 65, 128, 129, 1000]
FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Relative rounding of one output value (one ulp at the value's binade bottom).
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23}


def _name(d):
    return str(d).replace("torch.", "")


# --------------------------------------------------------------------------- helpers

def _poison_cuda_cache():
    """Fill free memory of the CUDA caching allocator (large and small pools) with 0xFF bytes:
    NaN for fp16/bf16/fp32 outputs, -1 for int32 workspaces. A kernel that leaves part of its
    output (or of a split-K partial) unwritten then returns NaN / wrong sums."""
    big = torch.empty(1 << 27, dtype=torch.uint8, device="cuda").fill_(0xFF)
    small = [torch.empty(1 << 19, dtype=torch.uint8, device="cuda").fill_(0xFF)
             for _ in range(16)]
    torch.cuda.synchronize()
    del big, small


def _w4a4_inputs(M, N, K, sym, bias_dtype, with_wsum, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed * 7919 + M * 31 + N * 7 + K)
    qx = torch.randint(-8, 8, (M, K), generator=g, dtype=torch.int8)
    qw = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    # scales over several orders of magnitude, like real per-token / per-channel scales
    x_scale = torch.rand(M, generator=g) * torch.exp(2 * torch.randn(M, generator=g)) + 1e-3
    w_scale = (torch.rand(N, generator=g) + 0.05) * 1e-2
    x_zero = None if sym else torch.randint(-8, 8, (M,), generator=g).float()
    w_sum = qw.float().sum(-1) if (with_wsum and not sym) else None
    bias = None if bias_dtype is None else (torch.randn(N, generator=g) * 3).to(bias_dtype)
    args = [ref.pack_int4(qx), x_scale, x_zero, ref.pack_int4(qw), w_scale, w_sum, bias]
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def _assert_equal(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.device == want.device, what
    g, w = got.float(), want.float()
    assert not torch.isnan(g).any(), f"{what}: {int(torch.isnan(g).sum())} NaN (unwritten?) outputs"
    if not torch.equal(got, want):
        bad = (g != w).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {bad.shape[0]} of {got.numel()} values differ, first at "
                             f"{i}: got {g[i].item()!r}, want {w[i].item()!r}")


def _check_int4_gemm(M, N, K, sym, bias_dtype, out_dtype, with_wsum=True, seed=0):
    args = _w4a4_inputs(M, N, K, sym, bias_dtype, with_wsum, seed)
    want = ref.int4_gemm(*args, out_dtype)  # on CUDA: float64 sums (exact), float32 epilogue
    _poison_cuda_cache()
    got = O.int4_gemm(*args, out_dtype=out_dtype)
    what = (f"int4_gemm M={M} N={N} K={K} {'sym' if sym else 'asym'} bias={bias_dtype} "
            f"out={_name(out_dtype)} w_sum={'given' if with_wsum else 'None'}")
    _assert_equal(got, want, what)


def _w4a16_inputs(M, N, K, dtype, bias_dtype, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed * 104729 + M * 31 + N * 7 + K)
    x = (torch.randn(M, K, generator=g) * torch.exp(torch.randn(M, 1, generator=g))).to(dtype)
    qw = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    w_scale = (torch.rand(N, generator=g) + 0.05) * 1e-2
    bias = None if bias_dtype is None else torch.randn(N, generator=g).to(bias_dtype)
    args = [x, ref.pack_int4(qw), w_scale, bias]
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args], qw


def _check_w4a16(M, N, K, dtype, bias_dtype, seed=0):
    (x, wp, ws, b), qw = _w4a16_inputs(M, N, K, dtype, bias_dtype, seed)
    want = ref.w4a16_gemm(x, wp, ws, b)
    absdot = x.double().abs() @ (qw.to(x.device).double().abs() * ws.double()[:, None]).T
    _poison_cuda_cache()
    got = O.w4a16_gemm(x, wp, ws, b)
    what = f"w4a16_gemm M={M} N={N} K={K} {_name(dtype)} bias={bias_dtype}"
    assert got.shape == want.shape and got.dtype == want.dtype == dtype, what
    g, w = got.double(), want.double()
    assert not torch.isnan(g).any(), f"{what}: {int(torch.isnan(g).sum())} NaN (unwritten?) outputs"
    tol = 2 * EPS[dtype] * w.abs() + 2.0 ** -16 * absdot + 1e-30
    bad = (g - w).abs() > tol
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {got.numel()} values off; first at {i}: "
                             f"got {g[i].item()!r}, want {w[i].item()!r}, tol {tol[i].item():.3g}")


# --------------------------------------------------------------------------- registration

@pytest.mark.cuda
def test_gemm_cuda_kernels_registered():
    assert {"int4_gemm", "w4a16_gemm"} <= set(O.cuda_ops())
    for name in ("int4_gemm", "w4a16_gemm"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ostquant::{name}", "CUDA")


# --------------------------------------------------------------------------- int4_gemm (W4A4)

@pytest.mark.cuda
@pytest.mark.parametrize("NK", SMALL_NK, ids=lambda s: f"N{s[0]}-K{s[1]}")
@pytest.mark.parametrize("M", M_SWEEP)
def test_int4_gemm_small_shapes(M, NK):
    N, K = NK
    for sym in (True, False):
        for bias_dtype, out_dtype in ((None, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                      (torch.float32, torch.float16), (torch.float16,
                                                                       torch.float32)):
            _check_int4_gemm(M, N, K, sym, bias_dtype, out_dtype)
    _check_int4_gemm(M, N, K, False, None, torch.float16, with_wsum=False)  # w_sum computed


@pytest.mark.cuda
@pytest.mark.parametrize("shape", list(MODEL_NK), ids=str)
@pytest.mark.parametrize("M", MODEL_M)
def test_int4_gemm_model_shapes(M, shape):
    N, K = MODEL_NK[shape]
    _check_int4_gemm(M, N, K, False, torch.bfloat16, torch.bfloat16)
    _check_int4_gemm(M, N, K, True, None, torch.float16)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 16, 17, 64])
def test_int4_gemm_matches_cpu_reference(M):
    """The CUDA reference used above equals the CPU reference (float32 sums, exact here)."""
    args = _w4a4_inputs(M, 301, 608, False, torch.float16, True, device="cpu")
    want = ref.int4_gemm(*args, torch.bfloat16)
    got = O.int4_gemm(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args],
                      out_dtype=torch.bfloat16)
    _assert_equal(got.cpu(), want, f"int4_gemm M={M} vs cpu reference")


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 5, 40])
def test_int4_gemm_end_to_end_quantized(M):
    """Codes from quantize_per_token / quantize_per_channel on the GPU, as QuantLinear uses them."""
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1536, 4096, device="cuda")
    qx, sx, zx = O.quantize_per_token(x, 4, False, 1.0)
    qw, sw, _ = O.quantize_per_channel(w, 4, True)
    args = (O.pack_int4(qx), sx, zx, O.pack_int4(qw), sw, qw.float().sum(-1), None)
    _assert_equal(O.int4_gemm(*args, out_dtype=torch.bfloat16),
                  ref.int4_gemm(*args, torch.bfloat16), f"end-to-end M={M}")


@pytest.mark.cuda
@pytest.mark.parametrize("M", [2, 16, 30])
def test_int4_gemm_k_zero(M):
    args = _w4a4_inputs(M, 19, 0, False, torch.float32, True)
    want = ref.int4_gemm(*args, torch.float32)
    _assert_equal(O.int4_gemm(*args, out_dtype=torch.float32), want, f"K=0 M={M}")
    codes = torch.zeros(M, 0, dtype=torch.int8, device="cuda")
    _assert_equal(O.int4_gemm(codes, *args[1:], out_dtype=torch.float32), want,
                  f"K=0 M={M} int8 codes")


@pytest.mark.cuda
@pytest.mark.parametrize("M", [4, 33])
def test_int4_gemm_views(M):
    """Non-contiguous and misaligned (not 16-byte aligned) inputs are copied, not misread."""
    N, K = 77, 256
    xp, sx, zx, wp, sw, wsum, b = _w4a4_inputs(M, N, K, False, torch.bfloat16, True)
    want = ref.int4_gemm(xp, sx, zx, wp, sw, wsum, b, torch.float16)
    xbuf = torch.empty(M * K // 2 + 1, dtype=torch.uint8, device="cuda")
    x_mis = xbuf[1:].view(M, K // 2)
    x_mis.copy_(xp)
    w_t = wp.t().contiguous().t()  # same values, column-major strides
    sx_s = torch.stack([sx, sx]).t()[:, 0]  # stride 2
    _assert_equal(O.int4_gemm(x_mis, sx_s, zx, w_t, sw, wsum, b, out_dtype=torch.float16), want,
                  f"views M={M}")


@pytest.mark.cuda
def test_int4_gemm_side_stream():
    args = _w4a4_inputs(8, 4096, 4096, False, None, True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = O.int4_gemm(*args, out_dtype=torch.bfloat16)
    s.synchronize()
    _assert_equal(got, ref.int4_gemm(*args, torch.bfloat16), "side stream")


@pytest.mark.cuda
@pytest.mark.parametrize("NK", SM90_NK, ids=lambda s: f"N{s[0]}-K{s[1]}")
@pytest.mark.parametrize("M", SM90_M)
def test_int4_gemm_sm90_shapes(M, NK):
    """Shapes of the CUTLASS path (on other devices: the portable path, same contract)."""
    N, K = NK
    for sym, bias_dtype, out_dtype in ((True, None, torch.bfloat16),
                                       (False, torch.bfloat16, torch.bfloat16),
                                       (False, torch.float32, torch.float16),
                                       (True, torch.float16, torch.float32),
                                       (False, None, torch.float32)):
        _check_int4_gemm(M, N, K, sym, bias_dtype, out_dtype)
    _check_int4_gemm(M, N, K, False, torch.float16, torch.float16, with_wsum=False)


@pytest.mark.cuda
@pytest.mark.parametrize("tile", ["64", "128"])
@pytest.mark.parametrize("M", [17, 64, 65, 300])
def test_sm90_both_tiles_every_m(M, tile, monkeypatch):
    """The Hopper kernels come in two token tiles (64 for M <= 64, 128 above);
    OSTQUANT_GEMM_SM90_TILE forces one, so each runs on both sides of the boundary (both ops,
    both 16-bit types), bit-identical / within rounding."""
    import ostquant._C as C

    monkeypatch.delenv("OSTQUANT_GEMM_SM90_TILE", raising=False)
    assert (C.sm90_gemm_tile(17), C.sm90_gemm_tile(64), C.sm90_gemm_tile(65)) == (64, 64, 128)
    monkeypatch.setenv("OSTQUANT_GEMM_SM90_TILE", tile)
    assert C.sm90_gemm_tile(M) == int(tile)
    for N, K in ((136, 96), (1024, 4096)):
        _check_int4_gemm(M, N, K, False, torch.bfloat16, torch.bfloat16)
        _check_int4_gemm(M, N, K, True, None, torch.float16)
        _check_w4a16(M, N, K, torch.bfloat16, torch.bfloat16)
        _check_w4a16(M, N, K, torch.float16, None)


@pytest.mark.cuda
def test_int4_gemm_sm90_misaligned_vectors():
    """Per-channel vectors that are views at an odd float offset (the CUTLASS epilogue reads them
    4 at a time) are copied, not misread; so are strided per-token vectors."""
    M, N, K = 100, 264, 256
    xp, sx, zx, wp, sw, wsum, b = _w4a4_inputs(M, N, K, False, torch.float32, True)
    want = ref.int4_gemm(xp, sx, zx, wp, sw, wsum, b, torch.bfloat16)

    def shifted(v):
        buf = torch.empty(v.numel() + 1, dtype=v.dtype, device=v.device)
        buf[1:].copy_(v)
        return buf[1:]

    zx_s = torch.stack([zx, zx]).t()[:, 1]
    got = O.int4_gemm(xp, shifted(sx), zx_s, wp, shifted(sw), shifted(wsum), shifted(b),
                      out_dtype=torch.bfloat16)
    _assert_equal(got, want, "misaligned vectors")


def _ran_kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.cuda
def test_large_m_uses_cutlass_on_sm90():
    """On an H100/H200 (compute capability 9.0, extension built for sm_90a) M > 16 runs the
    CUTLASS kernels, not the portable path (no at::_int_mm / cuBLAS GEMM)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUTLASS sm_90a path runs on compute capability 9.0 only")
    args = _w4a4_inputs(256, 512, 512, False, None, True)
    names = _ran_kernels(lambda: O.int4_gemm(*args, out_dtype=torch.bfloat16))
    assert any("cutlass" in n and "GemmUniversal" in n for n in names), names
    (x, wp, ws, b), _ = _w4a16_inputs(40, 512, 512, torch.float16, None)
    names = _ran_kernels(lambda: O.w4a16_gemm(x, wp, ws, b))
    assert any("cutlass" in n and "GemmUniversal" in n for n in names), names


def _sm80_gemm_built():
    try:
        import ostquant._C as C
    except ImportError:
        return False
    return bool(getattr(C, "sm80_gemm", 0))


# Shapes of the int4 IMMA path (128-token x 256-channel tiles, 128-k stages): K = 32 and
# K % 128 != 0, N below / not a multiple of 256, M around one and two token tiles.
IMMA_NK = [(8, 32), (136, 96), (264, 160), (520, 416), (1024, 4096)]
IMMA_M = [17, 127, 128, 129, 300]


@pytest.mark.cuda
@pytest.mark.parametrize("NK", IMMA_NK, ids=lambda s: f"N{s[0]}-K{s[1]}")
@pytest.mark.parametrize("M", IMMA_M)
def test_int4_gemm_imma_shapes(M, NK, monkeypatch):
    """The CUTLASS 2.x int4 IMMA kernel (sm80/, Ampere/Ada), forced with OSTQUANT_GEMM_IMMA=1 so
    a Hopper machine runs it too (int4 mma.sync emulated there): bit-identical to the
    reference, every epilogue variant; float32 output falls back to the portable path."""
    if not _sm80_gemm_built():
        pytest.skip("extension built without the CUTLASS int4 IMMA kernels")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("int4 mma.sync needs sm_80+")
    monkeypatch.setenv("OSTQUANT_GEMM_IMMA", "1")
    N, K = NK
    args = _w4a4_inputs(M, N, K, False, None, True)
    names = _ran_kernels(lambda: O.int4_gemm(*args, out_dtype=torch.bfloat16))
    assert any("GemmWithVisitor" in n for n in names), \
        f"the IMMA kernel did not take M={M} N={N} K={K}: {names}"
    for sym, bias_dtype, out_dtype in ((True, None, torch.bfloat16),
                                       (False, torch.bfloat16, torch.bfloat16),
                                       (False, torch.float32, torch.float16),
                                       (True, torch.float16, torch.float32),
                                       (False, None, torch.float16)):
        _check_int4_gemm(M, N, K, sym, bias_dtype, out_dtype)
    _check_int4_gemm(M, N, K, False, torch.float16, torch.bfloat16, with_wsum=False)


@pytest.mark.cuda
def test_int4_gemm_imma_runs_the_imma_kernel(monkeypatch):
    """OSTQUANT_GEMM_IMMA=1 runs the CUTLASS 2.x visitor kernel (no widening pass, no cuBLAS);
    =0 keeps it off."""
    if not _sm80_gemm_built():
        pytest.skip("extension built without the CUTLASS int4 IMMA kernels")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("int4 mma.sync needs sm_80+")
    args = _w4a4_inputs(256, 512, 512, False, None, True)
    monkeypatch.setenv("OSTQUANT_GEMM_IMMA", "1")
    names = _ran_kernels(lambda: O.int4_gemm(*args, out_dtype=torch.bfloat16))
    assert any("cutlass" in n and "GemmWithVisitor" in n for n in names), names
    assert not any("unpack" in n.lower() for n in names), names
    monkeypatch.setenv("OSTQUANT_GEMM_IMMA", "0")
    names = _ran_kernels(lambda: O.int4_gemm(*args, out_dtype=torch.bfloat16))
    assert not any("GemmWithVisitor" in n for n in names), names


# --------------------------------------------------------------------------- int8 codes

@pytest.mark.cuda
@pytest.mark.parametrize("imma", ["unset", "1"])
@pytest.mark.parametrize("M", [1, 7, 16, 17, 64, 333])
def test_int4_gemm_int8_codes_equal_packed(M, imma, monkeypatch):
    """x as int8 codes [M, K] (what the fused quantizers write with packed=False) gives the
    packed codes' result bit for bit on every path: the Hopper kernel reads them as they are,
    the small-M, IMMA and portable (float32 output) paths pack them first."""
    if imma == "1":
        if not _sm80_gemm_built():
            pytest.skip("extension built without the CUTLASS int4 IMMA kernels")
        monkeypatch.setenv("OSTQUANT_GEMM_IMMA", "1")
    for N, K in ((264, 160), (4096, 4096), (37, 32)):
        for sym, bias_dtype, out_dtype in ((False, torch.bfloat16, torch.bfloat16),
                                           (True, None, torch.float16),
                                           (False, torch.float32, torch.float32)):
            xp, *rest = _w4a4_inputs(M, N, K, sym, bias_dtype, True)
            want = ref.int4_gemm(xp, *rest, out_dtype)
            codes = O.unpack_int4(xp)
            _poison_cuda_cache()
            got = O.int4_gemm(codes, *rest, out_dtype=out_dtype)
            _assert_equal(got, want, f"int8 codes M={M} N={N} K={K} sym={sym} "
                                     f"out={_name(out_dtype)} IMMA={imma}")
            assert torch.equal(codes, O.unpack_int4(xp)), "the op must not write its input"


@pytest.mark.cuda
def test_int4_gemm_takes_codes_matches_the_path(monkeypatch):
    """int4_gemm_takes_codes says True exactly where the Hopper kernel runs (M > 16, 16-bit
    output, compute capability 9.0, CUTLASS built), and then int8 codes skip the widening pass;
    elsewhere it says False."""
    import ostquant._C as C

    dev = torch.device("cuda")
    hopper = torch.cuda.get_device_capability() == (9, 0) and bool(getattr(C, "sm90_gemm", 0))
    assert O.int4_gemm_takes_codes(dev, 256, 512, 512) is hopper
    assert O.int4_gemm_takes_codes(dev, 16, 512, 512) is False
    assert O.int4_gemm_takes_codes(dev, 256, 512, 512, torch.float32) is False
    assert O.int4_gemm_takes_codes(dev, 256, 508, 512) is False  # N % 8 != 0: portable
    if hopper:
        xp, *rest = _w4a4_inputs(256, 512, 512, False, None, True)
        names = _ran_kernels(lambda: O.int4_gemm(O.unpack_int4(xp).contiguous(), *rest,
                                                 out_dtype=torch.bfloat16))
        assert sum("unpack" in n.lower() for n in names) == 1, names  # the test's own unpack
        assert any("cutlass" in n and "GemmUniversal" in n for n in names), names
    if _sm80_gemm_built() and torch.cuda.get_device_capability()[0] >= 8:
        monkeypatch.setenv("OSTQUANT_GEMM_IMMA", "1")  # the IMMA kernel reads packed codes
        assert O.int4_gemm_takes_codes(dev, 256, 512, 512) is False


# --------------------------------------------------------------------------- w4a16_gemm

@pytest.mark.cuda
@pytest.mark.parametrize("NK", SMALL_NK, ids=lambda s: f"N{s[0]}-K{s[1]}")
@pytest.mark.parametrize("M", M_SWEEP)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_name)
def test_w4a16_gemm_small_shapes(M, NK, dtype):
    N, K = NK
    _check_w4a16(M, N, K, dtype, None)
    _check_w4a16(M, N, K, dtype, dtype)
    _check_w4a16(M, N, K, dtype, torch.float32 if dtype != torch.float32 else torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", list(MODEL_NK), ids=str)
@pytest.mark.parametrize("M", MODEL_M)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_name)
def test_w4a16_gemm_model_shapes(M, shape, dtype):
    N, K = MODEL_NK[shape]
    _check_w4a16(M, N, K, dtype, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("NK", SM90_NK, ids=lambda s: f"N{s[0]}-K{s[1]}")
@pytest.mark.parametrize("M", SM90_M)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_name)
def test_w4a16_gemm_sm90_shapes(M, NK, dtype):
    N, K = NK
    _check_w4a16(M, N, K, dtype, None)
    _check_w4a16(M, N, K, dtype, dtype)
    _check_w4a16(M, N, K, dtype, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 16, 17])
def test_w4a16_gemm_k_zero_and_n_zero(M):
    (x, wp, ws, b), _ = _w4a16_inputs(M, 21, 0, torch.bfloat16, torch.bfloat16)
    _assert_equal(O.w4a16_gemm(x, wp, ws, b), ref.w4a16_gemm(x, wp, ws, b), f"K=0 M={M}")
    (x, wp, ws, b), _ = _w4a16_inputs(M, 0, 64, torch.float16, None)
    got = O.w4a16_gemm(x, wp, ws, b)
    assert got.shape == (M, 0) and got.dtype == torch.float16


@pytest.mark.cuda
@pytest.mark.parametrize("M", [3, 40])
def test_w4a16_gemm_views(M):
    N, K = 45, 192
    (x, wp, ws, b), qw = _w4a16_inputs(M, N, K, torch.bfloat16, torch.float16)
    want = ref.w4a16_gemm(x, wp, ws, b)
    xbuf = torch.empty(M * K + 1, dtype=x.dtype, device="cuda")
    x_mis = xbuf[1:].view(M, K)  # 2-byte aligned only
    x_mis.copy_(x)
    x_t = x.t().contiguous().t()
    for xv in (x_mis, x_t):
        got = O.w4a16_gemm(xv, wp, ws, b)
        torch.testing.assert_close(got.float(), want.float(), rtol=2 * EPS[x.dtype], atol=1e-3)


# --------------------------------------------------------------------------- opcheck

def _opcheck_cases():
    w4a4 = _w4a4_inputs(5, 40, 96, False, torch.bfloat16, True, device="cpu")
    w4a4_big = _w4a4_inputs(20, 64, 128, True, None, False, device="cpu")
    (x, wp, ws, b), _ = _w4a16_inputs(3, 40, 160, torch.float16, torch.float16, device="cpu")
    (xb, wpb, wsb, bb), _ = _w4a16_inputs(24, 16, 64, torch.bfloat16, None, device="cpu")
    return [
        ("int4_gemm", (*w4a4, torch.bfloat16)),
        ("int4_gemm", (*w4a4_big, torch.float32)),
        ("w4a16_gemm", (x, wp, ws, b)),
        ("w4a16_gemm", (xb, wpb, wsb, bb)),
        ("int4_gemm", (ref.unpack_int4(w4a4_big[0]), *w4a4_big[1:], torch.bfloat16)),  # codes
    ]


@pytest.mark.cuda
@pytest.mark.parametrize("case", range(5))
def test_gemm_opcheck_cuda(case):
    name, args = _opcheck_cases()[case]
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(torch.ops.ostquant, name).default, args)


# --------------------------------------------------------------------------- bad input

def _w4a4_args(M=4, N=6, K=64, **over):
    args = dict(x_packed=torch.zeros(M, K // 2, dtype=torch.uint8), x_scale=torch.ones(M),
                x_zero=torch.zeros(M), w_packed=torch.zeros(N, K // 2, dtype=torch.uint8),
                w_scale=torch.ones(N), w_sum=None, bias=None, out_dtype=torch.bfloat16)
    args.update(over)
    return tuple(args.values())


def _w4a16_args(M=4, N=6, K=64, **over):
    args = dict(x=torch.randn(M, K), w_packed=torch.zeros(N, K // 2, dtype=torch.uint8),
                w_scale=torch.ones(N), bias=None)
    args.update(over)
    return tuple(args.values())


BAD_INPUTS = [
    ("int4_gemm", lambda: _w4a4_args(x_packed=torch.zeros(4, 32, dtype=torch.float16)),
     "x_packed must have dtype in (uint8, int8), got float16"),
    ("int4_gemm", lambda: _w4a4_args(x_packed=torch.zeros(4, 32, dtype=torch.int8)),
     "K mismatch: x_packed holds K = 32 (int8 codes), w_packed holds K = 64"),
    ("int4_gemm", lambda: _w4a4_args(x_packed=torch.zeros(4, 48, dtype=torch.int8), K=48),
     "K = 48 is not a multiple of 32"),
    ("int4_gemm", lambda: _w4a4_args(x_packed=torch.zeros(4, 2, 32, dtype=torch.uint8)),
     "x_packed must be 2-D, got shape (4, 2, 32)"),
    ("int4_gemm", lambda: _w4a4_args(w_packed=torch.zeros(6, 32)), "w_packed must have dtype in"),
    ("int4_gemm", lambda: _w4a4_args(M=0), "x_packed has M = 0 rows (empty batch)"),
    ("int4_gemm", lambda: _w4a4_args(N=0), "w_packed has N = 0 rows"),
    ("int4_gemm", lambda: _w4a4_args(w_packed=torch.zeros(6, 16, dtype=torch.uint8)),
     "K mismatch: x_packed holds K = 64, w_packed holds K = 32"),
    ("int4_gemm", lambda: _w4a4_args(K=48), "K = 48 is not a multiple of 32"),
    ("int4_gemm", lambda: _w4a4_args(x_scale=torch.ones(4, dtype=torch.float16)),
     "x_scale must have dtype in (float32), got float16"),
    ("int4_gemm", lambda: _w4a4_args(x_scale=torch.ones(4, 1)),
     "x_scale must have shape (4,), got (4, 1)"),
    ("int4_gemm", lambda: _w4a4_args(w_scale=torch.ones(5)), "w_scale must have shape (6,), got (5,)"),
    ("int4_gemm", lambda: _w4a4_args(x_zero=torch.zeros(4, dtype=torch.int32)),
     "x_zero must have dtype in (float32)"),
    ("int4_gemm", lambda: _w4a4_args(w_sum=torch.zeros(7)), "w_sum must have shape (6,)"),
    ("int4_gemm", lambda: _w4a4_args(bias=torch.zeros(6, dtype=torch.int64)),
     "bias must have dtype in (float16, bfloat16, float32), got int64"),
    ("int4_gemm", lambda: _w4a4_args(bias=torch.zeros(3)), "bias must have shape (6,), got (3,)"),
    ("int4_gemm", lambda: _w4a4_args(out_dtype=torch.int8),
     "out_dtype must be float16, bfloat16 or float32, got torch.int8"),
    ("w4a16_gemm", lambda: _w4a16_args(x=torch.zeros(4, 64, dtype=torch.int32)),
     "x must have dtype in (float16, bfloat16, float32), got int32"),
    ("w4a16_gemm", lambda: _w4a16_args(x=torch.randn(2, 2, 64)), "x must be 2-D"),
    ("w4a16_gemm", lambda: _w4a16_args(w_packed=torch.zeros(6, 32, dtype=torch.int8)),
     "w_packed must have dtype in (uint8)"),
    ("w4a16_gemm", lambda: _w4a16_args(M=0), "x has M = 0 rows (empty batch)"),
    ("w4a16_gemm", lambda: _w4a16_args(x=torch.randn(4, 96)),
     "K mismatch: x has K = 96, w_packed holds K = 64"),
    ("w4a16_gemm", lambda: _w4a16_args(K=80), "K = 80 is not a multiple of 32"),
    ("w4a16_gemm", lambda: _w4a16_args(w_scale=torch.ones(6, dtype=torch.float64)),
     "w_scale must have dtype in (float32)"),
    ("w4a16_gemm", lambda: _w4a16_args(bias=torch.zeros(7)), "bias must have shape (6,)"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: f"{c[0]}-{c[2][:30]}")
def test_gemm_bad_input_raises_value_error(case):
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


@pytest.mark.cuda
def test_gemm_mixed_devices_raise():
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _w4a4_args()]
    args[1] = args[1].cpu()  # x_scale on the CPU
    with pytest.raises(ValueError, match="all tensors must be on one device, got x_packed on "
                                         "cuda:0, x_scale on cpu, x_zero on cuda:0"):
        torch.ops.ostquant.int4_gemm(*args)
    x, wp, ws, _ = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _w4a16_args()]
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        torch.ops.ostquant.w4a16_gemm(x, wp, ws.cpu(), None)


# --------------------------------------------------------------------------- CPU: the spec

def test_reference_gemm_inputs_are_exact_on_cpu():
    """The W4A4 comparison above is exact only if the reference's integer sum is: float32 sums
    of int4 products are exact below 2^24 (K ≤ 2^18); our largest test K is 14336."""
    assert max(k for _, k in MODEL_NK.values()) * 64 < 2 ** 24
    args = _w4a4_inputs(3, 5, 64, False, None, True, device="cpu")
    qx, qw = ref.unpack_int4(args[0]).double(), ref.unpack_int4(args[3]).double()
    acc = (qx @ qw.T - args[2].double()[:, None] * qw.sum(-1)[None, :])
    want = (acc * args[1].double()[:, None] * args[4].double()[None, :]).float()
    torch.testing.assert_close(ref.int4_gemm(*args, torch.float32), want, rtol=1e-6, atol=0)
