"""Reference ops against independent float64 math, opcheck for every op, and bad input."""
import math

import pytest
import torch

import ostquant.ops as O
from ostquant.ops import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------- packing

def test_pack_layout_low_nibble_first():
    q = torch.tensor([[1, -1, 7, -8]], dtype=torch.int8)
    p = O.pack_int4(q)
    assert p.dtype == torch.uint8
    assert p.tolist() == [[0xF1, 0x87]]  # elem 0 -> low nibble, elem 1 -> high nibble


def test_pack_unpack_roundtrip_all_values():
    q = torch.randint(-8, 8, (7, 3, 64), dtype=torch.int8)
    assert torch.equal(O.unpack_int4(O.pack_int4(q)), q)
    allv = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(allv, allv).reshape(1, -1)
    assert torch.equal(O.unpack_int4(O.pack_int4(pairs)), pairs)



def test_unpack_every_byte_against_python_ints():
    # the byte format spelled out with Python integers, independent of the tensor tricks
    def signed(n):
        return n - 16 if n >= 8 else n
    want = [v for b in range(256) for v in (signed(b & 0xF), signed(b >> 4))]
    allb = torch.arange(256, dtype=torch.uint8)
    got = ref.unpack_int4(allb.reshape(4, 64))
    assert got.dtype == torch.int8 and got.shape == (4, 128)
    assert got.reshape(-1).tolist() == want
    assert ref.unpack_int4(allb.reshape(16, 16)[:, ::2]).reshape(-1).tolist() == \
        [v for b in range(0, 256, 2) for v in (signed(b & 0xF), signed(b >> 4))]  # strided input
    assert ref.unpack_int4(torch.empty(0, 3, dtype=torch.uint8)).shape == (0, 6)

# --------------------------------------------------------------------------- quantization

def _qparams64(x, bits, sym, clip):
    x = x.double()
    qmax = 2 ** (bits - 1) - 1
    qmin = -(2 ** (bits - 1))
    if sym:
        s = x.abs().amax(-1) * clip / qmax
        z = torch.zeros_like(s)
    else:
        hi = x.amax(-1).clamp(min=0) * clip
        lo = x.amin(-1).clamp(max=0) * clip
        s = (hi - lo) / (2 ** bits - 1)
        z = torch.round(-lo / s) + qmin
    return s, z


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (5, 33), (2, 3, 576)])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_quantize_per_token_vs_float64(dtype, bits, sym, shape, clip):
    x = (torch.randn(shape) * 3).to(dtype)
    x[..., 0] = 40.0  # an outlier channel
    q, s, z = O.quantize_per_token(x, bits, sym, clip)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.shape == x.shape[:-1] and z.shape == x.shape[:-1]
    s64, z64 = _qparams64(x, bits, sym, clip)
    torch.testing.assert_close(s.double(), s64, rtol=1e-6, atol=0)
    assert torch.equal(z.double(), z64) or (z.double() - z64).abs().max() <= 1
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    # Dequantization error is at most half a step for values inside the (clipped) range.
    xd = (q.double() - z.double()[..., None]) * s.double()[..., None]
    xx = x.double()
    if sym:
        hi = xx.abs().amax(-1) * clip
        lo = -hi
    else:
        hi = xx.amax(-1).clamp(min=0) * clip
        lo = xx.amin(-1).clamp(max=0) * clip
    eps = 1e-4 * s.double()[..., None]  # float32 scale rounding at the range ends
    inside = (xx >= lo[..., None] - eps) & (xx <= hi[..., None] + eps)
    err = (xd - x.double()).abs()
    assert bool((err[inside] <= (s.double()[..., None].expand_as(err)[inside] * 0.5001 + 1e-6)).all())
    if clip == 1.0:
        assert bool(inside.all())


