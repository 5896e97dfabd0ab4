"""Per-token quantization ops with packed codes on CPU: quantize_per_token_packed,
hadamard_quantize_per_token and rmsnorm_quantize_per_token (reference kernels, the
specification).

* the fused references are exactly the unfused op sequences they replace
  (``hadamard_transform`` / RMSNorm → ``quantize_per_token`` → ``pack_int4``);
* ``hadamard_transform_ordered`` and ``rms_norm`` against float64 math and against the
  formulas they pin down (``hadamard_transform``'s matmul, transformers' ``LlamaRMSNorm``);
* schema / fake kernels (``opcheck``), Python wrappers, and every bad-input path.
"""
from __future__ import annotations

import math

import pytest
import torch

import ostquant.ops as O
from ostquant.ops import reference as ref
from ostquant.transforms.hadamard_matrices import hadamard_factor, hadamard_matrix

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DT_IDS = ["bf16", "fp16", "fp32"]
# n = K·2^k: powers of two, the base orders with small and large m, LLaMA sizes
# (576 = 36·16, 11008 = 172·64, 14336 = 28·512), tiny rows (m = 1, 2).
HAD_SIZES = [2, 64, 1024, 4096, 12, 24, 40 * 8, 576, 108 * 4, 11008, 14336]
RMS_SIZES = [2, 6, 64, 576, 4096, 11008]


