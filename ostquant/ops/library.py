"""torch.library registration of the ``ostquant`` ops: schemas, fake kernels, reference kernels.

The reference kernels (``ostquant.ops.reference``) are registered for every device
(``CompositeExplicitAutograd``). When the compiled extension ``ostquant._C`` loads it registers
CUDA kernels for some ops; the dispatcher then prefers those on CUDA tensors.

Each op's reference registration runs :mod:`ostquant.ops.checks` first, so direct calls through
``torch.ops.ostquant.*`` get the same clear errors as the Python wrappers.
"""
from __future__ import annotations

import torch

from . import checks
from . import reference as ref

LIB = torch.library.Library("ostquant", "DEF")

SCHEMAS = {
    "pack_int4": "pack_int4(Tensor q) -> Tensor",
    "unpack_int4": "unpack_int4(Tensor packed) -> Tensor",
    "quantize_per_token": (
        "quantize_per_token(Tensor x, int bits=4, bool sym=False, float clip_ratio=1.0)"
        " -> (Tensor, Tensor, Tensor)"),
    "quantize_per_channel": (
        "quantize_per_channel(Tensor w, int bits=4, bool sym=True, bool clip_search=False,"
        " float max_shrink=0.8, int grid=100, float norm=2.4) -> (Tensor, Tensor, Tensor)"),
    "int4_gemm": (
        "int4_gemm(Tensor x_packed, Tensor x_scale, Tensor? x_zero, Tensor w_packed,"
        " Tensor w_scale, Tensor? w_sum=None, Tensor? bias=None, ScalarType out_dtype=15)"
        " -> Tensor"),
    "w4a16_gemm": "w4a16_gemm(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias=None) -> Tensor",
    "hadamard_transform": "hadamard_transform(Tensor x, float scale=1.0) -> Tensor",
    "quantize_kv": "quantize_kv(Tensor x) -> (Tensor, Tensor, Tensor)",
    "kv_cache_append": (
        "kv_cache_append(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) k_scale,"
        " Tensor(c!) k_zero, Tensor(d!) v_cache, Tensor(e!) v_scale, Tensor(f!) v_zero,"
        " Tensor cache_seqlens) -> ()"),
    "int4_kv_attention": (
        "int4_kv_attention(Tensor q, Tensor k_cache, Tensor k_scale, Tensor k_zero,"
        " Tensor v_cache, Tensor v_scale, Tensor v_zero, Tensor seqlens, float sm_scale,"
        " bool causal=True) -> Tensor"),
    "kv_cache_append_fused": (
        "kv_cache_append_fused(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) k_scale,"
        " Tensor(c!) k_zero, Tensor(d!) v_cache, Tensor(e!) v_scale, Tensor(f!) v_zero,"
        " Tensor cache_seqlens, Tensor? cos=None, Tensor? sin=None, bool k_hadamard=False)"
        " -> ()"),
    "paged_kv_cache_append": (
        "paged_kv_cache_append(Tensor k, Tensor v, Tensor(a!) k_pool, Tensor(b!) k_scale,"
        " Tensor(c!) k_zero, Tensor(d!) v_pool, Tensor(e!) v_scale, Tensor(f!) v_zero,"
        " Tensor block_table, Tensor cache_seqlens, Tensor? cos=None, Tensor? sin=None,"
        " bool k_hadamard=False) -> ()"),
    "paged_int4_kv_attention": (
        "paged_int4_kv_attention(Tensor q, Tensor k_pool, Tensor k_scale, Tensor k_zero,"
        " Tensor v_pool, Tensor v_scale, Tensor v_zero, Tensor block_table, Tensor seqlens,"
        " float sm_scale, bool causal=True, int max_seqlen=-1) -> Tensor"),
    "quantize_per_token_packed": (
        "quantize_per_token_packed(Tensor x, int bits=4, bool sym=False, float clip_ratio=1.0)"
        " -> (Tensor, Tensor, Tensor)"),
    "hadamard_quantize_per_token": (
        "hadamard_quantize_per_token(Tensor x, float scale, int bits=4, bool sym=False,"
        " float clip_ratio=1.0, bool packed=True) -> (Tensor, Tensor, Tensor)"),
    "rmsnorm_quantize_per_token": (
        "rmsnorm_quantize_per_token(Tensor x, Tensor? weight, float eps, int bits=4,"
        " bool sym=False, float clip_ratio=1.0, bool packed=True) -> (Tensor, Tensor, Tensor)"),
}

