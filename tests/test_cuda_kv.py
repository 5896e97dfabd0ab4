"""CUDA kernels of the int4 KV cache against the reference (the specification).

* append (contiguous, paged, fused RoPE + Hadamard): the whole cache — codes, scales, zero
  points, and the slots that must stay untouched — is bit-identical to the reference op run on a
  CPU copy;
* attention (decode and prefill, MHA and GQA, head_dim 64/128, mixed lengths, paged and
  contiguous): close to SDPA in float32 over the dequantized cache;
* bad lengths are caught on the device and raised at the next call; opcheck on CUDA.

Outputs are poisoned (a big NaN allocation freed before each call), so a kernel that leaves part
of its output unwritten fails. Tests marked ``cuda`` skip cleanly without a GPU or without the
compiled extension.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ostquant.ops as O
from ostquant.ops import reference as ref

pytestmark = pytest.mark.cuda

KV_CUDA_OPS = {"kv_cache_append", "kv_cache_append_fused", "paged_kv_cache_append",
               "int4_kv_attention", "paged_int4_kv_attention"}
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3, torch.float32: 1e-4}


# --------------------------------------------------------------------------- helpers

def _poison():
    """Fill the caching allocator's free blocks with NaN, so unwritten outputs show up."""
    big = torch.full((1 << 26,), float("nan"), dtype=torch.float32, device="cuda")
    small = [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(16)]
    torch.cuda.synchronize()
    del big, small


