"""Straight-through fake quantizers (quantize → dequantize, identity gradient).

Forward values equal ``scale·(q − zero)`` from the reference ops bit for bit (in float32, then
cast back to the input dtype); the backward pass is the straight-through estimator.
"""
from __future__ import annotations

import torch

from ostquant.ops import reference as ref


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    return x + (xq - x).detach()


def fake_quant(x: torch.Tensor, bits: int, sym: bool = False, clip_ratio=1.0,
               ste: bool = True) -> torch.Tensor:
    """Fake-quantize each row of ``x`` over its last dim (per token / per channel).

    Same math as :func:`ostquant.ops.quantize_per_token`. ``bits >= 16`` returns ``x``.
    """
    if bits >= 16:
        return x
    with torch.no_grad():
        scale, zero = ref.compute_qparams(x, bits, sym, clip_ratio)
        xq = ref.dequantize(ref.quantize_with(x, scale, zero, bits), scale, zero).to(x.dtype)
    return _ste(x, xq) if ste else xq


def fake_quant_weight(w: torch.Tensor, bits: int, sym: bool = True, clip_search: bool = True,
                      ste: bool = True) -> torch.Tensor:
    """Fake-quantize a weight [out, in] per output channel, with optional clipping search.

    Same math as :func:`ostquant.ops.quantize_per_channel`.
    """
    if bits >= 16:
        return w
    with torch.no_grad():
        ratio = ref.search_clip_ratio(w, bits, sym) if clip_search else 1.0
    return fake_quant(w, bits, sym, ratio, ste)


def fake_quant_kv(x: torch.Tensor, bits: int, sym: bool = False, clip_ratio: float = 1.0,
                  ste: bool = True) -> torch.Tensor:
    """Fake-quantize K or V per token per head (the last dim must be head_dim).

    For the runtime's int4 asymmetric cache (``bits == 4``, ``sym=False``, no clipping) this is
    bit-identical to :func:`ostquant.ops.quantize_kv` followed by dequantization, including the
    rounding of the scale to float16.
    """
    if bits >= 16:
        return x
    if bits == 4 and not sym and clip_ratio == 1.0:
        with torch.no_grad():
            q, s, z = ref.quantize_kv(x)
            xq = ref.dequantize_kv(q, s, z).to(x.dtype)
        return _ste(x, xq) if ste else xq
    return fake_quant(x, bits, sym, clip_ratio, ste)
