"""Straight-through fake quantizers (quantize → dequantize).

Forward values equal ``scale·(q − zero)`` from the reference ops bit for bit (in float32, then
cast back to the input dtype). Two backward passes (:data:`GRAD_MODES`):

``"ste"``
    the plain straight-through estimator: identity gradient, as if quantization were not
    there (SpinQuant's choice). The quantization error is treated as fixed noise, so the
    gradient cannot see that making one channel larger coarsens the step of every value it
    shares a scale with.
``"range"``
    range-aware (LSQ/OmniQuant-style): the gradient of ``scale·(clamp(round(x/scale) + z) −
    z)`` with the rounding passed straight through but the scale computed from the row's
    range *differentiably*, and zero gradient for clipped values. The extra term
    ``(Q(x) − x)/scale · ∂scale/∂x`` flows into the row's extreme values, so a transform that
    inflates an outlier pays for the coarser step it causes. Needed for learned *scalings*:
    with plain STE, the measured loss rises steeply along the negative gradient of the norm
    scalings (see the README's "Calibration choices").

Choose with the ``grad=`` argument or, for a whole forward pass, :func:`quant_grad`.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ostquant.ops import reference as ref

#: backward modes of the fake quantizers
GRAD_MODES = ("ste", "range")
_grad_mode = "ste"


@contextlib.contextmanager
def quant_grad(mode: str):
    """Use backward ``mode`` (one of :data:`GRAD_MODES`) for fake quantizers called without an
    explicit ``grad=`` inside the ``with`` block (the forward pass builds the graph, so the
    backward need not be inside it)."""
    global _grad_mode
    if mode not in GRAD_MODES:
        raise ValueError(f"quant grad mode must be one of {GRAD_MODES}, got {mode!r}")
    old, _grad_mode = _grad_mode, mode
    try:
        yield
    finally:
        _grad_mode = old


def current_quant_grad() -> str:
    """The backward mode fake quantizers use when called without ``grad=``."""
    return _grad_mode


def _mode(grad: Optional[str]) -> str:
    g = _grad_mode if grad is None else grad
    if g not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {g!r}")
    return g


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    return x + (xq - x).detach()


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def _range_aware(x: torch.Tensor, xq: torch.Tensor, bits: int, sym: bool, clip_ratio
                 ) -> torch.Tensor:
    """``xq`` (exact forward values) with the gradient of the range-aware surrogate."""
    xf = x.float()
    qmin, qmax = ref.qrange(bits)
    scale, zero = ref.qparams_from_stats(ref.range_stats(xf, sym), bits, sym, clip_ratio)
    zero = zero.detach()
    f = (torch.clamp(_round_ste(xf / scale) + zero, qmin, qmax) - zero) * scale
    return (xq.float().detach() + (f - f.detach())).to(x.dtype)


def _finish(x, xq, bits, sym, clip_ratio, ste, grad):
    mode = _mode(grad)
    if not ste or not (x.requires_grad and torch.is_grad_enabled()):
        return xq  # no gradient path needed: the exact quantized values
    if mode == "range":
        return _range_aware(x, xq, bits, sym, clip_ratio)
    return _ste(x, xq)


def fake_quant(x: torch.Tensor, bits: int, sym: bool = False, clip_ratio=1.0,
               ste: bool = True, grad: Optional[str] = None) -> torch.Tensor:
    """Fake-quantize each row of ``x`` over its last dim (per token / per channel).

    Same math as :func:`ostquant.ops.quantize_per_token`. ``bits >= 16`` returns ``x``.
    ``ste=False`` returns the quantized values without a gradient path; ``grad`` picks the
    backward (:data:`GRAD_MODES`; default: the :func:`quant_grad` mode, ``"ste"``).
    """
    if bits >= 16:
        return x
    with torch.no_grad():
        scale, zero = ref.compute_qparams(x, bits, sym, clip_ratio)
        xq = ref.dequantize(ref.quantize_with(x, scale, zero, bits), scale, zero).to(x.dtype)
    return _finish(x, xq, bits, sym, clip_ratio, ste, grad)


def fake_quant_weight(w: torch.Tensor, bits: int, sym: bool = True, clip_search: bool = True,
                      ste: bool = True, grad: Optional[str] = None) -> torch.Tensor:
    """Fake-quantize a weight [out, in] per output channel, with optional clipping search.

    Same math as :func:`ostquant.ops.quantize_per_channel`.
    """
    if bits >= 16:
        return w
    with torch.no_grad():
        ratio = ref.search_clip_ratio(w, bits, sym) if clip_search else 1.0
    return fake_quant(w, bits, sym, ratio, ste, grad)


def fake_quant_kv(x: torch.Tensor, bits: int, sym: bool = False, clip_ratio: float = 1.0,
                  ste: bool = True, grad: Optional[str] = None) -> torch.Tensor:
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
        # (the range-aware backward uses the float32 scale: the fp16 rounding is forward-only)
        return _finish(x, xq, bits, sym, clip_ratio, ste, grad)
    return fake_quant(x, bits, sym, clip_ratio, ste, grad)