def _head_major(t):
    """The same values as ``t`` [n, slots, Hkv], stored head-major (ops.int4_kv_tensors)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _junk_cache(n, p, hkv, d, g, head_major=False):
    """Cache tensors filled with random bytes (codes) and random finite fp16 (scale/zero);
    scale/zero token-major (contiguous) or head-major (the runtime's layout)."""
    codes = torch.randint(0, 256, (n, p, hkv, d // 2), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, p, hkv, generator=g).half()
    zero = torch.randint(-8, 8, (n, p, hkv), generator=g).half()
    if head_major:
        scale, zero = _head_major(scale), _head_major(zero)
    return [codes, scale, zero]


def _relayout(cache, head_major):
    """A copy of one cache side (codes, scale, zero) with scale/zero in the given layout."""
    codes, scale, zero = cache
    lay = _head_major if head_major else (lambda t: t.contiguous())
    return [codes.clone(), lay(scale.clone()), lay(zero.clone())]


def _cuda(ts):
    return [t.cuda() for t in ts]


def _assert_equal(got, want, what):
    got = got.cpu()
    if not torch.equal(got, want):
        diff = (got != want).nonzero()
        first = tuple(diff[0].tolist())
        raise AssertionError(f"{what}: {diff.shape[0]} of {got.numel()} differ, first at {first}: "
                             f"got {got[first].item()!r}, want {want[first].item()!r}")


def _kv_data(B, S, hkv, d, dtype, g, outliers=True):
    x = torch.randn(B, S, hkv, d, generator=g)
    if outliers:
        x = x * torch.exp(torch.randn(B, S, hkv, 1, generator=g))
        x[..., :: 13] *= 8.0
    return x.to(dtype)


def _cos_sin(B, S, d, dtype, g):
    pos = torch.randint(0, 32768, (B, S), generator=g).double()
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    emb = torch.cat((pos[..., None] * inv, pos[..., None] * inv), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _sdpa_reference(q, kc, ks, kz, vc, vs, vz, lens, causal, scale):
    """Float32 SDPA over the dequantized contiguous cache, one sequence at a time."""
    k = ref.dequantize_kv(kc, ks, kz)
    v = ref.dequantize_kv(vc, vs, vz)
    B, Sq, Hq, D = q.shape
    group = Hq // k.shape[2]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for b in range(B):
        L = int(lens[b])
        kb = k[b, :L].transpose(0, 1).repeat_interleave(group, 0)  # [Hq, L, D]
        vb = v[b, :L].transpose(0, 1).repeat_interleave(group, 0)
        qb = q[b].float().transpose(0, 1)  # [Hq, Sq, D]
        mask = None
        if causal:
            qpos = L - Sq + torch.arange(Sq, device=q.device)
            mask = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]
        with sdpa_kernel(SDPBackend.MATH):
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        out[b] = ob.transpose(0, 1)
    return out


def _check_attention(got, want, dtype, what):
    assert got.dtype == dtype and got.shape == want.shape, what
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite output"
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * max(1.0, float(want.abs().max())),
                               msg=lambda m: f"{what}: {m}")


def _block_table(B, max_pages, num_pages, g):
    perm = torch.randperm(num_pages, generator=g)[:B * max_pages]
    return perm.view(B, max_pages).to(torch.int32)


# --------------------------------------------------------------------------- registration

def test_kv_cuda_ops_registered():
    assert set(O.cuda_ops()) >= KV_CUDA_OPS


# --------------------------------------------------------------------------- append: bit-exact

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hkv", [1, 3, 8])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("head_major", [True, False], ids=["head-major", "token-major"])
def test_append_bit_exact(dtype, d, hkv, paged, head_major):
    g = torch.Generator().manual_seed(hkv * 1000 + d)
    B, page, max_pages = 3, 16, 6
    cap = page * max_pages
    if paged:
        n = B * max_pages + 2
        table = _block_table(B, max_pages, n, g)
        kcache, vcache = _junk_cache(n, page, hkv, d, g), _junk_cache(n, page, hkv, d, g)
    else:
        table = None
        kcache, vcache = _junk_cache(B, cap, hkv, d, g), _junk_cache(B, cap, hkv, d, g)
    kg, vg = _cuda(_relayout(kcache, head_major)), _cuda(_relayout(vcache, head_major))
    lens = torch.tensor([0, 5, 30], dtype=torch.int32)
    for S in (17, 1, 1, 33):  # prefill chunks, decode steps; crosses page boundaries
        k, v = _kv_data(B, S, hkv, d, dtype, g), _kv_data(B, S, hkv, d, dtype, g)
        _poison()
        if paged:
            O.paged_kv_cache_append(k, v, *kcache, *vcache, table, lens)
            O.paged_kv_cache_append(k.cuda(), v.cuda(), *kg, *vg, table.cuda(), lens.cuda())
        else:
            O.kv_cache_append(k, v, *kcache, *vcache, lens)
            O.kv_cache_append(k.cuda(), v.cuda(), *kg, *vg, lens.cuda())
        lens = lens + S
    torch.cuda.synchronize()
    O.kv_check_errors()
    for name, got, want in zip(("k codes", "k scale", "k zero", "v codes", "v scale", "v zero"),
                               kg + vg, kcache + vcache):
        _assert_equal(got, want, f"{name} ({dtype}, d={d}, hkv={hkv}, paged={paged}, "
                                 f"head_major={head_major})")


def test_append_special_rows_bit_exact():
    """Zero, constant, one-sided and tie rows, int64 lengths, non-contiguous k."""
    d, hkv = 128, 2
    rows = [torch.zeros(d), torch.full((d,), 0.37), torch.rand(d) + 0.1, -(torch.rand(d) + 0.1),
            (torch.arange(d) % 17 - 8).float() * 0.5, torch.full((d,), -3.0),
            torch.randn(d) * 1e4, torch.randn(d) * 1e-6]
    k = torch.stack(rows).view(1, 4, hkv, d).to(torch.bfloat16)
    v = k.flip(1)
    kc, vc = _junk_cache(1, 8, hkv, d, torch.Generator().manual_seed(1)), \
        _junk_cache(1, 8, hkv, d, torch.Generator().manual_seed(2))
    kg, vg = _cuda(kc), _cuda(vc)
    lens = torch.tensor([3], dtype=torch.int64)
    O.kv_cache_append(k, v, *kc, *vc, lens)
    kt = k.cuda().transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous view
    O.kv_cache_append(kt, v.cuda(), *kg, *vg, lens.cuda())
    for got, want in zip(kg + vg, kc + vc):
        _assert_equal(got, want, "special rows")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("rope,had", [(True, True), (True, False), (False, True)])
def test_fused_append_bit_exact(dtype, d, rope, had):
    g = torch.Generator().manual_seed(7 + d)
    B, S, hkv, page = 2, 9, 4, 16
    k, v = _kv_data(B, S, hkv, d, dtype, g), _kv_data(B, S, hkv, d, dtype, g)
    cos, sin = _cos_sin(B, S, d, dtype, g) if rope else (None, None)
    lens = torch.tensor([3, 20], dtype=torch.int32)
    # contiguous
    kc, vc = _junk_cache(B, 40, hkv, d, g), _junk_cache(B, 40, hkv, d, g)
    kg, vg = _cuda(kc), _cuda(vc)
    O.kv_cache_append_fused(k, v, *kc, *vc, lens, cos, sin, had)
    cs = (cos.cuda(), sin.cuda()) if rope else (None, None)
    _poison()
    O.kv_cache_append_fused(k.cuda(), v.cuda(), *kg, *vg, lens.cuda(), *cs, had)
    for got, want in zip(kg + vg, kc + vc):
        _assert_equal(got, want, f"fused contiguous ({dtype}, d={d}, rope={rope}, had={had})")
    # paged
    table = _block_table(B, 3, 8, g)
    kp, vp = _junk_cache(8, page, hkv, d, g), _junk_cache(8, page, hkv, d, g)
    kpg, vpg = _cuda(kp), _cuda(vp)
    O.paged_kv_cache_append(k, v, *kp, *vp, table, lens, cos, sin, had)
    O.paged_kv_cache_append(k.cuda(), v.cuda(), *kpg, *vpg, table.cuda(), lens.cuda(), *cs, had)
    for got, want in zip(kpg + vpg, kp + vp):
        _assert_equal(got, want, f"fused paged ({dtype}, d={d}, rope={rope}, had={had})")


# --------------------------------------------------------------------------- attention

def _filled_cache(B, cap, hkv, d, lens, dtype, g, head_major=True):
    """A contiguous CUDA cache holding random K/V for positions [0, lens[b]); scale/zero
    head-major (the runtime's layout) unless asked otherwise."""
    caches = [_cuda(_junk_cache(B, cap, hkv, d, g, head_major)) for _ in range(2)]
    S = int(max(lens))
    k, v = _kv_data(B, S, hkv, d, dtype, g, outliers=False), _kv_data(B, S, hkv, d, dtype, g,
                                                                        outliers=False)
    O.kv_cache_append(k.cuda(), v.cuda(), *caches[0], *caches[1],
                      torch.zeros(B, dtype=torch.int32, device="cuda"))
    return caches


def _to_paged(caches, lens, page, g, device="cuda"):
    """Copy a contiguous cache into a shuffled page pool (scale/zero in the cache's layout);
    returns pools + block table."""
    (kc, ks, kz), (vc, vs, vz) = caches
    B, cap, hkv, dh = kc.shape
    max_pages = -(-cap // page)
    n = B * max_pages + 3
    table = _block_table(B, max_pages, n, g)
    pools = []
    for src in (kc, ks, kz, vc, vs, vz):
        pool = torch.zeros((n, page) + tuple(src.shape[2:]), dtype=src.dtype, device=device)
        for b in range(B):
            for p in range(max_pages):
                lo, hi = p * page, min((p + 1) * page, cap)
                if lo < hi:
                    pool[int(table[b, p]), : hi - lo] = src[b, lo:hi]
        if src.dim() == 3 and src.shape[2] > 1 and src.stride(1) == 1:  # head-major scale/zero
            pool = _head_major(pool)
        pools.append(pool)
    # pages past each sequence's length are "not allocated"
    for b in range(B):
        used = -(-int(lens[b]) // page)
        table[b, used:] = -1
    return pools, table.to(device)


CASES_DECODE = [
    # (hq, hkv, d, lens)
    (4, 4, 64, [1, 7, 16, 100]),
    (32, 32, 128, [1, 300, 1025]),
    (32, 8, 128, [1, 17, 4097, 2000]),
    (9, 3, 64, [5, 1, 999]),
    (9, 3, 128, [64, 33]),
    (16, 2, 128, [2500]),  # G = 8
    (48, 2, 64, [700, 3]),  # G = 24: two row tiles per KV head
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES_DECODE)))
@pytest.mark.parametrize("paged", [False, True])
def test_decode_attention(dtype, case, paged):
    hq, hkv, d, lens_l = CASES_DECODE[case]
    g = torch.Generator().manual_seed(case)
    B = len(lens_l)
    cap = max(lens_l) + 5
    lens = torch.tensor(lens_l, dtype=torch.int32)
    caches = _filled_cache(B, cap, hkv, d, lens, dtype, g)
    q = torch.randn(B, 1, hq, d, generator=g).to(dtype).cuda()
    want = _sdpa_reference(q, *caches[0], *caches[1], lens, True, d ** -0.5)
    _poison()
    if paged:
        pools, table = _to_paged(caches, lens, 16, g)
        got = O.paged_int4_kv_attention(q, *pools, table, lens.cuda())
        _check_attention(got, want, dtype, f"paged decode case {case}")
        # a too-small max_seqlen hint changes only the work split
        got2 = O.paged_int4_kv_attention(q, *pools, table, lens.cuda(), max_seqlen=16)
        _check_attention(got2, want, dtype, f"paged decode case {case}, small hint")
    else:
        got = O.int4_kv_attention(q, *caches[0], *caches[1], lens.cuda())
        _check_attention(got, want, dtype, f"decode case {case}")
    torch.cuda.synchronize()
    O.kv_check_errors()


CASES_PREFILL = [
    # (hq, hkv, d, sq, lens, causal)
    (4, 4, 64, 7, [7, 30], True),
    (32, 8, 128, 64, [64, 200], True),
    (9, 3, 64, 33, [33, 100, 40], True),
    (9, 3, 128, 16, [16, 50], False),
    (32, 32, 128, 130, [130], True),
    (8, 8, 64, 3, [3, 1000], True),  # chunked prefill on a long cache
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES_PREFILL)))
@pytest.mark.parametrize("paged", [False, True])
def test_prefill_attention(dtype, case, paged):
    hq, hkv, d, sq, lens_l, causal = CASES_PREFILL[case]
    g = torch.Generator().manual_seed(100 + case)
    B = len(lens_l)
    cap = max(lens_l) + 3
    lens = torch.tensor(lens_l, dtype=torch.int32)
    caches = _filled_cache(B, cap, hkv, d, lens, dtype, g)
    q = torch.randn(B, sq, hq, d, generator=g).to(dtype).cuda()
    want = _sdpa_reference(q, *caches[0], *caches[1], lens, causal, d ** -0.5)
    _poison()
    if paged:
        pools, table = _to_paged(caches, lens, 32, g)
        got = O.paged_int4_kv_attention(q, *pools, table, lens.cuda(), causal=causal)
    else:
        got = O.int4_kv_attention(q, *caches[0], *caches[1], lens.cuda(), causal=causal)
    _check_attention(got, want, dtype, f"prefill case {case} paged={paged}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("sq", [1, 20])
def test_attention_scale_layouts_agree(dtype, sq):
    """Token-major and head-major scale/zero: the same numbers, bit for bit, contiguous and
    paged (decode with split-KV, and prefill)."""
    _check_scale_layouts_agree(O, dtype, sq, "cuda")


def _check_scale_layouts_agree(ops, dtype, sq, device):
    g = torch.Generator().manual_seed(21 + sq)
    B, hq, hkv, d = 2, 8, 2, 128
    lens = torch.tensor([300, sq + 5], dtype=torch.int32)
    caches = [_junk_cache(B, 310, hkv, d, g) for _ in range(2)]
    k, v = (_kv_data(B, 300, hkv, d, torch.bfloat16, g, outliers=False) for _ in range(2))
    O.kv_cache_append(k, v, *caches[0], *caches[1], torch.zeros(B, dtype=torch.int32))
    q = torch.randn(B, sq, hq, d, generator=g).to(dtype).to(device)
    lens_d = lens.to(device)
    outs = []
    for head_major in (False, True):
        c = [[t.to(device) for t in _relayout(side, head_major)] for side in caches]
        assert (c[0][1].stride(1) == 1) == head_major
        got = ops.int4_kv_attention(q, *c[0], *c[1], lens_d, d ** -0.5, True)
        pools, table = _to_paged(c, lens, 32, torch.Generator().manual_seed(3), device=device)
        assert (pools[1].stride(1) == 1) == head_major
        gotp = ops.paged_int4_kv_attention(q, *pools, table, lens_d, d ** -0.5, True, -1)
        outs.append((got.cpu(), gotp.cpu()))
    for (a, b), what in zip(zip(*outs), ("contiguous", "paged")):
        assert torch.equal(a, b), f"{what}: token-major and head-major scale/zero differ"
    want = _sdpa_reference(q.cpu(), *caches[0], *caches[1], lens, True, d ** -0.5)
    _check_attention(outs[1][0], want, dtype, "head-major")


def test_attention_fp32_matches_reference():
    g = torch.Generator().manual_seed(5)
    B, hq, hkv, d = 2, 6, 2, 64
    lens = torch.tensor([5, 130], dtype=torch.int32)
    caches = _filled_cache(B, 140, hkv, d, lens, torch.float32, g)
    for sq in (1, 4):
        q = torch.randn(B, sq, hq, d, generator=g).cuda()
        want = O.int4_kv_attention(q.cpu(), *[c.cpu() for c in caches[0]],
                                   *[c.cpu() for c in caches[1]], lens)
        _poison()
        got = O.int4_kv_attention(q, *caches[0], *caches[1], lens.cuda())
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_attention_matches_cpu_reference_op():
    """The CUDA op against the registered reference op itself (CPU), bf16, GQA, split-KV."""
    g = torch.Generator().manual_seed(6)
    B, hq, hkv, d = 2, 8, 2, 128
    lens = torch.tensor([1, 3000], dtype=torch.int64)
    caches = _filled_cache(B, 3000, hkv, d, lens, torch.bfloat16, g)
    q = torch.randn(B, 1, hq, d, generator=g).to(torch.bfloat16)
    want = O.int4_kv_attention(q, *[c.cpu() for c in caches[0]], *[c.cpu() for c in caches[1]],
                               lens).float()
    got = O.int4_kv_attention(q.cuda(), *caches[0], *caches[1], lens.cuda())
    _check_attention(got.cpu(), want, torch.bfloat16, "vs CPU reference op")


def test_llama3_shape_decode():
    g = torch.Generator().manual_seed(8)
    B, hq, hkv, d, ctx = 4, 32, 8, 128, 4096
    lens = torch.tensor([ctx, ctx - 1, 17, ctx // 2 + 3], dtype=torch.int32)
    caches = _filled_cache(B, ctx, hkv, d, lens, torch.bfloat16, g)
    q = torch.randn(B, 1, hq, d, generator=g).to(torch.bfloat16).cuda()
    want = _sdpa_reference(q, *caches[0], *caches[1], lens, True, d ** -0.5)
    _poison()
    got = O.int4_kv_attention(q, *caches[0], *caches[1], lens.cuda())
    _check_attention(got, want, torch.bfloat16, "llama3 decode")


def test_append_then_decode_end_to_end():
    """Prefill + decode steps through the CUDA append, attention after each step."""
    g = torch.Generator().manual_seed(9)
    B, hq, hkv, d, page = 2, 9, 3, 64, 16
    n = 16
    table = _block_table(B, 8, n, g).cuda()
    pools = [_cuda(_junk_cache(n, page, hkv, d, g)) for _ in range(2)]
    lens = torch.tensor([0, 0], dtype=torch.int32, device="cuda")
    prompt = torch.tensor([5, 21])
    # ragged prefill: pad the shorter prompt, then rewind its length
    k, v = _kv_data(B, 21, hkv, d, torch.bfloat16, g).cuda(), _kv_data(B, 21, hkv, d, torch.bfloat16, g).cuda()
    O.paged_kv_cache_append(k, v, *pools[0], *pools[1], table, lens)
    lens = prompt.to(torch.int32).cuda()
    for step in range(20):
        k1, v1 = (_kv_data(B, 1, hkv, d, torch.bfloat16, g).cuda() for _ in range(2))
        O.paged_kv_cache_append(k1, v1, *pools[0], *pools[1], table, lens)
        lens = lens + 1
        q = torch.randn(B, 1, hq, d, generator=g).to(torch.bfloat16).cuda()
        got = O.paged_int4_kv_attention(q, *pools[0], *pools[1], table, lens)
        cap = 8 * page
        cont = [ref.paged_kv_gather(*p, table, cap) for p in pools]
        want = _sdpa_reference(q, *cont[0], *cont[1], lens.cpu(), True, d ** -0.5)
        _check_attention(got, want, torch.bfloat16, f"end-to-end step {step}")


# --------------------------------------------------------------------------- device-side errors

def _drain():
    torch.cuda.synchronize()
    try:
        O.kv_check_errors()
    except ValueError:
        pass


def test_append_overflow_is_reported_and_writes_nothing():
    _drain()
    g = torch.Generator().manual_seed(10)
    B, hkv, d = 2, 2, 64
    kc, vc = _cuda(_junk_cache(B, 8, hkv, d, g)), _cuda(_junk_cache(B, 8, hkv, d, g))
    before = [t.clone() for t in kc + vc]
    k = _kv_data(B, 4, hkv, d, torch.float16, g).cuda()
    lens = torch.tensor([0, 6], dtype=torch.int32, device="cuda")  # sequence 1 overflows
    O.kv_cache_append(k, k, *kc, *vc, lens)  # no host sync: returns normally
    torch.cuda.synchronize()
    for got, old in zip(kc + vc, before):
        assert torch.equal(got[1], old[1]), "the overflowing sequence must be left untouched"
        assert not torch.equal(got[0, :4], old[0, :4]), "the valid sequence must be written"
    with pytest.raises(ValueError, match="cache full"):
        O.kv_cache_append(k, k, *kc, *vc, torch.zeros(B, dtype=torch.int32, device="cuda"))
    O.kv_check_errors()  # raised once, then cleared


def test_kv_check_errors_and_attention_bad_lengths():
    _drain()
    g = torch.Generator().manual_seed(11)
    B, hq, hkv, d = 2, 4, 2, 128
    lens = torch.tensor([4, 9], dtype=torch.int32)
    caches = _filled_cache(B, 10, hkv, d, lens, torch.bfloat16, g)
    q = torch.randn(B, 1, hq, d, generator=g).to(torch.bfloat16).cuda()
    out = O.int4_kv_attention(q, *caches[0], *caches[1], torch.tensor([4, 11], dtype=torch.int32,
                                                                       device="cuda"))
    torch.cuda.synchronize()
    assert bool(torch.isnan(out[1]).all()) and bool(torch.isfinite(out[0]).all())
    with pytest.raises(O.OpInputError, match="seqlens"):
        O.kv_check_errors()
    O.kv_check_errors()


def test_paged_unallocated_page_is_reported():
    _drain()
    g = torch.Generator().manual_seed(12)
    B, hkv, d, page = 1, 1, 64, 16
    pools = [_cuda(_junk_cache(4, page, hkv, d, g)) for _ in range(2)]
    table = torch.tensor([[2, -1]], dtype=torch.int32, device="cuda")
    k = _kv_data(B, 3, hkv, d, torch.bfloat16, g).cuda()
    before = [t.clone() for t in pools[0]]
    O.paged_kv_cache_append(k, k, *pools[0], *pools[1], table,
                            torch.tensor([15], dtype=torch.int32, device="cuda"))
    torch.cuda.synchronize()
    for got, old in zip(pools[0], before):
        assert torch.equal(got, old)
    with pytest.raises(ValueError, match="page not allocated"):
        O.kv_check_errors()


# --------------------------------------------------------------------------- host-side checks

def test_cuda_bad_input_raises():
    g = torch.Generator().manual_seed(13)
    kc = _cuda(_junk_cache(1, 8, 2, 64, g))
    z = torch.zeros(1, dtype=torch.int32, device="cuda")
    k = torch.randn(1, 1, 2, 64, device="cuda")
    with pytest.raises(ValueError, match="head_dim"):
        O.kv_cache_append(torch.randn(1, 1, 2, 96, device="cuda"), torch.randn(1, 1, 2, 96, device="cuda"),
                          *_cuda(_junk_cache(1, 8, 2, 96, g)), *_cuda(_junk_cache(1, 8, 2, 96, g)), z)
    with pytest.raises(ValueError, match="dtype"):
        O.kv_cache_append(k, k.half(), *kc, *kc, z)
    with pytest.raises(ValueError, match="contiguous"):
        big = _cuda(_junk_cache(1, 16, 2, 64, g))
        O.kv_cache_append(k, k, big[0][:, ::2], big[1][:, ::2], big[2][:, ::2], *kc, z)
    with pytest.raises(ValueError, match="multiple"):
        O.int4_kv_attention(torch.randn(1, 1, 3, 64, device="cuda"), *kc, *kc, z + 1)
    with pytest.raises(ValueError, match="power of two"):
        O.paged_kv_cache_append(k, k, *_cuda(_junk_cache(2, 24, 2, 64, g)),
                                *_cuda(_junk_cache(2, 24, 2, 64, g)),
                                torch.zeros(1, 1, dtype=torch.int32, device="cuda"), z)
    _check_scale_layout_errors(lambda *c: O.kv_cache_append(k, k, *c, z),
                               lambda *c: O.int4_kv_attention(k, *c, z + 1), "cuda", g)


def _check_scale_layout_errors(append, attend, device, g):
    """Scale/zero with gaps (a strided slice) or with layouts differing between the four
    tensors are refused by the append and the attention ops, naming the problem."""
    kc = [t.to(device) for t in _junk_cache(1, 8, 2, 64, g)]
    km = [t.to(device) for t in _junk_cache(1, 8, 2, 64, g, head_major=True)]
    gappy = [t.to(device) for t in _junk_cache(1, 8, 4, 64, g)]
    gappy = [kc[0], gappy[1][:, :, ::2], kc[2]]
    for op in (append, attend):
        with pytest.raises(ValueError, match="k_scale must be dense"):
            op(*gappy, *kc)
        with pytest.raises(ValueError, match="same strides"):
            op(*kc, *km)
        with pytest.raises(ValueError, match="same strides"):
            op(kc[0], kc[1], km[2], *kc)


# --------------------------------------------------------------------------- opcheck

def _opcheck_cases():
    g = torch.Generator().manual_seed(14)
    B, hkv, d, page = 2, 2, 64, 16
    kc, vc = _junk_cache(B, 32, hkv, d, g), _junk_cache(B, 32, hkv, d, g)
    kp, vp = _junk_cache(6, page, hkv, d, g, True), _junk_cache(6, page, hkv, d, g, True)
    table = torch.tensor([[4, 1], [0, 2]], dtype=torch.int32)
    k = torch.randn(B, 3, hkv, d, generator=g).to(torch.bfloat16)
    cos, sin = _cos_sin(B, 3, d, torch.bfloat16, g)
    lens = torch.tensor([0, 20], dtype=torch.int32)
    q = torch.randn(B, 2, 4, d, generator=g).to(torch.bfloat16)
    ostq = torch.ops.ostquant
    return [
        (ostq.kv_cache_append.default, (k, k, *kc, *vc, lens)),
        (ostq.kv_cache_append_fused.default, (k, k, *kc, *vc, lens, cos, sin, True)),
        (ostq.paged_kv_cache_append.default, (k, k, *kp, *vp, table, lens, cos, sin, False)),
        (ostq.int4_kv_attention.default, (q, *kc, *vc, lens + 3, 0.125, True)),
        (ostq.paged_int4_kv_attention.default, (q, *kp, *vp, table, lens + 3, 0.125, True, 23)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck_cuda(case):
    op, args = _opcheck_cases()[case]
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)