def _data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    rows = x.view(-1, shape[-1])
    rows *= torch.exp(1.5 * torch.randn(rows.shape[0], 1, generator=g))
    if shape[-1] > 8:
        rows[:, :: max(1, shape[-1] // 5)] *= 20.0  # outlier channels
    if rows.shape[0] > 2:
        rows[1] = 0.0  # zero row: scale 1
        rows[2] = 0.25  # constant row
    return x.to(dtype)


def _unfused_hadamard(x, scale, bits, sym, clip, transform=ref.hadamard_transform_ordered):
    q, s, z = ref.quantize_per_token(transform(x, scale), bits, sym, clip)
    return ref.pack_int4(q), s, z


def _assert_triplet_equal(got, want, what):
    for name, g, w in zip(("packed", "scale", "zero"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what} {name}: {g.dtype}{tuple(g.shape)}"
        assert torch.equal(g, w), f"{what} {name}: {int((g != w).sum())} elements differ"


# --------------------------------------------------------------------------- Hadamard + quant

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n", HAD_SIZES)
def test_hadamard_quant_is_the_unfused_sequence(n, dtype):
    """The fused op == hadamard_transform → quantize_per_token → pack_int4, through the
    registered ops (the path QuantLinear takes today), bit for bit."""
    x = _data((7, n), dtype, seed=n)
    scale = n ** -0.5
    for bits, sym, clip in ((4, False, 1.0), (4, True, 0.9), (3, False, 0.95), (2, True, 1.0)):
        got = O.hadamard_quantize_per_token(x, scale, bits, sym, clip)
        q, s, z = O.quantize_per_token(O.hadamard_transform(x, scale), bits, sym, clip)
        _assert_triplet_equal(got, (O.pack_int4(q), s, z), f"n={n} {dtype} bits={bits} sym={sym}")
        _assert_triplet_equal(got, _unfused_hadamard(x, scale, bits, sym, clip),
                              f"n={n} {dtype} (ordered)")


def test_hadamard_ordered_equals_hadamard_transform_for_powers_of_two():
    for n in (2, 8, 256, 4096):
        x = _data((5, n), torch.float32, seed=n)
        assert torch.equal(ref.hadamard_transform_ordered(x, 0.3),
                           ref.hadamard_transform(x, 0.3))


@pytest.mark.parametrize("n", [12, 20 * 4, 576, 11008, 14336, 172])
def test_hadamard_ordered_matches_float64(n):
    """The ordered K×K stage is the same transform: float32 accuracy against float64."""
    x = _data((4, n), torch.float32, seed=1)
    got = ref.hadamard_transform_ordered(x, n ** -0.5).double()
    h = hadamard_matrix(n) if n <= 4096 else None
    if h is not None:
        want = (x.double() @ h.T) * n ** -0.5
    else:
        K, m = hadamard_factor(n)
        y = ref.fwht_pow2(x.double().reshape(4, K, m))
        want = (hadamard_matrix(K) @ y).reshape(4, n) * n ** -0.5
    rms = want.pow(2).mean(-1, keepdim=True).sqrt()
    K, _ = hadamard_factor(n)
    tol = 2.0 ** -23 * want.abs() + 8 * 2.0 ** -24 * (math.log2(2 * n) + K) * rms
    assert ((got - want).abs() <= tol).all()


def test_hadamard_quant_roundtrip_error_is_quantization_error():
    """Dequantize and undo the (orthonormal) transform: back to x within int4 error."""
    n = 1024
    x = _data((16, n), torch.float32, seed=3)
    packed, s, z = O.hadamard_quantize_per_token(x)  # default scale n^-1/2
    y = ref.dequantize(ref.unpack_int4(packed), s[:, None], z[:, None])
    back = ref.hadamard_transform(y, n ** -0.5)  # H/sqrt(n) is symmetric and orthogonal
    err = (back - x).pow(2).mean(-1).sqrt()
    step = s  # one quantization step per row; the rounding error's RMS is step/sqrt(12)
    assert (err <= 0.35 * step + 1e-6).all()


def test_hadamard_quant_default_scale_is_orthonormal():
    x = _data((3, 576), torch.bfloat16)
    _assert_triplet_equal(O.hadamard_quantize_per_token(x),
                          O.hadamard_quantize_per_token(x, 576 ** -0.5), "default scale")


def test_hadamard_quant_leading_dims_and_1d():
    x = _data((2, 3, 5, 64), torch.float16)
    p, s, z = O.hadamard_quantize_per_token(x, 0.125)
    assert p.shape == (2, 3, 5, 32) and p.dtype == torch.uint8
    assert s.shape == z.shape == (2, 3, 5) and s.dtype == z.dtype == torch.float32
    p2, s2, z2 = O.hadamard_quantize_per_token(x.reshape(-1, 64), 0.125)
    assert torch.equal(p.reshape(-1, 32), p2) and torch.equal(s.reshape(-1), s2)
    p1, s1, z1 = O.hadamard_quantize_per_token(x[0, 0, 0], 0.125)
    assert p1.shape == (32,) and s1.shape == () and torch.equal(p1, p2[0])


def test_hadamard_quant_noncontiguous_input():
    x = _data((64, 24), torch.bfloat16).t()  # [24, 64], not contiguous
    _assert_triplet_equal(O.hadamard_quantize_per_token(x, 0.1),
                          O.hadamard_quantize_per_token(x.contiguous(), 0.1), "strided")


# --------------------------------------------------------------------------- RMSNorm + quant

def _llama_rmsnorm(x, weight, eps):
    """transformers' LlamaRMSNorm.forward (float32 mean, torch.rsqrt)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(x.dtype)
    return h if weight is None else weight * h


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("K", RMS_SIZES)
@pytest.mark.parametrize("with_weight", [True, False], ids=["w", "now"])
def test_rmsnorm_quant_is_the_unfused_sequence(K, dtype, with_weight):
    x = _data((9, K), dtype, seed=K)
    w = (torch.rand(K) + 0.5).to(dtype) if with_weight else None
    for bits, sym, clip in ((4, False, 1.0), (4, True, 0.9), (2, False, 1.0)):
        got = O.rmsnorm_quantize_per_token(x, w, 1e-5, bits, sym, clip)
        q, s, z = O.quantize_per_token(ref.rms_norm(x, w, 1e-5), bits, sym, clip)
        _assert_triplet_equal(got, (O.pack_int4(q), s, z), f"K={K} {dtype} bits={bits}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_rms_norm_matches_llama_rmsnorm_to_one_unit(dtype):
    """rms_norm pins the rounding of transformers' formula: the two differ only through the
    last bits of the float32 mean square (float64 vs float32 accumulation), which moves a
    bf16/fp16 output by at most one unit in the last place, rarely; float32 outputs carry
    that error directly (a few ulps)."""
    K = 4096
    x = _data((128, K), dtype, seed=5)
    w = (torch.rand(K) + 0.5).to(dtype)
    got, want = ref.rms_norm(x, w, 1e-6).float(), _llama_rmsnorm(x, w, 1e-6).float()
    units = 2 if dtype != torch.float32 else 16
    ulp = torch.finfo(dtype).eps * want.abs().clamp(min=torch.finfo(dtype).tiny)
    assert ((got - want).abs() <= units * ulp).all()
    if dtype != torch.float32:
        assert (got != want).float().mean() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_rms_norm_matches_float64(dtype):
    x = _data((32, 576), dtype, seed=6)
    x64 = x.double()
    want = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    got = ref.rms_norm(x, None, 1e-6).double()
    # float32 normalisation, then one rounding to dtype
    fi = torch.finfo(dtype)
    tol = (fi.eps + 4 * 2.0 ** -24) * want.abs() + fi.tiny * fi.eps  # + subnormal spacing
    assert ((got - want).abs() <= tol).all()
    assert torch.equal(ref.rms_norm(x, None, 1e-6)[1], torch.zeros(576, dtype=dtype))  # zero row


def test_sqrt_rn_is_correctly_rounded():
    """ref.sqrt_rn = IEEE float32 sqrt (the kernel's __fsqrt_rn): checked against the exact
    criterion (the true root is nearer to the result than to either neighbour, decided in
    rationals) on random values over many binades, squares and their neighbours, and specials.
    (torch.sqrt on float32 CPU tensors misses this on some builds, which is why it exists.)"""
    from fractions import Fraction
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(4000, generator=g) * 10.0 ** torch.randint(-30, 30, (4000,), generator=g),
                   torch.arange(1, 2000, dtype=torch.float32) ** 2,
                   torch.nextafter(torch.arange(1, 2000, dtype=torch.float32) ** 2, torch.tensor(0.0)),
                   torch.tensor([0.0, 1e-45, 1.17e-38, 3.4e38, 0.13691])])
    s = ref.sqrt_rn(x)
    assert s.dtype == torch.float32
    for xi, si in zip(x.tolist(), s.tolist()):
        a = Fraction(xi)
        up = torch.nextafter(torch.tensor(si), torch.tensor(float("inf"))).item()
        dn = torch.nextafter(torch.tensor(si), torch.tensor(0.0)).item()
        hi, lo = (Fraction(si) + Fraction(up)) / 2, (Fraction(si) + Fraction(dn)) / 2
        assert lo * lo <= a <= hi * hi or (si == 0.0 and xi == 0.0), (xi, si)
    special = ref.sqrt_rn(torch.tensor([float("inf"), float("nan"), -1.0]))
    assert special[0] == float("inf") and torch.isnan(special[1:]).all()


def test_rmsnorm_quant_eps_zero_and_scale_invariance():
    x = _data((4, 64), torch.float32, seed=2)
    x[1] = torch.randn(64)  # no zero row: eps = 0 is fine
    p, s, z = O.rmsnorm_quantize_per_token(x[[0, 3]], None, 0.0)
    # RMSNorm without eps is invariant to a power-of-two scaling of the row
    p2, s2, z2 = O.rmsnorm_quantize_per_token(x[[0, 3]] * 8, None, 0.0)
    assert torch.equal(p, p2) and torch.equal(s, s2) and torch.equal(z, z2)


def test_rmsnorm_quant_leading_dims():
    x = _data((2, 5, 128), torch.bfloat16)
    w = torch.rand(128).to(torch.bfloat16)
    p, s, z = O.rmsnorm_quantize_per_token(x, w, 1e-6)
    assert p.shape == (2, 5, 64) and s.shape == z.shape == (2, 5)
    p2, s2, _ = O.rmsnorm_quantize_per_token(x.reshape(10, 128), w, 1e-6)
    assert torch.equal(p.reshape(10, 64), p2) and torch.equal(s.reshape(10), s2)


def test_sym_zero_is_zero_and_codes_in_range():
    x = _data((6, 256), torch.bfloat16)
    for bits in (2, 3, 4):
        for fn in (lambda a: O.hadamard_quantize_per_token(a, 1 / 16, bits, True),
                   lambda a: O.rmsnorm_quantize_per_token(a, None, 1e-6, bits, True)):
            p, s, z = fn(x)
            assert torch.equal(z, torch.zeros_like(z))
            q = ref.unpack_int4(p)
            assert int(q.min()) >= -(1 << (bits - 1)) and int(q.max()) <= (1 << (bits - 1)) - 1


# --------------------------------------------------------------------------- plain, packed

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("K", [2, 64, 576, 11008])
def test_quantize_per_token_packed_is_quantize_then_pack(K, dtype):
    """quantize_per_token_packed == pack_int4(quantize_per_token codes), same scale/zero, for
    every bits / sym / clip (rows: outliers, a zero row, a constant row)."""
    x = _data((2, 3, K), dtype, seed=K)
    for bits, sym, clip in ((4, False, 1.0), (4, True, 0.9), (3, False, 0.8), (2, True, 1.0)):
        q, s, z = O.quantize_per_token(x, bits, sym, clip)
        got = O.quantize_per_token_packed(x, bits, sym, clip)
        _assert_triplet_equal(got, (O.pack_int4(q), s, z), f"K={K} {dtype} {bits} {sym} {clip}")
        assert got[0].shape == (2, 3, K // 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_fused_quantizers_int8_codes_are_the_unpacked_codes(dtype):
    """packed=False returns quantize_per_token's int8 codes (what the Hopper GEMM reads): the
    unpacked codes of packed=True, same scale/zero, for both fused ops and every setting."""
    for n in (64, 576, 40):
        x = _data((2, 3, n), dtype, seed=n)
        w = torch.rand(n).to(dtype)
        for bits, sym, clip in ((4, False, 1.0), (4, True, 0.9), (3, False, 0.8), (2, True, 1.0)):
            what = f"n={n} {dtype} {bits} {sym} {clip}"
            p, s, z = O.hadamard_quantize_per_token(x, 0.3, bits, sym, clip)
            got = O.hadamard_quantize_per_token(x, 0.3, bits, sym, clip, packed=False)
            _assert_triplet_equal(got, (O.unpack_int4(p), s, z), "hadamard " + what)
            _assert_triplet_equal(got, O.quantize_per_token(
                ref.hadamard_transform_ordered(x, 0.3), bits, sym, clip), "hadamard " + what)
            assert got[0].dtype == torch.int8 and got[0].shape == x.shape
            p, s, z = O.rmsnorm_quantize_per_token(x, w, 1e-6, bits, sym, clip)
            got = O.rmsnorm_quantize_per_token(x, w, 1e-6, bits, sym, clip, packed=False)
            _assert_triplet_equal(got, (O.unpack_int4(p), s, z), "rmsnorm " + what)
            assert got[0].dtype == torch.int8 and got[0].shape == x.shape


# --------------------------------------------------------------------------- schema / fake

OPCHECK_CASES = [
    ("quantize_per_token_packed", lambda: (_data((4, 5, 576), torch.bfloat16),)),
    ("quantize_per_token_packed", lambda: (_data((3, 64), torch.float32), 3, True, 0.9)),
    ("hadamard_quantize_per_token", lambda: (_data((4, 5, 576), torch.bfloat16), 576 ** -0.5)),
    ("hadamard_quantize_per_token", lambda: (_data((3, 64), torch.float32), 0.125, 3, True, 0.9)),
    ("rmsnorm_quantize_per_token",
     lambda: (_data((4, 5, 576), torch.bfloat16), torch.rand(576).to(torch.bfloat16), 1e-6)),
    ("rmsnorm_quantize_per_token", lambda: (_data((3, 64), torch.float16), None, 1e-5, 4, True)),
    ("hadamard_quantize_per_token",
     lambda: (_data((4, 5, 576), torch.bfloat16), 576 ** -0.5, 4, False, 1.0, False)),
    ("rmsnorm_quantize_per_token",
     lambda: (_data((3, 64), torch.float16), None, 1e-5, 3, True, 0.9, False)),
]


@pytest.mark.parametrize("case", range(len(OPCHECK_CASES)))
def test_opcheck_cpu(case):
    name, make = OPCHECK_CASES[case]
    torch.library.opcheck(getattr(torch.ops.ostquant, name).default, make())


def test_fake_shapes_under_torch_compile_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 7, 11008, dtype=torch.bfloat16)
        p, s, z = torch.ops.ostquant.hadamard_quantize_per_token(x, 0.01)
        assert p.shape == (3, 7, 5504) and p.dtype == torch.uint8 and s.shape == (3, 7)
        p, s, z = torch.ops.ostquant.rmsnorm_quantize_per_token(x, None, 1e-6)
        assert p.shape == (3, 7, 5504) and z.dtype == torch.float32
        p, s, z = torch.ops.ostquant.quantize_per_token_packed(x)
        assert p.shape == (3, 7, 5504) and p.dtype == torch.uint8 and s.shape == (3, 7)
        q, s, z = torch.ops.ostquant.hadamard_quantize_per_token(x, 0.01, packed=False)
        assert q.shape == (3, 7, 11008) and q.dtype == torch.int8 and s.shape == (3, 7)
        q, s, z = torch.ops.ostquant.rmsnorm_quantize_per_token(x, None, 1e-6, packed=False)
        assert q.shape == (3, 7, 11008) and q.dtype == torch.int8 and z.dtype == torch.float32


# --------------------------------------------------------------------------- bad input

_H = "hadamard_quantize_per_token"
_R = "rmsnorm_quantize_per_token"
_P = "quantize_per_token_packed"
BAD_INPUTS = [
    (_P, lambda: (torch.zeros(4, 64, dtype=torch.int8),), "x must have dtype in (float16, bfloat16, float32)"),
    (_P, lambda: (torch.tensor(1.0),), "x must have at least 1 dims"),
    (_P, lambda: (torch.randn(0, 64),), "x is empty (shape (0, 64)); nothing to compute"),
    (_P, lambda: (torch.randn(4, 33),), "last dim of x must be even to pack two int4 codes per byte, got 33"),
    (_P, lambda: (torch.randn(4, 64), 8), "bits must be one of (2, 3, 4), got 8"),
    (_P, lambda: (torch.randn(4, 64), 4, False, 0.0), "clip_ratio must be in (0, 1], got 0.0"),
    (_H, lambda: (torch.zeros(4, 64, dtype=torch.int32), 1.0), "x must have dtype in (float16, bfloat16, float32)"),
    (_H, lambda: (torch.tensor(1.0), 1.0), "x must have at least 1 dims"),
    (_H, lambda: (torch.randn(0, 64), 1.0), "x is empty (shape (0, 64)); nothing to compute"),
    (_H, lambda: (torch.randn(4, 50), 1.0), "unsupported last dim of x: hadamard_factor: no Hadamard matrix construction for n=50"),
    (_H, lambda: (torch.randn(4, 1), 1.0), "last dim of x must be even to pack two int4 codes per byte, got 1"),
    (_H, lambda: (torch.randn(4, 64), 1.0, 8), "bits must be one of (2, 3, 4), got 8"),
    (_H, lambda: (torch.randn(4, 64), 1.0, 4, False, 0.0), "clip_ratio must be in (0, 1], got 0.0"),
    (_H, lambda: (torch.randn(4, 64), 1.0, 4, True, 1.5), "clip_ratio must be in (0, 1], got 1.5"),
    (_R, lambda: (torch.zeros(4, 64, dtype=torch.float64), None, 1e-6), "x must have dtype in"),
    (_R, lambda: (torch.tensor(1.0), None, 1e-6), "x must have at least 1 dims"),
    (_R, lambda: (torch.randn(4, 0), None, 1e-6), "x is empty"),
    (_R, lambda: (torch.randn(4, 7), None, 1e-6), "last dim of x must be even to pack two int4 codes per byte, got 7"),
    (_R, lambda: (torch.randn(4, 64, dtype=torch.bfloat16), torch.ones(64), 1e-6),
     "weight must have dtype in (bfloat16), got float32"),
    (_R, lambda: (torch.randn(4, 64), torch.ones(32), 1e-6), "weight must have shape (64,), got (32,)"),
    (_R, lambda: (torch.randn(4, 64), torch.ones(1, 64), 1e-6), "weight must have shape (64,), got (1, 64)"),
    (_R, lambda: (torch.randn(4, 64), None, -1e-6), "eps must be finite and >= 0, got -1e-06"),
    (_R, lambda: (torch.randn(4, 64), None, float("nan")), "eps must be finite and >= 0, got nan"),
    (_R, lambda: (torch.randn(4, 64), None, 1e-6, 3, False, 2.0), "clip_ratio must be in (0, 1], got 2.0"),
    (_R, lambda: (torch.randn(4, 64), None, 1e-6, 5), "bits must be one of (2, 3, 4), got 5"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: f"{c[0][:7]}-{c[2][:32]}")
def test_bad_input_raises_value_error(case):
    name, make_args, msg = case
    with pytest.raises(O.OpInputError) as e:
        getattr(torch.ops.ostquant, name)(*make_args())
    assert f"ostquant.{name}: " in str(e.value)
    assert msg in str(e.value)


@pytest.mark.parametrize("name", [_H, _R, _P])
def test_nonfinite_input_rejected_on_cpu(name):
    x = torch.randn(4, 64)
    x[2, 5] = float("nan")
    args = {_H: (x, 1.0), _R: (x, None, 1e-6), _P: (x,)}[name]
    with pytest.raises(O.OpInputError, match="non-finite"):
        getattr(torch.ops.ostquant, name)(*args)
