"""Baselines to compare OSTQuant against (RTN now; QuaRot-style Hadamard later)."""
from .rtn import apply_rtn, quantize_decoder_linears

__all__ = ["apply_rtn", "quantize_decoder_linears"]
