"""ostquant ops: documented Python entry points to the ``torch.ops.ostquant`` custom ops.

Every op has a schema and a fake kernel (so it traces under ``torch.compile``), a pure-PyTorch
reference kernel that runs on any device (:mod:`ostquant.ops.reference`, the specification),
and, when the compiled extension ``ostquant._C`` is present, CUDA kernels for CUDA tensors.
``cuda_ops()`` lists which ops have a compiled CUDA kernel.

All ops raise :class:`OpInputError` (a ``ValueError``) naming the bad argument.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import List, Optional, Tuple

import torch

from . import library as _library  # noqa: F401  (registers schemas + reference kernels)
from .checks import GEMM_K_ALIGN, KV_HEAD_DIMS, KV_MIN_PAGE_SIZE
from .checks import _check_head_dim
from .validate import OpInputError
from .validate import fail as _fail

_ext = None
_ext_error: Optional[str] = None


def _load_extension():
    global _ext, _ext_error
    if os.environ.get("OSTQUANT_DISABLE_EXTENSION", "0") == "1":
        _ext_error = "disabled by OSTQUANT_DISABLE_EXTENSION=1"
        return
    try:
        _ext = importlib.import_module("ostquant._C")
    except ImportError as e:  # pure-Python install, or built for another torch
        _ext_error = str(e)
    except OSError as e:
        _ext_error = str(e)
        warnings.warn(f"ostquant._C failed to load ({e}); using reference kernels")


_load_extension()


#: M up to which int4_gemm runs the decode kernels (packed activations; a cheap early answer of
#: int4_gemm_takes_codes for decode steps). 0 without the extension.
_SMALL_M_MAX = int(getattr(_ext, "small_m_max", 0))


def extension_loaded() -> bool:
    """True if the compiled CUDA extension ``ostquant._C`` was imported."""
    return _ext is not None


def extension_error() -> Optional[str]:
    """Why the extension is not loaded (None if it is)."""
    return _ext_error


def cuda_ops() -> List[str]:
    """Names of ostquant ops that have a compiled CUDA kernel registered."""
    out = []
    for name in _library.SCHEMAS:
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"ostquant::{name}", "CUDA"):
            out.append(name)
    return out


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] (last dim even) into uint8, two per byte.

    Element ``2j`` goes to the low nibble of byte ``j``, ``2j+1`` to the high nibble.
    """
    return torch.ops.ostquant.pack_int4(q)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack uint8 [..., K/2] into int8 [..., K] (values in [-8, 7])."""
    return torch.ops.ostquant.unpack_int4(packed)


def quantize_per_token(x: torch.Tensor, bits: int = 4, sym: bool = False,
                       clip_ratio: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row (token) of ``x`` [..., K] over its last dim.

    Returns ``(q, scale, zero)``: int8 codes in ``[-2^(bits-1), 2^(bits-1)-1]`` with x's shape,
    and float32 ``scale``/``zero`` of shape ``x.shape[:-1]`` such that
    ``x ≈ scale·(q − zero)``. ``zero`` is all 0 when ``sym``. ``clip_ratio`` in (0, 1] shrinks
    the range before quantizing.
    """
    return torch.ops.ostquant.quantize_per_token(x, bits, sym, clip_ratio)


