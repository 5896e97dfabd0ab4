"""Attention hook: transform Q/K/V inside a transformers model's attention, without patching it.

transformers (5.x) looks the attention kernel up by name in a registry
(``transformers.AttentionInterface``) and calls it as
``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kw)`` with
``query`` ``[B, Hq, S, D]`` and ``key``/``value`` ``[B, Hkv, S, D]`` *after* RoPE and *before*
the GQA ``repeat_kv``. We register our own entry, ``ostquant_<base>`` (base = the kernel the
model used before: ``sdpa``, ``eager``, ...), which reads the :class:`AttentionHookConfig`
stored on the attention module as ``module.ostquant_hook``, applies it, and calls the base
kernel. The matching mask function is registered under the same name so masks are built
exactly as for the base kernel. Switching is done with the public
``model.set_attn_implementation``.

What the hook does, in order:

1. ``q_k_hadamard``: rotate Q and K by the same orthonormal Hadamard matrix along head_dim
   (``q·kᵀ`` is unchanged; it spreads outliers before K is quantized; OSTQuant's R_qk). In
   float64, or when Q/K need a gradient (calibration), a differentiable dtype-preserving
   transform (:func:`ostquant.transforms.womi.hadamard_rotate`) is used,
2. ``kv_bits < 16``: fake-quantize K and V per token per head (groups of head_dim,
   asymmetric by default) with :func:`ostquant.quant.fake_quant_kv` — the same numbers as the
   runtime int4 KV cache, straight-through gradient,
3. ``observer(module, query, key, value)``: an optional callback (statistics, tests).

With a KV cache the hook sees the whole cache (past + new tokens) at every step, so cached
tokens are re-quantized: the cache itself holds float K/V. This is a faithful simulation for
perplexity (no cache) and close for generation (tokens are quantized independently).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .adapters import get_adapter

HOOK_ATTR = "ostquant_hook"
_PREFIX = "ostquant_"
_BASE_ATTR = "_ostquant_base_attn"


@dataclass
class AttentionHookConfig:
    """What the ostquant attention hook does to Q/K/V of one attention module."""

    kv_bits: int = 16
    kv_sym: bool = False
    kv_clip_ratio: float = 1.0
    q_k_hadamard: bool = False
    observer: Optional[Callable] = None

    @property
    def active(self) -> bool:
        return self.kv_bits < 16 or self.q_k_hadamard or self.observer is not None


def _hadamard_head_dim(x: torch.Tensor) -> torch.Tensor:
    # float64 (exactness tests) and tensors that need a gradient (calibration) go through the
    # differentiable, dtype-preserving transform; inference uses the op (CUDA kernel if built).
    if x.dtype == torch.float64 or (x.requires_grad and torch.is_grad_enabled()):
        from ostquant.transforms.womi import hadamard_rotate

        return hadamard_rotate(x)
    from ostquant import ops

    return ops.hadamard_transform(x, x.shape[-1] ** -0.5).to(x.dtype)


def apply_hook(cfg: AttentionHookConfig, module, query, key, value):
    """Apply ``cfg`` to (query, key, value); returns the transformed triple."""
    if cfg.q_k_hadamard:
        query = _hadamard_head_dim(query)
        key = _hadamard_head_dim(key)
    if cfg.kv_bits < 16:
        from ostquant.quant import fake_quant_kv

        key = fake_quant_kv(key, cfg.kv_bits, cfg.kv_sym, cfg.kv_clip_ratio)
        value = fake_quant_kv(value, cfg.kv_bits, cfg.kv_sym, cfg.kv_clip_ratio)
    if cfg.observer is not None:
        cfg.observer(module, query, key, value)
    return query, key, value


def _base_kernel(base: str, module: nn.Module) -> Callable:
    if base == "eager":
        # Every transformers model file defines its own eager kernel; use the module's.
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in "
                               f"{type(module).__module__}")
        return fn
    from transformers import AttentionInterface

    return AttentionInterface()[base]


def _make_attention_fn(base: str) -> Callable:
    def ostquant_attention(module, query, key, value, attention_mask, **kwargs):
        cfg = getattr(module, HOOK_ATTR, None)
        if cfg is not None and cfg.active:
            query, key, value = apply_hook(cfg, module, query, key, value)
        return _base_kernel(base, module)(module, query, key, value, attention_mask, **kwargs)

    ostquant_attention.__name__ = f"ostquant_{base.replace('|', '_')}_attention"
    return ostquant_attention


def _register(base: str) -> str:
    """Register ``ostquant_<base>`` (attention + mask functions) once; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = _PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention_fn(base))
    masks = AttentionMaskInterface._global_mapping
    if name not in masks and base in masks:
        AttentionMaskInterface.register(name, masks[base])
    return name


def _current_impl(model: nn.Module) -> str:
    return getattr(model.config, "_attn_implementation", None) or "sdpa"


def attention_modules(model: nn.Module):
    """The attention module of every decoder layer (via the model's adapter)."""
    adapter = get_adapter(model)
    return [adapter.attn(layer) for layer in adapter.layers(model)]


def install_attention_hook(model: nn.Module, config: AttentionHookConfig) -> nn.Module:
    """Route ``model``'s attention through the ostquant hook with ``config`` on every layer.

    Each layer gets its own copy of ``config`` (``module.ostquant_hook``), so callers may
    later change single layers. Returns the model.
    """
    impl = _current_impl(model)
    base = impl[len(_PREFIX):] if impl.startswith(_PREFIX) else impl
    name = _register(base)
    for attn in attention_modules(model):
        setattr(attn, HOOK_ATTR, dataclasses.replace(config))
    if impl != name:
        setattr(model, _BASE_ATTR, base)
        model.set_attn_implementation(name)
    return model


def remove_attention_hook(model: nn.Module) -> nn.Module:
    """Undo :func:`install_attention_hook`: plain attention kernel, no hook configs."""
    for attn in attention_modules(model):
        if hasattr(attn, HOOK_ATTR):
            delattr(attn, HOOK_ATTR)
    impl = _current_impl(model)
    if impl.startswith(_PREFIX):
        base = getattr(model, _BASE_ATTR, impl[len(_PREFIX):])
        model.set_attn_implementation(base)
    return model


def get_attention_hook(model: nn.Module) -> Optional[AttentionHookConfig]:
    """The hook config of the first layer (None if no hook is installed)."""
    mods = attention_modules(model)
    return getattr(mods[0], HOOK_ATTR, None) if mods else None


def enable_kv_fake_quant(model: nn.Module, kvbits: int, sym: bool = False,
                         clip_ratio: float = 1.0) -> nn.Module:
    """Fake-quantize the KV cache: K (after RoPE) and V per token per head to ``kvbits``.

    Keeps any other hook setting already installed (e.g. ``q_k_hadamard``). ``kvbits >= 16``
    turns KV quantization off. Returns the model.
    """
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    current = get_attention_hook(model) or AttentionHookConfig()
    cfg = dataclasses.replace(current, kv_bits=int(kvbits), kv_sym=bool(sym),
                              kv_clip_ratio=float(clip_ratio))
    return install_attention_hook(model, cfg)


def disable_kv_fake_quant(model: nn.Module) -> nn.Module:
    """Turn KV fake quantization off (removes the hook entirely if nothing else uses it)."""
    current = get_attention_hook(model)
    if current is None:
        return model
    cfg = dataclasses.replace(current, kv_bits=16)
    if cfg.active:
        return install_attention_hook(model, cfg)
    return remove_attention_hook(model)
