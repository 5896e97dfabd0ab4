"""Reference kernels of the paged int4 KV cache and the fused (RoPE + Hadamard) append (CPU).

The paged ops must agree with the contiguous ones (the specification of the cache contents and
of attention); bad input raises ``OpInputError`` naming the problem.
"""
from __future__ import annotations

import pytest
import torch

import ostquant.ops as O
from ostquant.ops import reference as ref


def _cache(b, smax, hkv, d):
    return (torch.zeros(b, smax, hkv, d // 2, dtype=torch.uint8),
            torch.zeros(b, smax, hkv, dtype=torch.float16),
            torch.zeros(b, smax, hkv, dtype=torch.float16))


def _pool(num_pages, page, hkv, d):
    return _cache(num_pages, page, hkv, d)


def _tables(B, max_pages, num_pages, seed=0):
    """A block table using distinct random pages of the pool (unused entries -1)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=g)[:B * max_pages]
    return perm.view(B, max_pages).to(torch.int32)


def _paged_and_contiguous(B, hkv, d, page, max_pages, chunks, dtype=torch.float32, seed=0,
                          fused=None):
    """Fill a paged and a contiguous cache with the same appends; returns both + lengths."""
    g = torch.Generator().manual_seed(seed)
    num_pages = B * max_pages + 3
    kp, vp = _pool(num_pages, page, hkv, d), _pool(num_pages, page, hkv, d)
    smax = max_pages * page
    kc, vc = _cache(B, smax, hkv, d), _cache(B, smax, hkv, d)
    table = _tables(B, max_pages, num_pages, seed)
    lens = torch.zeros(B, dtype=torch.int32)
    for S, rewind in chunks:
        k = torch.randn(B, S, hkv, d, generator=g).to(dtype)
        v = torch.randn(B, S, hkv, d, generator=g).to(dtype)
        extra = {}
        if fused is not None:
            cos, sin = _cos_sin(B, S, d, dtype, g)
            extra = dict(cos=cos, sin=sin, k_hadamard=fused)
        # every sequence gets S tokens; `rewind` then drops some again (they are overwritten
        # by the next append), so the lengths end up different
        O.paged_kv_cache_append(k, v, *kp, *vp, table, lens, **extra)
        if fused is None:
            O.kv_cache_append(k, v, *kc, *vc, lens)
        else:
            O.kv_cache_append_fused(k, v, *kc, *vc, lens, **extra)
        lens = lens + S
        lens = lens - torch.as_tensor(rewind, dtype=torch.int32)
    return kp, vp, kc, vc, table, lens


def _cos_sin(B, S, d, dtype, g):
    pos = torch.randint(0, 4096, (B, S), generator=g).double()
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[..., None] * inv
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# --------------------------------------------------------------------------- paged == contiguous

@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("page", [16, 32])
def test_paged_append_matches_contiguous(d, page):
    B, hkv, max_pages = 3, 2, 4
    chunks = [(7, [0, 3, 7]), (1, [0, 0, 0]), (20, [0, 0, 5]), (1, [0, 0, 0])]
    kp, vp, kc, vc, table, lens = _paged_and_contiguous(B, hkv, d, page, max_pages, chunks)
    n = max_pages * page
    for pool, cont in ((kp, kc), (vp, vc)):
        got = ref.paged_kv_gather(*pool, table, n)
        for b in range(B):
            L = int(lens[b])
            for g_, c_ in zip(got, cont):
                assert torch.equal(g_[b, :L], c_[b, :L])


@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (32, 8)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sq,causal", [(1, True), (5, True), (3, False)])
def test_paged_attention_matches_contiguous(hq, hkv, d, sq, causal):
    B, page, max_pages = 3, 16, 3
    # lengths 6, 17, 41 after the appends: 1 token, non-multiples of the page size
    chunks = [(30, [0, 0, 0]), (11, [24, 24, 0])]
    kp, vp, kc, vc, table, lens = _paged_and_contiguous(B, hkv, d, page, max_pages, chunks,
                                                        seed=1)
    lens = torch.tensor([max(sq, 1), 17, 41], dtype=torch.int32)
    q = torch.randn(B, sq, hq, d)
    want = O.int4_kv_attention(q, *kc, *vc, lens, causal=causal)
    got = O.paged_int4_kv_attention(q, *kp, *vp, table, lens, causal=causal, max_seqlen=41)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_paged_attention_length_one_and_bf16():
    B, hkv, hq, d, page = 2, 1, 3, 64, 16
    kp, vp, kc, vc, table, _ = _paged_and_contiguous(B, hkv, d, page, 2, [(20, [0, 0])],
                                                     dtype=torch.bfloat16)
    lens = torch.tensor([1, 20], dtype=torch.int64)
    q = torch.randn(B, 1, hq, d).to(torch.bfloat16)
    got = O.paged_int4_kv_attention(q, *kp, *vp, table, lens)
    want = O.int4_kv_attention(q, *kc, *vc, lens)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)
    # a single cached token: the output is exactly its dequantized V (softmax weight 1)
    v0 = ref.dequantize_kv(vc[0][0, 0], vc[1][0, 0], vc[2][0, 0])  # [hkv=1, d]
    assert torch.equal(got[0, 0], v0.expand(hq, d).to(torch.bfloat16))


# --------------------------------------------------------------------------- fused RoPE + Hadamard

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_rope_hadamard_k_vs_float64(dtype, d):
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 5, 3, d, generator=g).to(dtype)
    cos, sin = _cos_sin(2, 5, d, dtype, g)
    got = ref.rope_hadamard_k(k, cos, sin, True).double()
    kd, c, s = k.double(), cos.double()[:, :, None], sin.double()[:, :, None]
    rot = torch.cat((-kd[..., d // 2:], kd[..., :d // 2]), -1)
    r = kd * c + rot * s
    from ostquant.transforms.hadamard_matrices import hadamard_matrix
    h = hadamard_matrix(d).double() / d ** 0.5
    want = r @ h.T
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # no RoPE, no Hadamard: identity
    assert torch.equal(ref.rope_hadamard_k(k, None, None, False), k)


def test_fused_append_is_append_of_transformed_k():
    B, S, hkv, d = 2, 3, 2, 128
    g = torch.Generator().manual_seed(4)
    k = torch.randn(B, S, hkv, d, generator=g).to(torch.bfloat16)
    v = torch.randn(B, S, hkv, d, generator=g).to(torch.bfloat16)
    cos, sin = _cos_sin(B, S, d, torch.bfloat16, g)
    lens = torch.tensor([0, 4], dtype=torch.int32)
    a, av = _cache(B, 8, hkv, d), _cache(B, 8, hkv, d)
    b, bv = _cache(B, 8, hkv, d), _cache(B, 8, hkv, d)
    O.kv_cache_append_fused(k, v, *a, *av, lens, cos, sin, True)
    O.kv_cache_append(ref.rope_hadamard_k(k, cos, sin, True), v, *b, *bv, lens)
    for x, y in zip(a + av, b + bv):
        assert torch.equal(x, y)
    # without RoPE/Hadamard the fused op is the plain append
    c, cv = _cache(B, 8, hkv, d), _cache(B, 8, hkv, d)
    O.kv_cache_append_fused(k, v, *c, *cv, lens)
    e, ev = _cache(B, 8, hkv, d), _cache(B, 8, hkv, d)
    O.kv_cache_append(k, v, *e, *ev, lens)
    for x, y in zip(c + cv, e + ev):
        assert torch.equal(x, y)


def test_fused_paged_matches_fused_contiguous():
    kp, vp, kc, vc, table, lens = _paged_and_contiguous(2, 2, 64, 16, 3, [(9, [0, 2]), (5, [0, 0])],
                                                        dtype=torch.float16, fused=True)
    for pool, cont in ((kp, kc), (vp, vc)):
        got = ref.paged_kv_gather(*pool, table, 48)
        for b in range(2):
            L = int(lens[b])
            for g_, c_ in zip(got, cont):
                assert torch.equal(g_[b, :L], c_[b, :L])


# --------------------------------------------------------------------------- opcheck

def _opcheck_cases():
    B, hkv, d, page = 2, 2, 64, 16
    kp, vp = _pool(5, page, hkv, d), _pool(5, page, hkv, d)
    table = torch.tensor([[4, 1], [0, 2]], dtype=torch.int32)
    k = torch.randn(B, 3, hkv, d)
    cos, sin = _cos_sin(B, 3, d, torch.float32, torch.Generator().manual_seed(0))
    kc, vc = _cache(B, 8, hkv, d), _cache(B, 8, hkv, d)
    ostq = torch.ops.ostquant
    return [
        (ostq.paged_kv_cache_append.default,
         (k, k + 1, *kp, *vp, table, torch.tensor([0, 20], dtype=torch.int32))),
        (ostq.paged_kv_cache_append.default,
         (k, k + 1, *kp, *vp, table, torch.tensor([13, 2], dtype=torch.int32), cos, sin, True)),
        (ostq.paged_int4_kv_attention.default,
         (torch.randn(B, 2, 4, d), *kp, *vp, table, torch.tensor([2, 29], dtype=torch.int32),
          0.125, True, 29)),
        (ostq.kv_cache_append_fused.default,
         (k, k - 1, *kc, *vc, torch.tensor([0, 5], dtype=torch.int32), cos, sin, True)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- bad input

def _bad_cases():
    B, hkv, d, page = 1, 2, 64, 16
    kp, vp = _pool(3, page, hkv, d), _pool(3, page, hkv, d)
    table = torch.tensor([[2, -1]], dtype=torch.int32)
    k = torch.randn(B, 1, hkv, d)
    z32 = torch.zeros(B, dtype=torch.int32)
    kc = _cache(B, 4, hkv, d)
    cos, sin = torch.ones(B, 1, d), torch.zeros(B, 1, d)
    app = O.paged_kv_cache_append
    att = O.paged_int4_kv_attention
    return [
        ("head_dim", lambda: app(torch.randn(B, 1, hkv, 32), torch.randn(B, 1, hkv, 32),
                                 *_pool(3, page, hkv, 32), *_pool(3, page, hkv, 32), table, z32),
         "head_dim = 32 is not supported"),
        ("attn head_dim", lambda: att(torch.randn(B, 1, 2, 96), *_pool(3, page, hkv, 96),
                                      *_pool(3, page, hkv, 96), table, z32 + 1),
         "head_dim = 96"),
        ("pool full", lambda: app(torch.randn(B, 20, hkv, d), torch.randn(B, 20, hkv, d), *kp, *vp,
                                  table, z32 + 13), "cache full"),
        ("page not allocated", lambda: app(k, k, *kp, *vp, table, z32 + 16), "page not allocated"),
        ("dtype mismatch", lambda: app(k, k.half(), *kp, *vp, table, z32), "v must have dtype"),
        ("cos dtype", lambda: app(k, k, *kp, *vp, table, z32, cos.half(), sin.half()),
         "cos must have dtype"),
        ("cos alone", lambda: app(k, k, *kp, *vp, table, z32, cos, None), "together"),
        ("cos shape", lambda: app(k, k, *kp, *vp, table, z32, cos[:, :, :32], sin[:, :, :32]),
         "cos must have shape"),
        ("page size", lambda: app(k, k, *_pool(3, 24, hkv, d), *_pool(3, 24, hkv, d), table, z32),
         "power of two"),
        ("small page", lambda: app(k, k, *_pool(3, 8, hkv, d), *_pool(3, 8, hkv, d), table, z32),
         "power of two"),
        ("table dtype", lambda: app(k, k, *kp, *vp, table.long(), z32), "block_table must have dtype"),
        ("table shape", lambda: app(k, k, *kp, *vp, table[:, :0], z32), "block_table must have shape"),
        ("scale dtype", lambda: app(k, k, kp[0], kp[1].float(), kp[2], *vp, table, z32), "k_scale"),
        ("v pool shape", lambda: app(k, k, *kp, *_pool(4, page, hkv, d), table, z32), "v_pool"),
        ("attn gqa", lambda: att(torch.randn(B, 1, 3, d), *kp, *vp, table, z32 + 1), "multiple"),
        ("attn seqlens", lambda: att(torch.randn(B, 1, 2, d), *kp, *vp, table, z32 + 40),
         "seqlens must lie"),
        ("attn seqlens < Sq", lambda: att(torch.randn(B, 3, 2, d), *kp, *vp, table, z32 + 2),
         "seqlens must lie"),
        ("attn page", lambda: att(torch.randn(B, 1, 2, d), *kp, *vp, table, z32 + 17),
         "page not allocated"),
        ("attn q dtype", lambda: att(torch.randn(B, 1, 2, d).to(torch.int32), *kp, *vp, table,
                                     z32 + 1), "q must have dtype"),
        ("fused contiguous cos", lambda: O.kv_cache_append_fused(k, k, *kc, *kc, z32, cos.double(),
                                                                 sin.double()), "cos must have dtype"),
        ("fused contiguous full", lambda: O.kv_cache_append_fused(k, k, *kc, *kc, z32 + 4, cos, sin),
         "cache full"),
    ]


@pytest.mark.parametrize("case", range(21))
def test_bad_input_raises_clear_error(case):
    name, fn, msg = _bad_cases()[case]
    with pytest.raises(O.OpInputError, match=msg):
        fn()


def test_bad_case_count():
    assert len(_bad_cases()) == 21 and len(_opcheck_cases()) == 4


def test_public_names():
    for name in ("paged_kv_cache_append", "paged_int4_kv_attention", "kv_cache_append_fused",
                 "kv_check_errors"):
        assert name in O.__all__ and callable(getattr(O, name))
    O.kv_check_errors()  # no pending device error (no-op without the extension)