def quantize_per_channel(w: torch.Tensor, bits: int = 4, sym: bool = True,
                         clip_search: bool = False, max_shrink: float = 0.8, grid: int = 100,
                         norm: float = 2.4) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a weight [out, in] per output channel; same outputs as :func:`quantize_per_token`.

    With ``clip_search`` each row's range is shrunk by the ratio in
    ``{1 - i/grid : i ≤ max_shrink·grid}`` that minimizes ``Σ|w − Q(w)|^norm``.
    """
    return torch.ops.ostquant.quantize_per_channel(w, bits, sym, clip_search, max_shrink, grid,
                                                   norm)


def int4_gemm(x_packed: torch.Tensor, x_scale: torch.Tensor, x_zero: Optional[torch.Tensor],
              w_packed: torch.Tensor, w_scale: torch.Tensor, w_sum: Optional[torch.Tensor] = None,
              bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16
              ) -> torch.Tensor:
    """W4A4 GEMM ``y = dequant(x) · dequant(w)ᵀ (+ bias)``, epilogue fused.

    ``x_packed`` uint8 [M, K/2] (packed int4 codes) or int8 [M, K] (the codes one per byte, in
    [-8, 7]: what the Hopper kernel reads, see :func:`int4_gemm_takes_codes`; other paths pack
    them first), ``w_packed`` uint8 [N, K/2] (K a multiple of
    ``GEMM_K_ALIGN``), ``x_scale``/``x_zero`` float32 [M] (``x_zero`` None for symmetric
    activations), ``w_scale`` float32 [N] (weights symmetric), ``w_sum`` float32 [N] = Σ_k q_w
    (computed if None), ``bias`` [N]. Output [M, N] in ``out_dtype``.
    """
    return torch.ops.ostquant.int4_gemm(x_packed, x_scale, x_zero, w_packed, w_scale, w_sum,
                                        bias, out_dtype)


def int4_gemm_takes_codes(device: torch.device, M: int, N: int, K: int,
                          out_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether :func:`int4_gemm` of this shape on ``device`` runs a kernel that reads the
    activations as int8 codes ``[M, K]`` (the Hopper path) rather than packed.

    Callers that quantize the activations themselves can then ask the quantizer for int8 codes
    (``packed=False`` of :func:`hadamard_quantize_per_token` / :func:`rmsnorm_quantize_per_token`,
    or :func:`quantize_per_token`) and save the kernel's widening pass; either layout gives the
    same result on every path. False off CUDA or without the extension.
    """
    if M <= _SMALL_M_MAX:  # decode-size M: the small-M kernels read packed codes
        return False
    device = torch.device(device)
    if device.type != "cuda" or _ext is None or not hasattr(_ext, "int4_gemm_takes_codes"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return bool(_ext.int4_gemm_takes_codes(index, int(M), int(N), int(K),
                                           out_dtype == torch.float32))


def w4a16_gemm(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight-only int4 GEMM: ``x [M, K] @ (q_w·s_w)ᵀ + bias`` with x's dtype."""
    return torch.ops.ostquant.w4a16_gemm(x, w_packed, w_scale, bias)


def hadamard_transform(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale · x @ Hᵀ`` over the last dim n = K·2^k (see ``transforms.hadamard_matrices``).

    Pass ``scale = n ** -0.5`` for the orthonormal transform.
    """
    return torch.ops.ostquant.hadamard_transform(x, scale)


def quantize_kv(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 quantization of K or V [..., head_dim] per (token, head).

    Returns packed uint8 codes [..., head_dim/2] and float16 scale/zero [...].
    """
    return torch.ops.ostquant.quantize_kv(x)


def int4_kv_tensors(num: int, slots: int, num_kv_heads: int, head_dim: int,
                    device=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Storage for one side (K or V) of an int4 KV cache, in the layout the KV ops take.

    Returns codes uint8 ``[num, slots, Hkv, head_dim/2]`` (zeros, contiguous) and float16
    scale (ones) and zero (zeros) ``[num, slots, Hkv]``. ``num, slots`` are ``batch, max_len``
    for a contiguous cache and ``num_pages, page_size`` for a paged pool.

    The scale/zero tensors are *stored head-major* (``[num, Hkv, slots]`` in memory, viewed
    with the dims swapped): the CUDA attention reads the scales of 16 consecutive tokens of one
    head per step, and this layout makes them 32 contiguous bytes instead of 16 values ``Hkv``
    apart. The KV ops accept any dense layout of scale/zero (all four the same); this is the
    one the runtime uses.
    """
    op = "int4_kv_tensors"
    for name, n in (("num", num), ("slots", slots), ("num_kv_heads", num_kv_heads)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            _fail(op, f"{name} must be an integer >= 1, got {n!r}")
    _check_head_dim(op, head_dim)
    codes = torch.zeros(num, slots, num_kv_heads, head_dim // 2, dtype=torch.uint8,
                        device=device)
    scale = torch.ones(num, num_kv_heads, slots, dtype=torch.float16,
                       device=device).transpose(1, 2)
    zero = torch.zeros(num, num_kv_heads, slots, dtype=torch.float16,
                       device=device).transpose(1, 2)
    return codes, scale, zero


def kv_cache_append(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero,
                    cache_seqlens) -> None:
    """Quantize ``k``/``v`` [B, S, Hkv, D] and write them into the int4 cache in place.

    Cache layout (contiguous mode): codes uint8 [B, Smax, Hkv, D/2], scale/zero float16
    [B, Smax, Hkv]. Token ``s`` of sequence ``b`` goes to slot ``cache_seqlens[b] + s``;
    ``cache_seqlens`` itself is not modified. Raises if a sequence would overflow ``Smax``.
    """
    torch.ops.ostquant.kv_cache_append(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero,
                                       cache_seqlens)


def int4_kv_attention(q, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero, seqlens,
                      sm_scale: Optional[float] = None, causal: bool = True) -> torch.Tensor:
    """Attention of ``q`` [B, Sq, Hq, D] over an int4 KV cache (grouped-query aware).

    ``seqlens[b]`` cache tokens are valid; the queries are the last ``Sq`` of them.
    ``sm_scale`` defaults to ``D ** -0.5``.
    """
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    return torch.ops.ostquant.int4_kv_attention(q, k_cache, k_scale, k_zero, v_cache, v_scale,
                                                v_zero, seqlens, sm_scale, causal)


def kv_cache_append_fused(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero,
                          cache_seqlens, cos: Optional[torch.Tensor] = None,
                          sin: Optional[torch.Tensor] = None, k_hadamard: bool = False) -> None:
    """:func:`kv_cache_append` with RoPE and the online Hadamard applied to K first, in one pass.

    ``cos``/``sin`` [B, S, D] in k's dtype (transformers' rotate_half RoPE over all of
    head_dim; both None: no RoPE); ``k_hadamard``: the orthonormal Hadamard over head_dim
    (OSTQuant's online Hadamard on K). See ``reference.rope_hadamard_k`` for the exact rounding.
    """
    torch.ops.ostquant.kv_cache_append_fused(k, v, k_cache, k_scale, k_zero, v_cache, v_scale,
                                             v_zero, cache_seqlens, cos, sin, k_hadamard)


def paged_kv_cache_append(k, v, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero, block_table,
                          cache_seqlens, cos: Optional[torch.Tensor] = None,
                          sin: Optional[torch.Tensor] = None, k_hadamard: bool = False) -> None:
    """Quantize ``k``/``v`` [B, S, Hkv, D] into a paged int4 KV cache in place.

    Pools: codes uint8 [num_pages, P, Hkv, D/2], scale/zero float16 [num_pages, P, Hkv]
    (P a power of two >= 16); ``block_table`` int32 [B, max_pages]: token ``t`` of sequence
    ``b`` lives in page ``block_table[b, t // P]``, slot ``t % P``. Token ``s`` of the new ones
    goes to position ``cache_seqlens[b] + s`` (``cache_seqlens`` is not modified; the caller
    allocates pages). Optional fused RoPE / Hadamard on K as in :func:`kv_cache_append_fused`.
    """
    torch.ops.ostquant.paged_kv_cache_append(k, v, k_pool, k_scale, k_zero, v_pool, v_scale,
                                             v_zero, block_table, cache_seqlens, cos, sin,
                                             k_hadamard)


def paged_int4_kv_attention(q, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero, block_table,
                            seqlens, sm_scale: Optional[float] = None, causal: bool = True,
                            max_seqlen: int = -1) -> torch.Tensor:
    """:func:`int4_kv_attention` over a paged cache (layout as in :func:`paged_kv_cache_append`).

    ``max_seqlen`` (optional) is an upper bound of ``seqlens`` known on the host; the CUDA
    kernel uses it only to split the work (results are correct for any value).
    """
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    return torch.ops.ostquant.paged_int4_kv_attention(q, k_pool, k_scale, k_zero, v_pool,
                                                      v_scale, v_zero, block_table, seqlens,
                                                      sm_scale, causal, max_seqlen)


def quantize_per_token_packed(x: torch.Tensor, bits: int = 4, sym: bool = False,
                              clip_ratio: float = 1.0
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_per_token` with the codes packed two per byte, in one pass on CUDA.

    Returns ``(packed, scale, zero)``: uint8 ``[..., K/2]`` (low nibble first, ready for
    :func:`int4_gemm`) and float32 ``[...]``; exactly ``pack_int4`` of
    :func:`quantize_per_token`'s codes and its scale/zero. ``K`` even, ``bits`` in (2, 3, 4).
    """
    return torch.ops.ostquant.quantize_per_token_packed(x, bits, sym, clip_ratio)


def hadamard_quantize_per_token(x: torch.Tensor, scale: Optional[float] = None, bits: int = 4,
                                sym: bool = False, clip_ratio: float = 1.0, packed: bool = True
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online Hadamard transform fused with per-token quantization (one pass on CUDA).

    ``y = hadamard_transform(x, scale)`` over the last dim n = K·2^k (rounded to x's dtype), then
    :func:`quantize_per_token` of ``y`` with the codes packed two per byte. ``scale`` defaults to
    ``n ** -0.5`` (orthonormal, the down_proj input's online Hadamard). Returns
    ``(packed, scale, zero)``: uint8 ``[..., n/2]`` (low nibble first, ready for
    :func:`int4_gemm`) and float32 ``[...]``; with ``packed=False`` the codes come one per
    int8, ``[..., n]`` (what the Hopper GEMM reads, see :func:`int4_gemm_takes_codes`).
    ``bits`` in (2, 3, 4). See ``reference.hadamard_quantize_per_token`` for the exact rounding.
    """
    if scale is None:
        scale = x.shape[-1] ** -0.5
    return torch.ops.ostquant.hadamard_quantize_per_token(x, scale, bits, sym, clip_ratio,
                                                          packed)


def rmsnorm_quantize_per_token(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                               bits: int = 4, sym: bool = False, clip_ratio: float = 1.0,
                               packed: bool = True
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm fused with per-token quantization (one pass on CUDA).

    ``y = weight · x/sqrt(mean(x²) + eps)`` (normalised in float32, rounded to x's dtype;
    ``weight`` [K] in x's dtype, or None when it is folded into the next layer's weights), then
    :func:`quantize_per_token` of ``y`` with packed codes. Returns ``(packed, scale, zero)`` as
    :func:`hadamard_quantize_per_token` (int8 codes ``[..., K]`` with ``packed=False``). See
    ``reference.rms_norm`` for the exact rounding.
    """
    return torch.ops.ostquant.rmsnorm_quantize_per_token(x, weight, eps, bits, sym, clip_ratio,
                                                         packed)


def kv_check_errors() -> None:
    """Raise :class:`OpInputError` if a CUDA KV-cache kernel flagged bad lengths on the device.

    The CUDA KV kernels check capacity / lengths / pages on the GPU (no host sync per call):
    an overflowing append writes nothing for that sequence, attention with bad lengths returns
    NaN for it, and the next CUDA KV call raises. Call this after ``torch.cuda.synchronize()``
    to surface such an error at a point of your choosing. No-op without the extension.
    """
    if _ext is None or not hasattr(_ext, "kv_status"):
        return
    msg = _ext.kv_status()
    if msg:
        raise OpInputError(msg)


__all__ = [
    "GEMM_K_ALIGN", "KV_HEAD_DIMS", "KV_MIN_PAGE_SIZE", "OpInputError", "cuda_ops", "extension_loaded",
    "extension_error", "pack_int4", "unpack_int4", "quantize_per_token", "quantize_per_channel",
    "int4_gemm", "w4a16_gemm", "hadamard_transform", "quantize_kv", "int4_kv_tensors",
    "kv_cache_append",
    "int4_kv_attention", "kv_cache_append_fused", "paged_kv_cache_append",
    "paged_int4_kv_attention", "kv_check_errors", "quantize_per_token_packed",
    "hadamard_quantize_per_token", "rmsnorm_quantize_per_token",
]