def test_quantize_zero_rows_are_exact():
    x = torch.zeros(3, 64)
    for sym in (True, False):
        q, s, z = O.quantize_per_token(x, 4, sym)
        assert torch.equal(ref.dequantize(q, s[:, None], z[:, None]), x)
        assert bool((s == 1).all())


@pytest.mark.parametrize("sym", [True, False])
def test_quantize_per_channel_clip_search_reduces_error(sym):
    w = torch.randn(32, 128)
    w[:, 3] *= 12  # heavy tails make clipping worthwhile
    q0, s0, z0 = O.quantize_per_channel(w, 4, sym, clip_search=False)
    q1, s1, z1 = O.quantize_per_channel(w, 4, sym, clip_search=True)
    e0 = (ref.dequantize(q0, s0[:, None], z0[:, None]) - w).abs().pow(2.4).sum(-1)
    e1 = (ref.dequantize(q1, s1[:, None], z1[:, None]) - w).abs().pow(2.4).sum(-1)
    assert bool((e1 <= e0 + 1e-5).all())
    assert float(e1.sum()) < float(e0.sum())
    # Brute force over the same grid for one row agrees with the vectorised search.
    row = w[5:6]
    best = min(((ref.dequantize(*_q(row, r, sym)) - row).abs().pow(2.4).sum().item(), -r)
               for r in [1 - i / 100 for i in range(81)])
    r_star = -best[1]
    ratio = ref.search_clip_ratio(row, 4, sym)
    assert abs(float(ratio) - r_star) < 1e-6  # ratio is stored in float32


def _q(row, r, sym):
    s, z = ref.compute_qparams(row, 4, sym, r)
    return ref.quantize_with(row, s, z, 4), s, z


# --------------------------------------------------------------------------- GEMMs

def _make_gemm(m, n, k, sym, bias, dtype=torch.float32):
    x = torch.randn(m, k) * 2
    w = torch.randn(n, k)
    qx, sx, zx = O.quantize_per_token(x, 4, sym)
    qw, sw, _ = O.quantize_per_channel(w, 4, True)
    b = torch.randn(n, dtype=dtype) if bias else None
    return qx, sx, zx, qw, sw, b


@pytest.mark.parametrize("m,n,k", [(1, 32, 32), (7, 48, 64), (33, 96, 576)])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_int4_gemm_vs_float64(m, n, k, sym, bias, out_dtype):
    qx, sx, zx, qw, sw, b = _make_gemm(m, n, k, sym, bias, out_dtype)
    y = O.int4_gemm(O.pack_int4(qx), sx, None if sym else zx, O.pack_int4(qw), sw, None, b,
                    out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    xd = (qx.double() - zx.double()[:, None]) * sx.double()[:, None]
    wd = qw.double() * sw.double()[:, None]
    y64 = xd @ wd.T + (b.double() if bias else 0)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[out_dtype]
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol * y64.abs().max().item())


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_int4_gemm_int8_codes_equal_packed(sym, out_dtype):
    """x given as int8 codes [M, K] (the Hopper kernel's layout) == the same codes packed."""
    qx, sx, zx, qw, sw, b = _make_gemm(9, 48, 96, sym, True, out_dtype)
    z = None if sym else zx
    want = O.int4_gemm(O.pack_int4(qx), sx, z, O.pack_int4(qw), sw, None, b, out_dtype)
    got = O.int4_gemm(qx, sx, z, O.pack_int4(qw), sw, None, b, out_dtype)
    assert got.dtype == out_dtype and torch.equal(got, want)


