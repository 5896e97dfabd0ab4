"""Round-to-nearest (RTN) baseline: quantize the model as it is, no transforms.

* Weights of the seven projections in every decoder layer (q/k/v/o/gate/up/down): per
  output channel, symmetric, with the per-row clipping-ratio search of
  :func:`ostquant.ops.quantize_per_channel` (``w_clip_search`` in the preset), stored as
  packed int4 in :class:`ostquant.nn.QuantLinear`.
* Activations (the inputs of those projections): per token, asymmetric by default, on the
  fly inside ``QuantLinear`` (``abits=4``).
* KV cache: K after RoPE and V, per token per head, via the attention hook
  (:func:`ostquant.models.enable_kv_fake_quant`).
* The embeddings, the final norm and ``lm_head`` stay in floating point.
"""
from __future__ import annotations

from typing import Optional, Union

from torch import nn

from ostquant.models.adapters import get_adapter
from ostquant.models.attention import enable_kv_fake_quant
from ostquant.quant import QuantConfig, get_preset


def _config(preset) -> QuantConfig:
    if isinstance(preset, QuantConfig):
        return preset
    return get_preset(str(preset))


def _same_weights(a, b) -> bool:
    return (a.wbits, a.w_sym, a.w_clip_search) == (b.wbits, b.w_sym, b.w_clip_search)


def quantize_decoder_linears(model: nn.Module, cfg, progress: bool = False,
                             reuse_weights_from: Optional[nn.Module] = None) -> nn.Module:
    """Replace the decoder-layer projections by ``QuantLinear`` per ``cfg`` (in place).

    ``reuse_weights_from``: a model already quantized by :func:`apply_rtn` (from the same
    floating-point weights) with the same weight settings (``wbits``, ``w_sym``,
    ``w_clip_search``); its int4 weights and scales are copied instead of repeating the
    clipping search (only the activation settings differ between presets).
    """
    from ostquant.nn import QuantLinear, replace_linear

    if cfg.wbits >= 16:
        if cfg.abits < 16:
            raise NotImplementedError(f"{cfg.name}: activation quantization without weight "
                                      f"quantization is not supported")
        return model
    if cfg.wbits != 4 or cfg.abits not in (4, 16):
        raise NotImplementedError(f"{cfg.name}: QuantLinear supports W4 with A4 or A16 only")
    if not cfg.w_sym:
        raise NotImplementedError(f"{cfg.name}: QuantLinear stores symmetric weights only")
    adapter = get_adapter(model)
    act = dict(abits=cfg.abits, act_sym=cfg.act_sym, act_clip_ratio=cfg.act_clip_ratio)
    if reuse_weights_from is None:
        return replace_linear(model, filter=adapter.decoder_linear_filter(model),
                              progress=progress, wbits=cfg.wbits,
                              w_clip_search=cfg.w_clip_search, **act)
    src_cfg = getattr(reuse_weights_from, "ostquant_quant_config", None)
    if src_cfg is None or not _same_weights(src_cfg, cfg):
        raise ValueError(f"reuse_weights_from was not quantized by apply_rtn with the weight "
                         f"settings of {cfg.name} (wbits/w_sym/w_clip_search)")
    for name in adapter.decoder_linear_names(model):
        lin = model.get_submodule(name)
        src = reuse_weights_from.get_submodule(name)
        if not isinstance(src, QuantLinear) or not isinstance(lin, nn.Linear) or \
                (src.in_features, src.out_features) != (lin.in_features, lin.out_features):
            raise ValueError(f"reuse_weights_from does not match the model at {name}")
        kw = src.config()
        kw.update(act)
        q = QuantLinear(**kw, dtype=lin.weight.dtype, device=lin.weight.device)
        q.load_state_dict(src.state_dict())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, q)
    return model


def apply_rtn(model: nn.Module, preset: Union[str, QuantConfig], progress: bool = False,
              reuse_weights_from: Optional[nn.Module] = None) -> nn.Module:
    """Quantize ``model`` in place with round-to-nearest per ``preset`` and return it.

    ``preset`` is a name (``w16a16kv16``, ``w4a16kv16``, ``w4a4kv16``, ``w4a4kv4``) or a
    :class:`ostquant.quant.QuantConfig`. ``w16a16kv16`` leaves the model untouched.
    ``reuse_weights_from`` skips the weight clipping search (see
    :func:`quantize_decoder_linears`); the result is identical.
    """
    cfg = _config(preset)
    get_adapter(model)  # fail early, clearly, on an unsupported architecture
    quantize_decoder_linears(model, cfg, progress=progress,
                             reuse_weights_from=reuse_weights_from)
    if cfg.kvbits < 16:
        enable_kv_fake_quant(model, cfg.kvbits, sym=cfg.kv_sym, clip_ratio=cfg.kv_clip_ratio)
    model.ostquant_quant_config = cfg
    return model
