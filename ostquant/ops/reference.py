"""Pure-PyTorch reference kernels: the specification of every ostquant op.

These functions run on any device and are written to be read. CUDA kernels must reproduce
them (bit-exactly for quantized values and scales, to float rounding for GEMM/attention
outputs). The same math is used by the straight-through fake quantizers in
:mod:`ostquant.quant`, so calibration sees exactly the numbers the runtime produces.

Conventions (see ``docs/ops.md``):

* **int4 packing** — signed two's complement, two values per byte, element ``2j`` in the low
  nibble, element ``2j+1`` in the high nibble, packed along the last dimension.
* **Quantization** — ``x ≈ scale * (q - zero)`` with ``q`` signed in
  ``[-2^(b-1), 2^(b-1)-1]``. Symmetric: ``zero = 0``, ``scale = absmax·clip / (2^(b-1)-1)``.
  Asymmetric: the range ``[min(x,0), max(x,0)]·clip`` is mapped onto the ``2^b`` levels,
  ``scale = (hi-lo)/(2^b-1)``, ``zero = round(-lo/scale) - 2^(b-1)`` (an integer-valued
  float). ``q = clamp(round(x / scale) + zero)``, computed in float32 with true division and
  round-half-to-even. A group whose range is zero gets ``scale = 1``.
* **GEMM** — ``y[m,n] = sx[m]·sw[n]·(Σ_k qx[m,k]·qw[n,k] − zx[m]·Σ_k qw[n,k]) + bias[n]``
  with the integer sum exact and the epilogue in float32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import math

import torch

from .validate import fail

# ----------------------------------------------------------------------------------------
# int4 packing
# ----------------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] along the last dim (even length) into uint8 bytes."""
    q = q.to(torch.int16)
    lo = q[..., 0::2] & 0xF
    hi = q[..., 1::2] & 0xF
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [..., K/2] -> int8 [..., K] with values in [-8, 7].

    Byte ``b`` holds element ``2i`` in its low nibble and ``2i+1`` in its high nibble, both
    two's complement. Read as int8, the high nibble is ``b >> 4`` (arithmetic shift) and the
    low one ``((b & 15) ^ 8) - 8`` (sign extension of 4 bits); all int8 arithmetic, no
    widening: the CPU runtime unpacks every weight on every call, so this is its hot loop.
    """
    s = packed.contiguous().view(torch.int8)
    lo = ((s & 15) ^ 8) - 8
    hi = s >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ----------------------------------------------------------------------------------------
# Quantization math (shared with the fake quantizers)
# ----------------------------------------------------------------------------------------


def qrange(bits: int) -> Tuple[int, int]:
    """Signed integer range ``(qmin, qmax)`` of a ``bits``-bit quantizer."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def range_stats(x: torch.Tensor, sym: bool) -> Tuple[torch.Tensor, ...]:
    """Per-row range of ``x`` (keepdim, float32) that :func:`qparams_from_stats` needs:
    ``(absmax,)`` when ``sym``, else ``(max(x) clamped ≥ 0, min(x) clamped ≤ 0)``."""
    x = x.float()
    if sym:
        return (x.abs().amax(dim=-1, keepdim=True),)
    return (x.amax(dim=-1, keepdim=True).clamp(min=0), x.amin(dim=-1, keepdim=True).clamp(max=0))