for _schema in SCHEMAS.values():
    LIB.define(_schema)


def _impl(name):
    def deco(fn):
        LIB.impl(name, fn, "CompositeExplicitAutograd")
        return fn
    return deco


def _fake(name):
    return torch.library.register_fake(f"ostquant::{name}", lib=LIB)


# ---------------------------------------------------------------- pack / unpack

@_impl("pack_int4")
def _pack_int4(q):
    checks.pack_int4(q)
    return ref.pack_int4(q)


@_fake("pack_int4")
def _pack_int4_fake(q):
    return q.new_empty(*q.shape[:-1], q.shape[-1] // 2, dtype=torch.uint8)


@_impl("unpack_int4")
def _unpack_int4(packed):
    checks.unpack_int4(packed)
    return ref.unpack_int4(packed)


@_fake("unpack_int4")
def _unpack_int4_fake(packed):
    return packed.new_empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=torch.int8)


# ---------------------------------------------------------------- quantization

def _qparams_fake(x):
    lead = x.shape[:-1]
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(lead, dtype=torch.float32),
            x.new_empty(lead, dtype=torch.float32))


@_impl("quantize_per_token")
def _quantize_per_token(x, bits=4, sym=False, clip_ratio=1.0):
    checks.quantize_per_token(x, bits, sym, clip_ratio)
    return ref.quantize_per_token(x, bits, sym, clip_ratio)


@_fake("quantize_per_token")
def _quantize_per_token_fake(x, bits=4, sym=False, clip_ratio=1.0):
    return _qparams_fake(x)


@_impl("quantize_per_channel")
def _quantize_per_channel(w, bits=4, sym=True, clip_search=False, max_shrink=0.8, grid=100,
                          norm=2.4):
    checks.quantize_per_channel(w, bits, sym, clip_search, max_shrink, grid, norm)
    return ref.quantize_per_channel(w, bits, sym, clip_search, max_shrink, grid, norm)


@_fake("quantize_per_channel")
def _quantize_per_channel_fake(w, bits=4, sym=True, clip_search=False, max_shrink=0.8, grid=100,
                               norm=2.4):
    return _qparams_fake(w)


# ---------------------------------------------------------------- GEMMs

@_impl("int4_gemm")
def _int4_gemm(x_packed, x_scale, x_zero, w_packed, w_scale, w_sum=None, bias=None,
               out_dtype=torch.bfloat16):
    checks.int4_gemm(x_packed, x_scale, x_zero, w_packed, w_scale, w_sum, bias, out_dtype)
    return ref.int4_gemm(x_packed, x_scale, x_zero, w_packed, w_scale, w_sum, bias, out_dtype)


@_fake("int4_gemm")
def _int4_gemm_fake(x_packed, x_scale, x_zero, w_packed, w_scale, w_sum=None, bias=None,
                    out_dtype=torch.bfloat16):
    return x_packed.new_empty(x_packed.shape[0], w_packed.shape[0], dtype=out_dtype)


@_impl("w4a16_gemm")
def _w4a16_gemm(x, w_packed, w_scale, bias=None):
    checks.w4a16_gemm(x, w_packed, w_scale, bias)
    return ref.w4a16_gemm(x, w_packed, w_scale, bias)


@_fake("w4a16_gemm")
def _w4a16_gemm_fake(x, w_packed, w_scale, bias=None):
    return x.new_empty(x.shape[0], w_packed.shape[0])


# ---------------------------------------------------------------- Hadamard

@_impl("hadamard_transform")
def _hadamard_transform(x, scale=1.0):
    checks.hadamard_transform(x, scale)
    return ref.hadamard_transform(x, scale)


@_fake("hadamard_transform")
def _hadamard_transform_fake(x, scale=1.0):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------- KV cache

@_impl("quantize_kv")
def _quantize_kv(x):
    checks.quantize_kv(x)
    return ref.quantize_kv(x)


