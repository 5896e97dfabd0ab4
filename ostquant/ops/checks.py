"""Per-op argument checks (one function per op, same signature as the op).

Kept apart from the math so the reference kernels stay readable and the CUDA path gets the
same checks: the Python wrappers in :mod:`ostquant.ops` and the reference registrations both
call these; the C++ kernels repeat the cheap ones with ``TORCH_CHECK``.
"""
from __future__ import annotations

import math

import torch

from .validate import (FLOAT_DTYPES, check_bits, check_finite, check_nonempty,
                       check_same_device, check_shape, check_tensor, fail)

#: K granularity (in int4 elements) of the int4 GEMMs. Every kernel path accepts multiples of
#: this; LLaMA-family sizes (576, 1536, 4096, 11008, 14336, ...) all are.
GEMM_K_ALIGN = 32
#: head_dim values the int4 KV-cache ops accept.
KV_HEAD_DIMS = (64, 128)
HEAD_DIM_ALIGN = 2
#: Paged KV cache: tokens per page must be a power of two and at least this (the attention
#: kernels walk the cache in steps of 16 tokens that never cross a page).
KV_MIN_PAGE_SIZE = 16


def pack_int4(q):
    check_tensor("pack_int4", "q", q, dtypes=(torch.int8,), min_ndim=1)
    if q.shape[-1] % 2:
        fail("pack_int4", f"last dim of q must be even to pack two int4 per byte, got {q.shape[-1]}")


def unpack_int4(packed):
    check_tensor("unpack_int4", "packed", packed, dtypes=(torch.uint8,), min_ndim=1)