def test_int4_gemm_int8_codes_bad_input():
    qx, sx, zx, qw, sw, _ = _make_gemm(4, 32, 64, False, False)
    pw = O.pack_int4(qw)
    bad = qx.clone()
    bad[1, 3] = 9
    with pytest.raises(ValueError, match=r"int8 codes outside the int4 range \[-8, 7\] "
                                         r"\(min -8, max 9\)"):
        O.int4_gemm(bad, sx, zx, pw, sw)
    with pytest.raises(ValueError, match=r"K mismatch: x_packed holds K = 32 \(int8 codes\), "
                                         r"w_packed holds K = 64"):
        O.int4_gemm(qx[:, :32], sx, zx, pw, sw)
    with pytest.raises(ValueError, match=r"x_packed must have dtype in \(uint8, int8\)"):
        O.int4_gemm(qx.short(), sx, zx, pw, sw)
    assert O.int4_gemm_takes_codes(torch.device("cpu"), 64, 32, 64) is False
    # K = 0 (an empty reduction) works in both layouts: y = bias
    e8, eu, ew = (torch.zeros(3, 0, dtype=torch.int8), torch.zeros(3, 0, dtype=torch.uint8),
                  torch.zeros(8, 0, dtype=torch.uint8))
    b = torch.randn(8)
    args = (torch.ones(3), None, ew, torch.ones(8), None, b, torch.float32)
    assert torch.equal(O.int4_gemm(e8, *args), O.int4_gemm(eu, *args))
    assert torch.equal(O.int4_gemm(e8, *args), b.expand(3, 8))


def test_int4_gemm_wsum_given_equals_computed():
    qx, sx, zx, qw, sw, _ = _make_gemm(4, 32, 64, False, False)
    args = (O.pack_int4(qx), sx, zx, O.pack_int4(qw), sw)
    y1 = O.int4_gemm(*args, None, None, torch.float32)
    y2 = O.int4_gemm(*args, qw.float().sum(-1), None, torch.float32)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a16_gemm_vs_float64(dtype):
    x = torch.randn(5, 96).to(dtype)
    w = torch.randn(40, 96)
    qw, sw, _ = O.quantize_per_channel(w, 4, True, clip_search=True)
    b = torch.randn(40, dtype=dtype)
    y = O.w4a16_gemm(x, O.pack_int4(qw), sw, b)
    assert y.dtype == dtype
    y64 = x.double() @ (qw.double() * sw.double()[:, None]).T + b.double()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol * y64.abs().max().item())


# --------------------------------------------------------------------------- Hadamard

