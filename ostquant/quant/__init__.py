"""Quantization configs and straight-through fake quantizers.

The fake quantizers call the same math as the reference kernels
(:mod:`ostquant.ops.reference`), so what calibration optimises is exactly what the runtime
computes.
"""
from .config import PRESETS, QuantConfig, get_preset
from .fake import fake_quant, fake_quant_kv, fake_quant_weight

__all__ = ["PRESETS", "QuantConfig", "get_preset", "fake_quant", "fake_quant_kv",
           "fake_quant_weight"]