def _check_qargs(op, x, bits, clip_ratio):
    name = "x" if op != "quantize_per_channel" else "w"
    check_tensor(op, name, x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_nonempty(op, name, x)
    check_bits(op, bits)
    if not x.is_cuda:  # free on the host; on the GPU NaN propagates into the scale instead
        check_finite(op, name, x)
    if not (0.0 < clip_ratio <= 1.0):
        fail(op, f"clip_ratio must be in (0, 1], got {clip_ratio}")


def quantize_per_token(x, bits, sym, clip_ratio):
    _check_qargs("quantize_per_token", x, bits, clip_ratio)


def quantize_per_channel(w, bits, sym, clip_search, max_shrink, grid, norm):
    _check_qargs("quantize_per_channel", w, bits, 1.0)
    if w.dim() != 2:
        fail("quantize_per_channel", f"w must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    check_finite("quantize_per_channel", "w", w)
    if clip_search and not (0.0 <= max_shrink < 1.0 and grid >= 1 and norm > 0):
        fail("quantize_per_channel", f"bad clip search settings max_shrink={max_shrink}, "
             f"grid={grid}, norm={norm} (need 0 <= max_shrink < 1, grid >= 1, norm > 0)")


def _check_k(op, k):
    if k % GEMM_K_ALIGN:
        fail(op, f"K = {k} is not a multiple of {GEMM_K_ALIGN}, the int4 GEMM's K granularity")


def int4_gemm(x_packed, x_scale, x_zero, w_packed, w_scale, w_sum, bias, out_dtype):
    op = "int4_gemm"
    check_tensor(op, "x_packed", x_packed, dtypes=(torch.uint8, torch.int8), ndim=2)
    check_tensor(op, "w_packed", w_packed, dtypes=(torch.uint8,), ndim=2)
    codes = x_packed.dtype == torch.int8  # the codes one per byte [M, K], not packed
    m = x_packed.shape[0]
    k = x_packed.shape[1] if codes else 2 * x_packed.shape[1]
    n = w_packed.shape[0]
    if m == 0:
        fail(op, "x_packed has M = 0 rows (empty batch)")
    if n == 0:
        fail(op, "w_packed has N = 0 rows")
    if 2 * w_packed.shape[1] != k:
        fail(op, f"K mismatch: x_packed holds K = {k}{' (int8 codes)' if codes else ''}, "
                 f"w_packed holds K = {2 * w_packed.shape[1]}")
    _check_k(op, k)
    if codes and x_packed.numel() and not x_packed.is_cuda:  # free on the host; CUDA: no scan
        lo, hi = (int(v) for v in torch.aminmax(x_packed))
        if lo < -8 or hi > 7:
            fail(op, f"x_packed holds int8 codes outside the int4 range [-8, 7] "
                     f"(min {lo}, max {hi})")
    check_tensor(op, "x_scale", x_scale, dtypes=(torch.float32,))
    check_shape(op, "x_scale", x_scale, (m,))
    check_tensor(op, "w_scale", w_scale, dtypes=(torch.float32,))
    check_shape(op, "w_scale", w_scale, (n,))
    if x_zero is not None:
        check_tensor(op, "x_zero", x_zero, dtypes=(torch.float32,))
        check_shape(op, "x_zero", x_zero, (m,))
    if w_sum is not None:
        check_tensor(op, "w_sum", w_sum, dtypes=(torch.float32,))
        check_shape(op, "w_sum", w_sum, (n,))
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES)
        check_shape(op, "bias", bias, (n,))
    if out_dtype not in FLOAT_DTYPES:
        fail(op, f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    check_same_device(op, x_packed=x_packed, x_scale=x_scale, x_zero=x_zero, w_packed=w_packed,
                      w_scale=w_scale, w_sum=w_sum, bias=bias)


def w4a16_gemm(x, w_packed, w_scale, bias):
    op = "w4a16_gemm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(op, "w_packed", w_packed, dtypes=(torch.uint8,), ndim=2)
    if x.shape[0] == 0:
        fail(op, "x has M = 0 rows (empty batch)")
    n, kh = w_packed.shape
    if x.shape[1] != 2 * kh:
        fail(op, f"K mismatch: x has K = {x.shape[1]}, w_packed holds K = {2 * kh}")
    _check_k(op, x.shape[1])
    check_tensor(op, "w_scale", w_scale, dtypes=(torch.float32,))
    check_shape(op, "w_scale", w_scale, (n,))
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES)
        check_shape(op, "bias", bias, (n,))
    check_same_device(op, x=x, w_packed=w_packed, w_scale=w_scale, bias=bias)


def hadamard_transform(x, scale):
    from ostquant.transforms.hadamard_matrices import hadamard_factor

    op = "hadamard_transform"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_nonempty(op, "x", x)
    try:
        hadamard_factor(x.shape[-1])
    except ValueError as e:
        fail(op, f"unsupported last dim of x: {e}")


def _check_head_dim(op, d):
    if d not in KV_HEAD_DIMS:
        fail(op, f"head_dim = {d} is not supported (supported: {KV_HEAD_DIMS})")


def quantize_kv(x):
    op = "quantize_kv"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_nonempty(op, "x", x)
    if x.shape[-1] % 2:
        fail(op, f"head_dim (last dim of x) must be even, got {x.shape[-1]}")


def _check_cache(op, name, cache, scale, zero, shape4):
    check_tensor(op, name, cache, dtypes=(torch.uint8,), ndim=4)
    b, smax, hkv, d = shape4
    check_shape(op, name, cache, (b, smax, hkv, d // 2))
    for nm, t in ((f"{name[0]}_scale", scale), (f"{name[0]}_zero", zero)):
        check_tensor(op, nm, t, dtypes=(torch.float16,))
        check_shape(op, nm, t, (b, smax, hkv))


def kv_cache_append(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero, cache_seqlens):
    op = "kv_cache_append"
    check_tensor(op, "k", k, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor(op, "v", v, dtypes=(k.dtype,), ndim=4)
    check_shape(op, "v", v, k.shape)
    b, s, hkv, d = k.shape
    if b == 0 or s == 0:
        fail(op, f"k is empty (shape {tuple(k.shape)})")
    _check_head_dim(op, d)
    check_tensor(op, "k_cache", k_cache, ndim=4)
    smax = k_cache.shape[1]
    _check_cache(op, "k_cache", k_cache, k_scale, k_zero, (b, smax, hkv, d))
    _check_cache(op, "v_cache", v_cache, v_scale, v_zero, (b, smax, hkv, d))
    check_tensor(op, "cache_seqlens", cache_seqlens, dtypes=(torch.int32, torch.int64), ndim=1)
    check_shape(op, "cache_seqlens", cache_seqlens, (b,))
    check_same_device(op, k=k, v=v, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)


def int4_kv_attention(q, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero, seqlens, sm_scale,
                      causal):
    op = "int4_kv_attention"
    check_tensor(op, "q", q, dtypes=FLOAT_DTYPES, ndim=4)
    b, sq, hq, d = q.shape
    if b == 0 or sq == 0:
        fail(op, f"q is empty (shape {tuple(q.shape)})")
    _check_head_dim(op, d)
    check_tensor(op, "k_cache", k_cache, ndim=4)
    smax, hkv = k_cache.shape[1], k_cache.shape[2]
    if hkv == 0 or hq % hkv:
        fail(op, f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    _check_cache(op, "k_cache", k_cache, k_scale, k_zero, (b, smax, hkv, d))
    _check_cache(op, "v_cache", v_cache, v_scale, v_zero, (b, smax, hkv, d))
    check_tensor(op, "seqlens", seqlens, dtypes=(torch.int32, torch.int64), ndim=1)
    check_shape(op, "seqlens", seqlens, (b,))
    check_same_device(op, q=q, k_cache=k_cache, v_cache=v_cache, seqlens=seqlens)
    lens = seqlens.cpu()
    if bool((lens < sq).any()) or bool((lens > smax).any()):
        fail(op, f"seqlens must lie in [Sq={sq}, Smax={smax}] (queries are the last Sq cached "
             f"tokens), got {lens.tolist()}")
    if not sm_scale > 0:
        fail(op, f"sm_scale must be positive, got {sm_scale}")


# ---------------------------------------------------------------- fused / paged KV cache
# Value checks that need the lengths or the block table (cache full, page not allocated,
# seqlens out of range) live in the reference kernels, which read them on the host; the CUDA
# kernels do them on the device without a host synchronisation (docs/ops.md).


def _check_rope_hadamard(op, k, cos, sin, k_hadamard):
    if (cos is None) != (sin is None):
        fail(op, "cos and sin must be given together (RoPE on K) or both be None")
    if cos is not None:
        for nm, t in (("cos", cos), ("sin", sin)):
            check_tensor(op, nm, t, dtypes=(k.dtype,), ndim=3)
            check_shape(op, nm, t, k.shape[:2] + k.shape[3:])
        check_same_device(op, k=k, cos=cos, sin=sin)


def kv_cache_append_fused(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero,
                          cache_seqlens, cos, sin, k_hadamard):
    kv_cache_append(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero, cache_seqlens)
    _check_rope_hadamard("kv_cache_append_fused", k, cos, sin, k_hadamard)


def _check_pool(op, name, pool, scale, zero, hkv, d, page_size=None):
    check_tensor(op, name, pool, dtypes=(torch.uint8,), ndim=4)
    num_pages, p = pool.shape[0], pool.shape[1]
    if page_size is None:
        if p < KV_MIN_PAGE_SIZE or p & (p - 1):
            fail(op, f"page size (dim 1 of {name}) must be a power of two >= "
                 f"{KV_MIN_PAGE_SIZE}, got {p}")
        page_size = p
    check_shape(op, name, pool, (num_pages, page_size, hkv, d // 2))
    if num_pages == 0:
        fail(op, f"{name} has no pages")
    for nm, t in ((f"{name[0]}_scale", scale), (f"{name[0]}_zero", zero)):
        check_tensor(op, nm, t, dtypes=(torch.float16,))
        check_shape(op, nm, t, (num_pages, page_size, hkv))
    return page_size


def _check_block_table(op, block_table, b):
    check_tensor(op, "block_table", block_table, dtypes=(torch.int32,), ndim=2)
    if block_table.shape[0] != b or block_table.shape[1] == 0:
        fail(op, f"block_table must have shape ({b}, max_pages) with max_pages >= 1, got "
             f"{tuple(block_table.shape)}")


def paged_kv_cache_append(k, v, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero, block_table,
                          cache_seqlens, cos, sin, k_hadamard):
    op = "paged_kv_cache_append"
    check_tensor(op, "k", k, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor(op, "v", v, dtypes=(k.dtype,), ndim=4)
    check_shape(op, "v", v, k.shape)
    b, s, hkv, d = k.shape
    if b == 0 or s == 0:
        fail(op, f"k is empty (shape {tuple(k.shape)})")
    _check_head_dim(op, d)
    check_tensor(op, "k_pool", k_pool, ndim=4)
    p = _check_pool(op, "k_pool", k_pool, k_scale, k_zero, hkv, d)
    check_shape(op, "v_pool", v_pool, k_pool.shape)
    _check_pool(op, "v_pool", v_pool, v_scale, v_zero, hkv, d, p)
    _check_block_table(op, block_table, b)
    check_tensor(op, "cache_seqlens", cache_seqlens, dtypes=(torch.int32, torch.int64), ndim=1)
    check_shape(op, "cache_seqlens", cache_seqlens, (b,))
    check_same_device(op, k=k, v=v, k_pool=k_pool, v_pool=v_pool, block_table=block_table,
                      cache_seqlens=cache_seqlens)
    _check_rope_hadamard(op, k, cos, sin, k_hadamard)


def paged_int4_kv_attention(q, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero, block_table,
                            seqlens, sm_scale, causal, max_seqlen):
    op = "paged_int4_kv_attention"
    check_tensor(op, "q", q, dtypes=FLOAT_DTYPES, ndim=4)
    b, sq, hq, d = q.shape
    if b == 0 or sq == 0:
        fail(op, f"q is empty (shape {tuple(q.shape)})")
    _check_head_dim(op, d)
    check_tensor(op, "k_pool", k_pool, ndim=4)
    hkv = k_pool.shape[2]
    if hkv == 0 or hq % hkv:
        fail(op, f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    p = _check_pool(op, "k_pool", k_pool, k_scale, k_zero, hkv, d)
    check_shape(op, "v_pool", v_pool, k_pool.shape)
    _check_pool(op, "v_pool", v_pool, v_scale, v_zero, hkv, d, p)
    _check_block_table(op, block_table, b)
    check_tensor(op, "seqlens", seqlens, dtypes=(torch.int32, torch.int64), ndim=1)
    check_shape(op, "seqlens", seqlens, (b,))
    check_same_device(op, q=q, k_pool=k_pool, v_pool=v_pool, block_table=block_table,
                      seqlens=seqlens)
    if not sm_scale > 0:
        fail(op, f"sm_scale must be positive, got {sm_scale}")


# ---------------------------------------------------------------- fused per-token quantization
#: Bit widths of the fused quantizers: their codes are packed two per byte (int4 nibbles).
PACKED_QUANT_BITS = (2, 3, 4)


def _check_packed_qargs(op, x, bits, clip_ratio):
    """The checks after the op-specific shape checks, in the order the CUDA ops repeat them."""
    if x.shape[-1] % 2:
        fail(op, f"last dim of x must be even to pack two int4 codes per byte, got {x.shape[-1]}")
    check_bits(op, bits, PACKED_QUANT_BITS)
    if not x.is_cuda:  # free on the host; on the GPU NaN propagates into the scale instead
        check_finite(op, "x", x)
    if not (0.0 < clip_ratio <= 1.0):
        fail(op, f"clip_ratio must be in (0, 1], got {clip_ratio}")


def quantize_per_token_packed(x, bits, sym, clip_ratio):
    op = "quantize_per_token_packed"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_nonempty(op, "x", x)
    _check_packed_qargs(op, x, bits, clip_ratio)


def hadamard_quantize_per_token(x, scale, bits, sym, clip_ratio):
    from ostquant.transforms.hadamard_matrices import hadamard_factor

    op = "hadamard_quantize_per_token"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_nonempty(op, "x", x)
    try:
        hadamard_factor(x.shape[-1])
    except ValueError as e:
        fail(op, f"unsupported last dim of x: {e}")
    _check_packed_qargs(op, x, bits, clip_ratio)


def rmsnorm_quantize_per_token(x, weight, eps, bits, sym, clip_ratio):
    op = "rmsnorm_quantize_per_token"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_nonempty(op, "x", x)
    if weight is not None:
        check_tensor(op, "weight", weight, dtypes=(x.dtype,))
        check_shape(op, "weight", weight, (x.shape[-1],))
        check_same_device(op, x=x, weight=weight)
    if not (math.isfinite(eps) and eps >= 0.0):
        fail(op, f"eps must be finite and >= 0, got {eps}")
    _check_packed_qargs(op, x, bits, clip_ratio)