def qparams_from_stats(stats: Tuple[torch.Tensor, ...], bits: int, sym: bool, clip_ratio=1.0
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from :func:`range_stats` and a clip ratio (float or tensor)."""
    qmin, qmax = qrange(bits)
    if sym:
        absmax = stats[0] * clip_ratio
        # Divide by a tensor, never by a Python number: CUDA evaluates ``tensor / scalar`` as
        # ``tensor * (1/scalar)``, which differs from true division in the last bit for about
        # half the inputs and would make the reference (and the codes) depend on the device.
        scale = absmax / torch.full_like(absmax, qmax)
        zero = torch.zeros_like(scale)
    else:
        hi = stats[0] * clip_ratio
        lo = stats[1] * clip_ratio
        scale = (hi - lo) / torch.full_like(hi, qmax - qmin)  # true division, as above
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(-lo / scale) + qmin
    # A zero range gets scale 1; NaN stays NaN so bad input is never turned into valid codes.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, zero


def compute_qparams(x: torch.Tensor, bits: int, sym: bool, clip_ratio=1.0
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``x`` (reduced over the last dim), float32, keepdim.

    ``clip_ratio`` is a float or a float32 tensor broadcastable to ``x.shape[:-1] + (1,)``.
    """
    return qparams_from_stats(range_stats(x, sym), bits, sym, clip_ratio)


def quantize_with(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
                  ) -> torch.Tensor:
    """Integer codes (as float32) of ``x`` for given ``scale``/``zero``."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(x.float() / scale) + zero, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero)`` in float32."""
    return (q.float() - zero) * scale


def quantize_per_token(x: torch.Tensor, bits: int, sym: bool, clip_ratio: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row quantization over the last dim.

    Returns ``q`` (int8, shape of x), ``scale`` and ``zero`` (float32, shape ``x.shape[:-1]``).
    """
    scale, zero = compute_qparams(x, bits, sym, clip_ratio)
    q = quantize_with(x, scale, zero, bits).to(torch.int8)
    return q, scale.squeeze(-1), zero.squeeze(-1)


def search_clip_ratio(w: torch.Tensor, bits: int, sym: bool, max_shrink: float = 0.8,
                      grid: int = 100, norm: float = 2.4) -> torch.Tensor:
    """Per-row clipping ratio minimising ``Σ|w - Q(w)|^norm`` over a grid.

    Tries ratios ``1 - i/grid`` for ``i = 0 .. int(max_shrink*grid)``; returns a float32 tensor
    of shape ``w.shape[:-1] + (1,)``. Ties keep the larger ratio (less clipping).
    """
    w = w.float()
    qmin, qmax = qrange(bits)
    stats = range_stats(w, sym)  # the row ranges do not depend on the ratio: compute once
    best_err = torch.full(w.shape[:-1] + (1,), float("inf"), device=w.device)
    best_ratio = torch.ones_like(best_err)
    buf = torch.empty_like(w)
    for i in range(int(max_shrink * grid) + 1):
        ratio = 1.0 - i / grid
        scale, zero = qparams_from_stats(stats, bits, sym, ratio)
        # |dequantize(quantize_with(w)) - w|^norm, in place (same operations, no temporaries)
        torch.div(w, scale, out=buf)
        buf.round_().add_(zero).clamp_(qmin, qmax)
        buf.sub_(zero).mul_(scale).sub_(w).abs_().pow_(norm)
        err = buf.sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def quantize_per_channel(w: torch.Tensor, bits: int, sym: bool, clip_search: bool,
                         max_shrink: float, grid: int, norm: float
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-output-channel (per-row) weight quantization, optionally with clipping search."""
    ratio = search_clip_ratio(w, bits, sym, max_shrink, grid, norm) if clip_search else 1.0
    return quantize_per_token(w, bits, sym, ratio)


# ----------------------------------------------------------------------------------------
# GEMMs
# ----------------------------------------------------------------------------------------


def _exact_int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for small-integer-valued tensors, exact.

    float32 is exact while |sum| < 2^24 (int4 products are ≤ 64, so K ≤ 2^18). On CUDA we use
    float64 so TF32 settings can never make the reference inexact.
    """
    dt = torch.float64 if a.is_cuda else torch.float32
    return a.to(dt) @ b.to(dt).T


def int4_gemm(x_packed, x_scale, x_zero, w_packed, w_scale, w_sum, bias, out_dtype):
    """W4A4 GEMM with the dequantization epilogue fused (see module docstring).

    ``x_packed``: packed uint8 ``[M, K/2]``, or the codes themselves as int8 ``[M, K]``.
    """
    qx = x_packed if x_packed.dtype == torch.int8 else unpack_int4(x_packed)
    qw = unpack_int4(w_packed)
    acc = _exact_int_matmul(qx, qw).float()
    if x_zero is not None:
        if w_sum is None:
            w_sum = qw.float().sum(dim=-1)
        acc = acc - x_zero.float()[:, None] * w_sum.float()[None, :]
    y = acc * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def w4a16_gemm(x, w_packed, w_scale, bias):
    """Weight-only int4 GEMM: ``x @ (qw * sw)ᵀ + bias`` computed in float32, output x.dtype."""
    w = unpack_int4(w_packed).float() * w_scale.float()[:, None]
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------
# Hadamard transform
# ----------------------------------------------------------------------------------------


def fwht_pow2(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester Walsh–Hadamard transform along the last dim (length 2^k)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    y = x
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(*lead, n)


def _hadamard(x: torch.Tensor, scale: float, ordered_k: bool) -> torch.Tensor:
    from ostquant.transforms.hadamard_matrices import hadamard_factor, hadamard_matrix

    n = x.shape[-1]
    K, m = hadamard_factor(n)
    y = x.float()
    if K > 1:
        y = y.reshape(*x.shape[:-1], K, m)
        y = fwht_pow2(y)
        hk = hadamard_matrix(K).to(device=x.device, dtype=torch.float32)
        if ordered_k:
            # out[..., i, :] = Σ_k H_K[i, k]·y[..., k, :] in float32, k = 0, 1, …, K−1 in turn,
            # starting from 0 (each term ±y is exact, so only the order of the sums matters).
            acc = torch.zeros_like(y)
            for k in range(K):
                acc = acc + hk[:, k, None] * y[..., k:k + 1, :]
            y = acc
        else:
            y = torch.matmul(hk, y)  # [K,K] @ [..., K, m]: mixes the K axis
        y = y.reshape(*x.shape[:-1], n)
    else:
        y = fwht_pow2(y)
    return (y * scale).to(x.dtype)


def hadamard_transform(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · x @ Hᵀ`` along the last dim, ``H = kron(H_K, H_{2^k})``, in float32."""
    return _hadamard(x, scale, ordered_k=False)


def hadamard_transform_ordered(x: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`hadamard_transform` with every rounding fixed, so a kernel can match it bit for bit.

    Same float32 steps — the Sylvester butterflies of :func:`fwht_pow2` over each length-2^k
    chunk, then the K×K stage, then ``· scale``, then rounding to x's dtype — except that the
    K×K stage sums ``H_K[i, k]·y_k`` in the order k = 0, 1, …, K−1 (what the CUDA
    ``hadamard_transform`` kernel does) instead of leaving the order to a BLAS matmul. For
    K = 1 (n a power of two) it *is* :func:`hadamard_transform`; for K > 1 the two can differ by
    float32 summation rounding before the final rounding to x's dtype.
    """
    return _hadamard(x, scale, ordered_k=True)


# ----------------------------------------------------------------------------------------
# Fused per-token quantization (packed int4 output): Hadamard + quant, RMSNorm + quant
# ----------------------------------------------------------------------------------------


def quantize_per_token_packed(x: torch.Tensor, bits: int, sym: bool, clip_ratio: float
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_per_token` with the codes packed two per byte (:func:`pack_int4`):
    uint8 ``[..., K/2]`` and float32 scale/zero ``[...]``, what :func:`int4_gemm` takes."""
    q, s, z = quantize_per_token(x, bits, sym, clip_ratio)
    return pack_int4(q), s, z


def hadamard_quantize_per_token(x: torch.Tensor, scale: float, bits: int, sym: bool,
                                clip_ratio: float, packed: bool = True
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online Hadamard then per-token quantization, codes packed two per byte.

    Exactly ``quantize_per_token(hadamard_transform_ordered(x, scale))`` with the codes packed
    by :func:`pack_int4`: the transform's result is rounded to x's dtype first, as the unfused
    ``hadamard_transform`` → ``quantize_per_token`` sequence does. Returns uint8
    ``[..., n/2]`` (int8 codes ``[..., n]`` if not ``packed``) and float32 scale/zero ``[...]``.
    """
    q, s, z = quantize_per_token(hadamard_transform_ordered(x, scale), bits, sym, clip_ratio)
    return (pack_int4(q) if packed else q), s, z


def sqrt_rn(a: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root of a float32 tensor (IEEE ``sqrtf``, CUDA's ``__fsqrt_rn``).

    ``torch.sqrt`` on float32 CPU tensors is not correctly rounded in every build (torch
    2.14.1 on an AMD EPYC: 16% of random inputs come out one unit off), so: the float64 root
    rounded to float32, then moved by one unit where the exact test says so — the float32
    result ``s`` is right iff ``a`` lies between the squares of the midpoints to its
    neighbours (25-bit midpoints: their squares are exact in float64; no input is ever on a
    midpoint).
    """
    s = torch.sqrt(a.double()).float()
    up = torch.nextafter(s, torch.full_like(s, math.inf))
    down = torch.nextafter(s, torch.zeros_like(s))
    ad, sd = a.double(), s.double()
    hi = (sd + up.double()) * 0.5
    lo = (sd + down.double()) * 0.5
    return torch.where(ad > hi * hi, up, torch.where(ad < lo * lo, down, s))


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """RMSNorm with every rounding fixed (the normalisation the fused kernel computes).

    transformers' ``LlamaRMSNorm``: ``weight · (x / sqrt(mean(x²) + eps))`` normalised in
    float32 and rounded to x's dtype, then multiplied by ``weight`` (x's dtype) in x's dtype.
    The mean of squares is accumulated in **float64** (the squares are exact there, so the sum
    hardly depends on its order) and rounded once to float32; ``1/sqrt`` is a correctly
    rounded float32 square root (:func:`sqrt_rn`, the kernel's ``__fsqrt_rn``) and an IEEE
    division. Against the float32 ``pow(2).mean()`` of the transformers module the mean square
    can differ in its last bit, which moves an output value by one unit of x's dtype now and
    then.
    """
    xf = x.float()
    ss = xf.double().square().sum(dim=-1, keepdim=True)
    var = (ss / torch.full_like(ss, x.shape[-1])).float()  # true division, rounded once
    inv = torch.ones_like(var) / sqrt_rn(var + torch.full_like(var, eps))
    y = (xf * inv).to(x.dtype)
    if weight is not None:
        y = weight * y
    return y


def rmsnorm_quantize_per_token(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                               bits: int, sym: bool, clip_ratio: float, packed: bool = True
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_per_token(rms_norm(x, weight, eps))`` with the codes packed two per byte
    (int8 codes ``[..., K]`` if not ``packed``).

    The normalised (and weighted) activations are rounded to x's dtype before they are
    quantized, as the unfused RMSNorm → ``quantize_per_token`` sequence does.
    """
    q, s, z = quantize_per_token(rms_norm(x, weight, eps), bits, sym, clip_ratio)
    return (pack_int4(q) if packed else q), s, z


# ----------------------------------------------------------------------------------------
# int4 KV cache
# ----------------------------------------------------------------------------------------

KV_BITS = 4


def quantize_kv(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per (token, head) over head_dim; fp16 scale/zero; packed codes.

    The scale is rounded to fp16 *before* the codes are computed, so dequantizing with the
    stored fp16 scale reproduces exactly what the codes were computed against.
    """
    stats = range_stats(x, sym=False)  # (max clamped >= 0, min clamped <= 0)
    scale, _ = qparams_from_stats(stats, KV_BITS, sym=False)
    scale = scale.clamp(max=torch.finfo(torch.float16).max).half().float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # fp16 underflow
    # The zero point is computed for the rounded scale, to keep the range centred.
    zero = torch.round(-stats[1] / scale) + qrange(KV_BITS)[0]
    zero = zero.clamp(*qrange(KV_BITS))
    q = quantize_with(x, scale, zero, KV_BITS).to(torch.int8)
    return pack_int4(q), scale.squeeze(-1).half(), zero.squeeze(-1).half()


def dequantize_kv(packed, scale, zero) -> torch.Tensor:
    """float32 values of an int4 KV cache slice: ``scale·(q − zero)``."""
    return dequantize(unpack_int4(packed), scale.float()[..., None], zero.float()[..., None])


def kv_cache_append(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero, cache_seqlens):
    """Quantize ``k``/``v`` [B,S,Hkv,D] and write them at ``cache_seqlens[b] + s`` (in place)."""
    B, S = k.shape[:2]
    smax = k_cache.shape[1]
    lens = cache_seqlens.to(torch.long).cpu()
    if bool((lens + S > smax).any()):
        b = int(torch.nonzero(lens + S > smax)[0])
        fail("kv_cache_append", f"cache full: sequence {b} holds {int(lens[b])} tokens, "
             f"appending {S} exceeds capacity {smax}")
    kq, ks, kz = quantize_kv(k)
    vq, vs, vz = quantize_kv(v)
    for b in range(B):
        sl = slice(int(lens[b]), int(lens[b]) + S)
        k_cache[b, sl] = kq[b]
        k_scale[b, sl] = ks[b]
        k_zero[b, sl] = kz[b]
        v_cache[b, sl] = vq[b]
        v_scale[b, sl] = vs[b]
        v_zero[b, sl] = vz[b]


def int4_kv_attention(q, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero, seqlens,
                      sm_scale: float, causal: bool) -> torch.Tensor:
    """Attention of ``q`` [B,Sq,Hq,D] over an int4 cache [B,Smax,Hkv,D/2] (GQA: Hq % Hkv == 0).

    Sequence ``b`` has ``seqlens[b]`` valid cache tokens; query ``i`` sits at position
    ``seqlens[b] - Sq + i``. With ``causal``, it attends to keys at positions ≤ its own;
    otherwise to all valid keys. Computed in float32; output has q's dtype.
    """
    B, Sq, Hq, D = q.shape
    smax, hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // hkv
    k = dequantize_kv(k_cache, k_scale, k_zero)  # [B, Smax, Hkv, D]
    v = dequantize_kv(v_cache, v_scale, v_zero)
    k = k.repeat_interleave(group, dim=2).transpose(1, 2)  # [B, Hq, Smax, D]
    v = v.repeat_interleave(group, dim=2).transpose(1, 2)
    qf = q.float().transpose(1, 2)  # [B, Hq, Sq, D]
    scores = (qf @ k.transpose(-1, -2)) * sm_scale  # [B, Hq, Sq, Smax]
    lens = seqlens.to(device=q.device, dtype=torch.long)
    kpos = torch.arange(smax, device=q.device)
    valid = kpos[None, :] < lens[:, None]  # [B, Smax]
    mask = valid[:, None, :].expand(B, Sq, smax)
    if causal:
        qpos = lens[:, None] - Sq + torch.arange(Sq, device=q.device)[None, :]  # [B, Sq]
        mask = mask & (kpos[None, None, :] <= qpos[:, :, None])
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = probs @ v  # [B, Hq, Sq, D]
    return out.transpose(1, 2).contiguous().to(q.dtype)


# ----------------------------------------------------------------------------------------
# Fused K pre-processing (RoPE + online Hadamard) and the paged int4 KV cache
# ----------------------------------------------------------------------------------------


def rope_hadamard_k(k: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                    k_hadamard: bool) -> torch.Tensor:
    """What the fused append does to K before quantizing, in K's dtype.

    RoPE as in transformers' ``apply_rotary_pos_emb`` (rotate_half style, all head_dim
    channels): ``k·cos + rotate_half(k)·sin`` with ``cos``/``sin`` [B, S, D] in k's dtype,
    every product and the sum rounded to that dtype. Then, if ``k_hadamard``, the orthonormal
    Sylvester Hadamard transform over head_dim (``hadamard_transform(k, D^-½)``, float32 inside,
    result rounded to k's dtype) — OSTQuant's online Hadamard on K (its twin on Q is applied by
    the caller).
    """
    if cos is not None:
        half = k.shape[-1] // 2
        rot = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
        k = k * cos[:, :, None, :] + rot * sin[:, :, None, :]
    if k_hadamard:
        k = hadamard_transform(k, k.shape[-1] ** -0.5)
    return k


def kv_cache_append_fused(k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero,
                          cache_seqlens, cos, sin, k_hadamard):
    """:func:`kv_cache_append` of ``rope_hadamard_k(k, cos, sin, k_hadamard)`` and ``v``."""
    kv_cache_append(rope_hadamard_k(k, cos, sin, k_hadamard), v, k_cache, k_scale, k_zero,
                    v_cache, v_scale, v_zero, cache_seqlens)


# Paged layout (docs/ops.md, "Paged int4 KV cache"): one pool per tensor,
#   codes uint8 [num_pages, P, Hkv, D/2], scale/zero float16 [num_pages, P, Hkv],
# and a block table int32 [B, max_pages]: token t of sequence b lives in pool page
# block_table[b, t // P], slot t % P. P is a power of two >= 16. Entries of pages a sequence
# does not use yet are ignored (any value, e.g. -1).


def _paged_rows(op, block_table, b, positions, page_size, num_pages):
    """(pages, slots) of ``positions`` of sequence ``b``; raises if a page is not allocated."""
    pages = block_table[b].to(torch.long)[positions // page_size]
    bad = (pages < 0) | (pages >= num_pages)
    if bool(bad.any()):
        t = int(positions[bad][0])
        fail(op, f"page not allocated: sequence {b}, token {t} maps to block_table[{b}, "
             f"{t // page_size}] = {int(pages[bad][0])}, not a page of the pool "
             f"(0..{num_pages - 1})")
    return pages, positions % page_size


def paged_kv_cache_append(k, v, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero, block_table,
                          cache_seqlens, cos=None, sin=None, k_hadamard=False):
    """Paged :func:`kv_cache_append_fused`: token ``s`` of sequence ``b`` goes to position
    ``cache_seqlens[b] + s``, i.e. page ``block_table[b, pos // P]``, slot ``pos % P``."""
    op = "paged_kv_cache_append"
    B, S = k.shape[:2]
    num_pages, P = k_pool.shape[:2]
    capacity = block_table.shape[1] * P
    lens = cache_seqlens.to(torch.long).cpu()
    table = block_table.cpu()
    if bool((lens + S > capacity).any()):
        b = int(torch.nonzero(lens + S > capacity)[0])
        fail(op, f"cache full: sequence {b} holds {int(lens[b])} tokens, appending {S} exceeds "
             f"its block table's capacity {capacity} ({block_table.shape[1]} pages of {P})")
    if bool((lens < 0).any()):
        fail(op, f"cache_seqlens must be >= 0, got {lens.tolist()}")
    rows = [_paged_rows(op, table, b, torch.arange(int(lens[b]), int(lens[b]) + S), P,
                        num_pages) for b in range(B)]
    kq, ks, kz = quantize_kv(rope_hadamard_k(k, cos, sin, k_hadamard))
    vq, vs, vz = quantize_kv(v)
    for b, (pages, slots) in enumerate(rows):
        pages, slots = pages.to(k_pool.device), slots.to(k_pool.device)
        k_pool[pages, slots] = kq[b]
        k_scale[pages, slots] = ks[b]
        k_zero[pages, slots] = kz[b]
        v_pool[pages, slots] = vq[b]
        v_scale[pages, slots] = vs[b]
        v_zero[pages, slots] = vz[b]


def paged_kv_gather(pool, scale, zero, block_table, n_tokens: int):
    """Contiguous copy ``[B, n_tokens, Hkv, ...]`` of the first ``n_tokens`` positions of every
    sequence of a paged cache (positions whose page is not allocated read page 0)."""
    num_pages, P = pool.shape[:2]
    t = torch.arange(n_tokens, device=pool.device)
    pages = block_table.to(device=pool.device, dtype=torch.long)[:, t // P]  # [B, n]
    pages = pages.clamp(0, num_pages - 1)
    slots = (t % P)[None, :].expand_as(pages)
    return pool[pages, slots], scale[pages, slots], zero[pages, slots]


def paged_int4_kv_attention(q, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero, block_table,
                            seqlens, sm_scale: float, causal: bool, max_seqlen: int = -1
                            ) -> torch.Tensor:
    """:func:`int4_kv_attention` over a paged cache (``max_seqlen`` is only a hint for the
    CUDA kernel's work split and is ignored here)."""
    op = "paged_int4_kv_attention"
    B, Sq = q.shape[:2]
    num_pages, P = k_pool.shape[:2]
    capacity = block_table.shape[1] * P
    lens = seqlens.to(torch.long).cpu()
    if bool((lens < Sq).any()) or bool((lens > capacity).any()):
        fail(op, f"seqlens must lie in [Sq={Sq}, capacity={capacity}] (queries are the last Sq "
             f"cached tokens; capacity = max_pages * page size), got {lens.tolist()}")
    table = block_table.cpu()
    for b in range(B):
        _paged_rows(op, table, b, torch.arange(int(lens[b])), P, num_pages)
    n = int(lens.max())
    kc, ks, kz = paged_kv_gather(k_pool, k_scale, k_zero, block_table, n)
    vc, vs, vz = paged_kv_gather(v_pool, v_scale, v_zero, block_table, n)
    return int4_kv_attention(q, kc, ks, kz, vc, vs, vz, seqlens, sm_scale, causal)
