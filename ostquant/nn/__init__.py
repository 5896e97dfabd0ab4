"""Runtime modules: :class:`QuantLinear` (int4 weights, optional 4-bit activations)."""
from .quant_linear import QuantLinear, default_filter, replace_linear
from .serialization import load_quantized_state, save_quantized_state

__all__ = ["QuantLinear", "default_filter", "replace_linear", "save_quantized_state",
           "load_quantized_state"]