@_fake("quantize_kv")
def _quantize_kv_fake(x):
    lead = x.shape[:-1]
    return (x.new_empty(*lead, x.shape[-1] // 2, dtype=torch.uint8),
            x.new_empty(lead, dtype=torch.float16), x.new_empty(lead, dtype=torch.float16))


@_impl("kv_cache_append")
def _kv_cache_append(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero, cache_seqlens):
    checks.kv_cache_append(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero,
                           cache_seqlens)
    ref.kv_cache_append(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero, cache_seqlens)


@_fake("kv_cache_append")
def _kv_cache_append_fake(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero,
                          cache_seqlens):
    return None


@_impl("int4_kv_attention")
def _int4_kv_attention(q, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero, seqlens,
                       sm_scale, causal=True):
    checks.int4_kv_attention(q, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero, seqlens,
                             sm_scale, causal)
    return ref.int4_kv_attention(q, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero, seqlens,
                                 sm_scale, causal)


@_fake("int4_kv_attention")
def _int4_kv_attention_fake(q, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero, seqlens,
                            sm_scale, causal=True):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@_impl("kv_cache_append_fused")
def _kv_cache_append_fused(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero,
                           cache_seqlens, cos=None, sin=None, k_hadamard=False):
    checks.kv_cache_append_fused(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero,
                                 cache_seqlens, cos, sin, k_hadamard)
    ref.kv_cache_append_fused(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero,
                              cache_seqlens, cos, sin, k_hadamard)


@_fake("kv_cache_append_fused")
def _kv_cache_append_fused_fake(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero,
                                cache_seqlens, cos=None, sin=None, k_hadamard=False):
    return None


@_impl("paged_kv_cache_append")
def _paged_kv_cache_append(k, v, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero, block_table,
                           cache_seqlens, cos=None, sin=None, k_hadamard=False):
    checks.paged_kv_cache_append(k, v, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero,
                                 block_table, cache_seqlens, cos, sin, k_hadamard)
    ref.paged_kv_cache_append(k, v, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero,
                              block_table, cache_seqlens, cos, sin, k_hadamard)


@_fake("paged_kv_cache_append")
def _paged_kv_cache_append_fake(k, v, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero,
                                block_table, cache_seqlens, cos=None, sin=None, k_hadamard=False):
    return None


@_impl("paged_int4_kv_attention")
def _paged_int4_kv_attention(q, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero, block_table,
                             seqlens, sm_scale, causal=True, max_seqlen=-1):
    checks.paged_int4_kv_attention(q, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero,
                                   block_table, seqlens, sm_scale, causal, max_seqlen)
    return ref.paged_int4_kv_attention(q, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero,
                                       block_table, seqlens, sm_scale, causal, max_seqlen)


@_fake("paged_int4_kv_attention")
def _paged_int4_kv_attention_fake(q, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero,
                                  block_table, seqlens, sm_scale, causal=True, max_seqlen=-1):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------- fused per-token quantization

def _packed_qparams_fake(x):
    lead = x.shape[:-1]
    return (x.new_empty(*lead, x.shape[-1] // 2, dtype=torch.uint8),
            x.new_empty(lead, dtype=torch.float32), x.new_empty(lead, dtype=torch.float32))


@_impl("quantize_per_token_packed")
def _quantize_per_token_packed(x, bits=4, sym=False, clip_ratio=1.0):
    checks.quantize_per_token_packed(x, bits, sym, clip_ratio)
    return ref.quantize_per_token_packed(x, bits, sym, clip_ratio)


@_fake("quantize_per_token_packed")
def _quantize_per_token_packed_fake(x, bits=4, sym=False, clip_ratio=1.0):
    return _packed_qparams_fake(x)


@_impl("hadamard_quantize_per_token")
def _hadamard_quantize_per_token(x, scale, bits=4, sym=False, clip_ratio=1.0, packed=True):
    checks.hadamard_quantize_per_token(x, scale, bits, sym, clip_ratio)
    return ref.hadamard_quantize_per_token(x, scale, bits, sym, clip_ratio, packed)


@_fake("hadamard_quantize_per_token")
def _hadamard_quantize_per_token_fake(x, scale, bits=4, sym=False, clip_ratio=1.0, packed=True):
    return _packed_qparams_fake(x) if packed else _qparams_fake(x)


@_impl("rmsnorm_quantize_per_token")
def _rmsnorm_quantize_per_token(x, weight, eps, bits=4, sym=False, clip_ratio=1.0, packed=True):
    checks.rmsnorm_quantize_per_token(x, weight, eps, bits, sym, clip_ratio)
    return ref.rmsnorm_quantize_per_token(x, weight, eps, bits, sym, clip_ratio, packed)


@_fake("rmsnorm_quantize_per_token")
def _rmsnorm_quantize_per_token_fake(x, weight, eps, bits=4, sym=False, clip_ratio=1.0,
                                     packed=True):
    return _packed_qparams_fake(x) if packed else _qparams_fake(x)
