"""Model loading, per-family adapters and the attention hook (KV fake quantization).

The quantized model that runs on the int4 kernels is :class:`ostquant.runtime.QuantizedCausalLM`,
also reachable as ``ostquant.models.QuantizedCausalLM``.
"""
from .adapters import (ModelAdapter, RopeInfo, UnsupportedModelError, get_adapter,
                       register_adapter, supported_model_types)
from .attention import (AttentionHookConfig, disable_kv_fake_quant, enable_kv_fake_quant,
                        get_attention_hook, install_attention_hook, remove_attention_hook)
from .loading import ModelLoadError, load_model, model_display_name, resolve_device

__all__ = [
    "ModelAdapter", "RopeInfo", "UnsupportedModelError", "get_adapter", "register_adapter",
    "supported_model_types", "AttentionHookConfig", "enable_kv_fake_quant",
    "disable_kv_fake_quant", "get_attention_hook", "install_attention_hook",
    "remove_attention_hook", "ModelLoadError", "load_model", "model_display_name",
    "resolve_device",
]


def __getattr__(name):
    # lazy: ostquant.runtime imports this package (the adapters)
    if name == "QuantizedCausalLM":
        from ostquant.runtime import QuantizedCausalLM
        return QuantizedCausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
