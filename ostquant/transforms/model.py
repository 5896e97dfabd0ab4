"""Training-time form of the equivalent transformation pairs: the model computes, on every
forward, with weights derived from (its prepared float weights, the current
:class:`~.pairs.OSTParams`), so gradients flow into the params, and with the fake quantizers
the runtime uses.

:func:`apply_training_transforms` swaps, in place:

* each of the seven decoder projections for a :class:`TransformedLinear`: ``W', b'`` from
  :func:`~.fuse.transform_linear` (the same function the fused form uses), then the online
  Hadamard of down_proj (``x ← had(x)``, ``W' ← had(W')``), per-token activation fake
  quantization of the input and per-output-channel weight fake quantization;
* both RMSNorms of each layer for a :class:`TransformedRMSNorm` with weight ``1/s``;
* the embedding and ``lm_head`` for :class:`RotatedEmbedding` / :class:`RotatedHead`, which
  rotate the activations (``E[ids]·R`` and ``x·Rᵀ`` before the head) instead of the
  vocabulary-sized tables — the same function, much cheaper; neither is quantized;
* the attention hook (:mod:`ostquant.models.attention`): Q/K online Hadamard after RoPE
  (``qk_hadamard``) and K/V fake quantization. V is the v_proj output, i.e. already
  transformed by R_ov/S_ov; K is quantized after RoPE and the Hadamard.

Precision: transforms are computed in ``compute_dtype`` (float32 for training, float64 for
exactness tests) and cast to the model's dtype. With quantization off and exact arithmetic
the model is the original one (the tests see ~1e-15 relative error in float64).

The original modules are kept inside the wrappers (``.base``, frozen), so
:func:`remove_training_transforms` restores a plain (prepared) model, and
:func:`~.fuse.fuse_transforms` accepts a model in either state.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ostquant.quant import QuantConfig
from ostquant.quant.fake import fake_quant, fake_quant_weight

from .fuse import (ROLES, _check_params, norm_weight, prepare_model, transform_linear)
from .pairs import OSTParams
from .womi import hadamard_rotate

WEIGHT_CLIP_MODES = ("search", "cached", "none")
_HOOK_BACKUP_ATTR = "_ostquant_hook_before_training"


class _ParamsRef:
    """Holds the params without registering them as a submodule of every wrapper."""

    def __init__(self, params: OSTParams):
        self.params = params


class TransformedLinear(nn.Module):
    """A decoder projection computing with transformed, fake-quantized weights.

    Args:
        base: the prepared ``nn.Linear`` (kept frozen as ``.base``).
        params, layer, role: where the transform comes from (:func:`~.fuse.transform_linear`).
        quant: fake-quantization settings (``wbits``/``abits``; KV is the hook's business).
        online_hadamard: rotate the input by ``had`` (and the weight's rows), like
            ``QuantLinear(online_hadamard=True)``.
        compute_dtype: dtype of the transform math.
        weight_clip: ``"search"`` (clipping-ratio search on every forward: the runtime's exact
            quantizer), ``"cached"`` (searched on the first forward, reused until
            :meth:`reset_clip`), ``"none"`` (no clipping). Ignored when
            ``quant.w_clip_search`` is False (then no clipping).
    """

    def __init__(self, base: nn.Linear, params: OSTParams, layer: int, role: str,
                 quant: QuantConfig, online_hadamard: bool = False,
                 compute_dtype=torch.float32, weight_clip: str = "search"):
        super().__init__()
        if weight_clip not in WEIGHT_CLIP_MODES:
            raise ValueError(f"weight_clip must be one of {WEIGHT_CLIP_MODES}")
        self.base = base
        self._ref = _ParamsRef(params)
        self.layer = layer
        self.role = role
        self.quant = quant
        self.online_hadamard = online_hadamard
        self.compute_dtype = compute_dtype
        self.weight_clip = weight_clip
        self.clip_ratio: Optional[torch.Tensor] = None

    @property
    def in_features(self) -> int:
        """As ``nn.Linear``."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """As ``nn.Linear``."""
        return self.base.out_features

    def reset_clip(self) -> None:
        """Forget the cached clipping ratios (``weight_clip="cached"``)."""
        self.clip_ratio = None

    def transformed_weight(self):
        """``(W', b')`` in the base dtype, before fake quantization (rows Hadamard-rotated if
        ``online_hadamard``): what the runtime's ``QuantLinear`` would quantize."""
        w, b = transform_linear(self._ref.params, self.layer, self.role, self.base.weight,
                                self.base.bias, self.compute_dtype)
        dt = self.base.weight.dtype
        w = w.to(dt)
        b = None if b is None else b.to(dt)
        if self.online_hadamard:
            w = hadamard_rotate(w)
        return w, b

    def _quant_weight(self, w: torch.Tensor) -> torch.Tensor:
        q = self.quant
        mode = self.weight_clip if q.w_clip_search else "none"
        if mode == "search":
            return fake_quant_weight(w, q.wbits, q.w_sym, clip_search=True)
        if mode == "none":
            return fake_quant_weight(w, q.wbits, q.w_sym, clip_search=False)
        if self.clip_ratio is None or self.clip_ratio.shape[0] != w.shape[0]:
            from ostquant.ops import reference as ref
            with torch.no_grad():
                self.clip_ratio = ref.search_clip_ratio(w.detach(), q.wbits, q.w_sym)
        return fake_quant(w, q.wbits, q.w_sym, self.clip_ratio.to(w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.transformed_weight()
        if self.online_hadamard:
            x = hadamard_rotate(x)
        q = self.quant
        if q.abits < 16:
            x = fake_quant(x, q.abits, q.act_sym, q.act_clip_ratio)
        if q.wbits < 16:
            w = self._quant_weight(w)
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, role={self.role}, in={self.in_features}, "
                f"out={self.out_features}, w{self.quant.wbits}a{self.quant.abits}, "
                f"online_hadamard={self.online_hadamard}, weight_clip={self.weight_clip}")


class TransformedRMSNorm(nn.Module):
    """RMSNorm with weight ``1/s`` (S_attn / S_ffn) computed from the params.

    Same formula as the transformers LLaMA-family RMSNorm (normalize in float32 — float64 for
    float64 inputs — then ``weight * normed.to(input dtype)``). Without S_res it uses the
    prepared base weight (1).
    """

    def __init__(self, base: nn.Module, params: OSTParams, layer: int, which: str,
                 compute_dtype=torch.float32):
        super().__init__()
        self.base = base
        self._ref = _ParamsRef(params)
        self.layer = layer
        self.which = which
        self.compute_dtype = compute_dtype
        self.eps = float(getattr(base, "variance_epsilon", getattr(base, "eps", 1e-6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        h = x.to(torch.float64 if dt == torch.float64 else torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = norm_weight(self._ref.params, self.layer, self.which, self.compute_dtype)
        w = self.base.weight if w is None else w.to(self.base.weight.dtype)
        return w * h.to(dt)


class RotatedEmbedding(nn.Module):
    """Embedding followed by ``R_res``: ``E[ids]·R`` (= the fused table ``(E·R)[ids]``)."""

    def __init__(self, base: nn.Embedding, params: OSTParams, compute_dtype=torch.float32):
        super().__init__()
        self.base = base
        self._ref = _ParamsRef(params)
        self.compute_dtype = compute_dtype

    @property
    def weight(self) -> torch.Tensor:
        """The *unrotated* table (some transformers code reads ``embed_tokens.weight``)."""
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.base(ids)
        r = self._ref.params.rotation(self.compute_dtype)
        return e if r is None else (e.to(self.compute_dtype) @ r).to(e.dtype)


class RotatedHead(nn.Module):
    """``lm_head`` reading the rotated stream: ``head(x·Rᵀ)`` (= the fused ``W·R``)."""

    def __init__(self, base: nn.Linear, params: OSTParams, compute_dtype=torch.float32):
        super().__init__()
        self.base = base
        self._ref = _ParamsRef(params)
        self.compute_dtype = compute_dtype

    @property
    def weight(self) -> torch.Tensor:
        """The *unrotated* prepared head weight."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._ref.params.rotation(self.compute_dtype)
        if r is not None:
            x = (x.to(self.compute_dtype) @ r.T).to(x.dtype)
        return self.base(x)


_WRAPPERS = (TransformedLinear, TransformedRMSNorm, RotatedEmbedding, RotatedHead)


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _name_of(root: nn.Module, target: nn.Module) -> str:
    for n, m in root.named_modules():
        if m is target:
            return n
    raise ValueError("module not found in model")


def _quant_or_off(quant_config) -> QuantConfig:
    if quant_config is None:
        return QuantConfig()
    if isinstance(quant_config, QuantConfig):
        return quant_config
    from ostquant.quant import get_preset
    return get_preset(str(quant_config))


def _hook_config(model, params: OSTParams, q: QuantConfig, base_hook):
    from ostquant.models.attention import AttentionHookConfig

    observer = None if base_hook is None else base_hook.observer
    return AttentionHookConfig(kv_bits=q.kvbits, kv_sym=q.kv_sym, kv_clip_ratio=q.kv_clip_ratio,
                               q_k_hadamard=bool(params.config.qk_hadamard), observer=observer)


def apply_training_transforms(model: nn.Module, params: OSTParams, quant_config=None, *,
                              compute_dtype=torch.float32, weight_clip: str = "search"
                              ) -> nn.Module:
    """Make ``model`` (in place) compute with the transforms of ``params`` and fake quantizers.

    ``quant_config``: a :class:`~ostquant.quant.QuantConfig` or preset name; None = no
    quantization (then the model equals the original up to float rounding). The model is
    :func:`prepared <~.fuse.prepare_model>` first and all its own parameters are frozen
    (``requires_grad=False``): only ``params`` learn. Call again to change settings, or use
    :func:`set_training_quant`. Returns the model.
    """
    from ostquant.models.adapters import get_adapter
    from ostquant.models.attention import get_attention_hook, install_attention_hook

    q = _quant_or_off(quant_config)
    remove_training_transforms(model)
    _check_params(model, params, params.config)
    prepare_model(model)
    adapter = get_adapter(model)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = params.config
    for i, layer in enumerate(adapter.layers(model)):
        for role in ROLES:
            lin = adapter.proj(layer, role)
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"layer {i} {role} is {type(lin).__name__}, expected nn.Linear "
                                f"(apply training transforms to a float model)")
            wrapped = TransformedLinear(lin, params, i, role, q,
                                        online_hadamard=role == "down_proj" and cfg.down_hadamard,
                                        compute_dtype=compute_dtype, weight_clip=weight_clip)
            _set(layer, adapter.proj_paths[role], wrapped)
        for which, attr in (("attn", adapter.input_norm_attr),
                            ("ffn", adapter.post_attn_norm_attr)):
            norm = getattr(layer, attr)
            setattr(layer, attr, TransformedRMSNorm(norm, params, i, which, compute_dtype))
    emb = adapter.embed_tokens(model)
    _set(model, _name_of(model, emb), RotatedEmbedding(emb, params, compute_dtype))
    head = adapter.lm_head(model)
    _set(model, _name_of(model, head), RotatedHead(head, params, compute_dtype))

    before = get_attention_hook(model)
    setattr(model, _HOOK_BACKUP_ATTR, (before is not None,
                                       None if before is None else dataclasses.replace(before)))
    hook = _hook_config(model, params, q, before)
    if hook.active:
        install_attention_hook(model, hook)
    model.ostquant_training_quant = q
    return model


def training_modules(model: nn.Module):
    """The :class:`TransformedLinear` modules of a model under training transforms."""
    return [m for m in model.modules() if isinstance(m, TransformedLinear)]


def set_training_quant(model: nn.Module, quant_config=None) -> nn.Module:
    """Change the fake-quantization settings of a model under training transforms (e.g. turn
    quantization off — ``None`` — to get the full-precision teacher logits, which equal the
    original model's). Returns the model."""
    from ostquant.models.attention import (get_attention_hook, install_attention_hook,
                                           remove_attention_hook)

    q = _quant_or_off(quant_config)
    mods = training_modules(model)
    if not mods:
        raise ValueError("model has no training transforms (apply_training_transforms first)")
    for m in mods:
        if (m.quant.wbits, m.quant.w_sym) != (q.wbits, q.w_sym):
            m.reset_clip()
        m.quant = q
    hook = _hook_config(model, mods[0]._ref.params, q, get_attention_hook(model))
    if hook.active:
        install_attention_hook(model, hook)
    elif get_attention_hook(model) is not None:
        remove_attention_hook(model)
    model.ostquant_training_quant = q
    return model


def reset_clip_ratios(model: nn.Module) -> None:
    """Make every ``weight_clip="cached"`` projection search its clipping ratios again."""
    for m in training_modules(model):
        m.reset_clip()


def remove_training_transforms(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_training_transforms`: put the original (prepared, frozen) modules
    back and restore the attention hook as it was before. No-op on a plain model."""
    from ostquant.models.attention import install_attention_hook, remove_attention_hook

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, _WRAPPERS)]
    if not found:
        return model
    for name, mod in found:
        _set(model, name, mod.base)
    had, cfg = getattr(model, _HOOK_BACKUP_ATTR, (False, None))
    if had:
        install_attention_hook(model, cfg)
    else:
        remove_attention_hook(model)
    if hasattr(model, _HOOK_BACKUP_ATTR):
        delattr(model, _HOOK_BACKUP_ATTR)
    if hasattr(model, "ostquant_training_quant"):
        del model.ostquant_training_quant
    return model


class TransformedModel(nn.Module):
    """A model under training transforms together with its :class:`~.pairs.OSTParams`.

    ``.to()``/``.double()`` move both; ``forward`` is the wrapped model's; only the params
    are trainable (``self.params.orthogonal_parameters()`` / ``scaling_parameters()``).
    """

    def __init__(self, model: nn.Module, params: OSTParams, quant_config=None, *,
                 compute_dtype=torch.float32, weight_clip: str = "search"):
        super().__init__()
        self.model = apply_training_transforms(model, params, quant_config,
                                               compute_dtype=compute_dtype,
                                               weight_clip=weight_clip)
        self.params = params

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def set_quant(self, quant_config=None) -> "TransformedModel":
        """See :func:`set_training_quant`."""
        set_training_quant(self.model, quant_config)
        return self

    def fuse(self, **kw) -> nn.Module:
        """Fold the params into the wrapped model (:func:`~.fuse.fuse_transforms`) and return
        the plain fused model; this wrapper must not be used afterwards."""
        from .fuse import fuse_transforms

        return fuse_transforms(self.model, self.params, **kw)


__all__ = ["TransformedLinear", "TransformedRMSNorm", "RotatedEmbedding", "RotatedHead",
           "apply_training_transforms", "remove_training_transforms", "set_training_quant",
           "reset_clip_ratios", "training_modules", "TransformedModel", "WEIGHT_CLIP_MODES"]