@pytest.mark.parametrize("n", [1, 2, 64, 1024, 12 * 4, 20, 28 * 2, 36 * 16, 40, 52, 60,
                               108 * 2, 140, 156, 172 * 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_hadamard_transform_vs_dense_float64(n, dtype):
    from ostquant.transforms.hadamard_matrices import hadamard_factor, hadamard_matrix

    x = torch.randn(3, n).to(dtype)
    y = O.hadamard_transform(x, n ** -0.5)
    assert y.dtype == dtype and y.shape == x.shape
    K, m = hadamard_factor(n)
    H = torch.kron(hadamard_matrix(K), hadamard_matrix(m)) if K > 1 else hadamard_matrix(m)
    y64 = (x.double() @ H.T) * n ** -0.5
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol * max(1.0, y64.abs().max().item()))


def test_hadamard_is_orthonormal_and_invertible():
    for n in (576, 1536, 256):
        x = torch.randn(4, n, dtype=torch.float32)
        y = O.hadamard_transform(x, n ** -0.5)
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_kv_matches_float64(dtype):
    x = (torch.randn(2, 5, 3, 64) * 4).to(dtype)
    p, s, z = O.quantize_kv(x)
    assert p.shape == (2, 5, 3, 32) and s.dtype == torch.float16 and z.dtype == torch.float16
    xd = ref.dequantize_kv(p, s, z).double()
    hi = x.double().amax(-1).clamp(min=0)
    lo = x.double().amin(-1).clamp(max=0)
    torch.testing.assert_close(s.double(), ((hi - lo) / 15), rtol=1e-3, atol=0)  # fp16 scale
    # half a step, plus the fp16 rounding of the scale accumulated over 15 steps
    assert bool(((xd - x.double()).abs() <= s.double()[..., None] * (0.5 + 15 * 2 ** -11)).all())
    q = O.unpack_int4(p)
    assert int(q.min()) >= -8 and int(q.max()) <= 7


def _cache(b, smax, hkv, d):
    return (torch.zeros(b, smax, hkv, d // 2, dtype=torch.uint8),
            torch.zeros(b, smax, hkv, dtype=torch.float16),
            torch.zeros(b, smax, hkv, dtype=torch.float16))


def test_kv_cache_append_positions_and_contents():
    b, hkv, d, smax = 3, 2, 64, 16
    kc, ks, kz = _cache(b, smax, hkv, d)
    vc, vs, vz = _cache(b, smax, hkv, d)
    lens = torch.tensor([0, 5, 11], dtype=torch.int32)
    k = torch.randn(b, 4, hkv, d)
    v = torch.randn(b, 4, hkv, d)
    O.kv_cache_append(k, v, kc, ks, kz, vc, vs, vz, lens)
    kp, kss, kzz = O.quantize_kv(k)
    for i, L in enumerate(lens.tolist()):
        assert torch.equal(kc[i, L:L + 4], kp[i])
        assert torch.equal(ks[i, L:L + 4], kss[i]) and torch.equal(kz[i, L:L + 4], kzz[i])
        assert bool((kc[i, :L] == 0).all()) and bool((kc[i, L + 4:] == 0).all())
    with pytest.raises(ValueError, match="cache full"):
        O.kv_cache_append(k, v, kc, ks, kz, vc, vs, vz, torch.tensor([0, 0, 13], dtype=torch.int32))


def test_int4_kv_tensors_layout_and_use():
    """ops.int4_kv_tensors: the op shapes, scale/zero stored head-major, initial values; the
    reference append / attention on it give what they give on a contiguous cache."""
    codes, scale, zero = O.int4_kv_tensors(2, 16, 3, 64)
    assert codes.shape == (2, 16, 3, 32) and codes.dtype == torch.uint8 and codes.is_contiguous()
    for t in (scale, zero):
        assert t.shape == (2, 16, 3) and t.dtype == torch.float16
        assert t.stride() == (48, 1, 16)  # [2, 3, 16] in memory
    assert bool((scale == 1).all()) and bool((zero == 0).all()) and bool((codes == 0).all())
    hm = [O.int4_kv_tensors(2, 16, 3, 64) for _ in range(2)]
    tm = [[t.contiguous() for t in side] for side in hm]
    k, v = torch.randn(2, 5, 3, 64), torch.randn(2, 5, 3, 64)
    lens = torch.tensor([0, 7], dtype=torch.int32)
    for c in (hm, tm):
        O.kv_cache_append(k, v, *c[0], *c[1], lens)
    for a, b in zip(hm[0] + hm[1], tm[0] + tm[1]):
        assert torch.equal(a, b)
    q = torch.randn(2, 1, 6, 64)
    assert torch.equal(O.int4_kv_attention(q, *hm[0], *hm[1], lens + 5),
                       O.int4_kv_attention(q, *tm[0], *tm[1], lens + 5))
    with pytest.raises(ValueError, match="head_dim"):
        O.int4_kv_tensors(1, 16, 2, 96)
    for bad in ((0, 16, 2), (1, 16.0, 2), (1, 16, True)):
        with pytest.raises(ValueError, match="integer >= 1"):
            O.int4_kv_tensors(*bad, 64)


def _attn64(q, k, v, lens, sq, causal, scale):
    """Per-sequence float64 attention with explicit GQA expansion."""
    B, _, hq, d = q.shape
    hkv = k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(B):
        L = int(lens[b])
        kb = k[b, :L].double().repeat_interleave(hq // hkv, dim=1)  # [L, hq, d]
        vb = v[b, :L].double().repeat_interleave(hq // hkv, dim=1)
        for i in range(sq):
            pos = L - sq + i
            upto = pos + 1 if causal else L
            for h in range(hq):
                sc = (kb[:upto, h] @ q[b, i, h].double()) * scale
                out[b, i, h] = torch.softmax(sc, 0) @ vb[:upto, h]
    return out


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sq,causal", [(1, True), (3, True), (3, False)])
def test_int4_kv_attention_vs_float64(hq, hkv, d, sq, causal):
    b, smax = 3, 24
    kc, ks, kz = _cache(b, smax, hkv, d)
    vc, vs, vz = _cache(b, smax, hkv, d)
    lens = torch.tensor([sq, 9, 17], dtype=torch.int32)
    k = torch.randn(b, smax, hkv, d)
    v = torch.randn(b, smax, hkv, d)
    O.kv_cache_append(k, v, kc, ks, kz, vc, vs, vz, torch.zeros(b, dtype=torch.int32))
    q = torch.randn(b, sq, hq, d)
    out = O.int4_kv_attention(q, kc, ks, kz, vc, vs, vz, lens, causal=causal)
    kd = ref.dequantize_kv(kc, ks, kz)
    vd = ref.dequantize_kv(vc, vs, vz)
    exp = _attn64(q, kd, vd, lens, sq, causal, d ** -0.5)
    torch.testing.assert_close(out.double(), exp, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- opcheck

def _opcheck_cases():
    x = torch.randn(6, 64)
    q, s, z = O.quantize_per_token(x, 4, False)
    w = torch.randn(32, 64)
    qw, sw, _ = O.quantize_per_channel(w, 4, True)
    kc, ks, kz = _cache(2, 8, 2, 64)
    vc, vs, vz = _cache(2, 8, 2, 64)
    lens = torch.tensor([3, 8], dtype=torch.int32)
    k = torch.randn(2, 8, 2, 64)
    ostq = torch.ops.ostquant
    return [
        (ostq.pack_int4.default, (q,)),
        (ostq.unpack_int4.default, (O.pack_int4(q),)),
        (ostq.quantize_per_token.default, (x, 4, False, 1.0)),
        (ostq.quantize_per_token.default, (x.half(), 8, True, 0.9)),
        (ostq.quantize_per_channel.default, (w, 4, True, True, 0.8, 20, 2.4)),
        (ostq.int4_gemm.default, (O.pack_int4(q), s, z, O.pack_int4(qw), sw, None, None,
                                  torch.float16)),
        (ostq.int4_gemm.default, (q, s, z, O.pack_int4(qw), sw, None, None, torch.bfloat16)),
        (ostq.w4a16_gemm.default, (x, O.pack_int4(qw), sw, torch.randn(32))),
        (ostq.hadamard_transform.default, (torch.randn(3, 5, 576), 0.5)),
        (ostq.quantize_kv.default, (k,)),
        (ostq.kv_cache_append.default, (k[:, :2], k[:, 2:4], kc, ks, kz, vc, vs, vz,
                                        torch.tensor([0, 6], dtype=torch.int32))),
        (ostq.int4_kv_attention.default, (torch.randn(2, 3, 4, 64), kc, ks, kz, vc, vs, vz,
                                          lens, 0.125, True)),
    ]


@pytest.mark.parametrize("case", range(12))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- bad input

def _bad_cases():
    x = torch.randn(4, 64)
    q, s, z = O.quantize_per_token(x, 4, False)
    p = O.pack_int4(q)
    qw, sw, _ = O.quantize_per_channel(torch.randn(8, 64), 4, True)
    pw = O.pack_int4(qw)
    kc, ks, kz = _cache(1, 4, 2, 64)
    k = torch.randn(1, 1, 2, 64)
    return [
        ("pack_int4 float", lambda: O.pack_int4(torch.ones(4)), "dtype"),
        ("pack_int4 odd", lambda: O.pack_int4(torch.ones(3, dtype=torch.int8)), "even"),
        ("unpack wrong dtype", lambda: O.unpack_int4(torch.ones(4, dtype=torch.int8)), "dtype"),
        ("quant int input", lambda: O.quantize_per_token(torch.ones(2, 4, dtype=torch.int32)), "dtype"),
        ("quant empty", lambda: O.quantize_per_token(torch.randn(0, 64)), "empty"),
        ("quant bits", lambda: O.quantize_per_token(x, 5), "bits"),
        ("quant nan", lambda: O.quantize_per_token(torch.tensor([[1.0, float("nan")]])), "non-finite"),
        ("quant clip", lambda: O.quantize_per_token(x, 4, False, 1.5), "clip_ratio"),
        ("wquant nan", lambda: O.quantize_per_channel(torch.full((2, 64), float("nan"))), "NaN"),
        ("wquant 3d", lambda: O.quantize_per_channel(torch.randn(2, 2, 64)), "2-D"),
        ("gemm K align", lambda: O.int4_gemm(p[:, :12], s, z, pw[:, :12], sw), "multiple of 32"),
        ("gemm K mismatch", lambda: O.int4_gemm(p, s, z, pw[:, :16], sw), "K mismatch"),
        ("gemm M=0", lambda: O.int4_gemm(p[:0], s[:0], z[:0], pw, sw), "M = 0"),
        ("gemm scale dtype", lambda: O.int4_gemm(p, s.half(), z, pw, sw), "x_scale"),
        ("gemm scale shape", lambda: O.int4_gemm(p, s, z, pw, sw[:3]), "w_scale"),
        ("gemm out dtype", lambda: O.int4_gemm(p, s, z, pw, sw, out_dtype=torch.int32), "out_dtype"),
        ("w4a16 K", lambda: O.w4a16_gemm(torch.randn(2, 48), pw, sw), "K mismatch"),
        ("w4a16 M=0", lambda: O.w4a16_gemm(torch.randn(0, 64), pw, sw), "M = 0"),
        ("hadamard size", lambda: O.hadamard_transform(torch.randn(2, 44)), "unsupported"),
        ("hadamard int", lambda: O.hadamard_transform(torch.ones(2, 8, dtype=torch.int32)), "dtype"),
        ("kv head_dim", lambda: O.kv_cache_append(torch.randn(1, 1, 2, 32), torch.randn(1, 1, 2, 32),
                                                  *_cache(1, 4, 2, 32), *_cache(1, 4, 2, 32),
                                                  torch.zeros(1, dtype=torch.int32)), "head_dim"),
        ("kv dtype mismatch", lambda: O.kv_cache_append(k, k.half(), kc, ks, kz, kc, ks, kz,
                                                        torch.zeros(1, dtype=torch.int32)), "dtype"),
        ("attn gqa", lambda: O.int4_kv_attention(torch.randn(1, 1, 3, 64), kc, ks, kz, kc, ks, kz,
                                                 torch.ones(1, dtype=torch.int32)), "multiple"),
        ("attn seqlens", lambda: O.int4_kv_attention(torch.randn(1, 1, 2, 64), kc, ks, kz, kc, ks, kz,
                                                     torch.tensor([9], dtype=torch.int32)), "seqlens"),
    ]


@pytest.mark.parametrize("case", range(24))
def test_bad_input_raises_clear_error(case):
    name, fn, msg = _bad_cases()[case]
    with pytest.raises(O.OpInputError, match=msg):
        fn()


def test_bad_case_count_matches():
    assert len(_bad_cases()) == 24 and len(_opcheck_cases()) == 12


def test_reference_exact_int_accumulation_large_k():
    # K large enough that naive fp16 accumulation would be inexact; the reference must be exact.
    k = 4096
    qx = torch.full((1, k), 7, dtype=torch.int8)
    qw = torch.full((1, k), -8, dtype=torch.int8)
    y = O.int4_gemm(O.pack_int4(qx), torch.ones(1), None, O.pack_int4(qw), torch.ones(1),
                    out_dtype=torch.float32)
    assert float(y) == -56.0 * k
    assert math.isfinite(float(y))
