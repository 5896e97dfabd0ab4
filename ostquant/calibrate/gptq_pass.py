"""GPTQ for a whole model: the decoder-layer projections quantized layer by layer with
:class:`ostquant.quant.GPTQ` (the official OSTQuant code runs GPTQ after fusing the transforms).

:func:`apply_gptq` runs the calibration samples through the model once to catch the first
decoder layer's inputs, then, for each layer in turn:

1. runs the layer on every sample with forward pre-hooks on its seven projections that
   accumulate each projection's Hessian ``H = 2·XᵀX`` from its input ``X`` (for a down_proj
   flagged for the online Hadamard, from ``X·Ĥᵀ``, the input its weight will see);
2. GPTQ-quantizes each projection on the same per-channel grid as round-to-nearest (symmetric,
   clipping search per the preset) and puts a :class:`~ostquant.nn.QuantLinear` in its place
   (``online_hadamard`` where flagged), so the result saves and loads like any other
   quantized model;
3. runs the *quantized* layer on the samples to get the next layer's inputs (so later layers
   compensate the error of earlier ones, as in GPTQ's sequential mode).

Activations and the KV cache are not quantized while the Hessians are collected (as in
QuaRot's and OSTQuant's GPTQ); the projections of one layer share one pass. Only the
decoder-layer inputs for one layer are held in memory (``nsamples × seqlen × hidden``).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["apply_gptq"]


class _StopForward(Exception):
    """Raised by the catcher hook once the first decoder layer's inputs are stored."""


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def apply_gptq(model: nn.Module, quant_config, calib_data: torch.Tensor, progress: bool = False,
               percdamp: float = 0.01, act_order: bool = False, block_size: int = 128
               ) -> nn.Module:
    """Replace the decoder-layer projections of ``model`` (in place) by GPTQ-quantized
    :class:`~ostquant.nn.QuantLinear` layers and return the model.

    Args:
        model: a (fused, or plain) floating-point ``*ForCausalLM`` model; a down_proj carrying
            the online-Hadamard flag of :func:`ostquant.transforms.fuse_transforms` gets an
            online-Hadamard ``QuantLinear``.
        quant_config: preset name or :class:`~ostquant.quant.QuantConfig` (symmetric W4 with
            A4 or A16; the activation settings are stored in the QuantLinear layers).
        calib_data: LongTensor ``[nsamples, seqlen]`` of token ids.
        percdamp, act_order, block_size: see :meth:`ostquant.quant.GPTQ.quantize`.

    Embeddings, norms, lm_head and the KV cache are left alone (the caller enables KV
    quantization, e.g. :func:`ostquant.transforms.quantize_fused` afterwards).
    """
    from ostquant.models.adapters import get_adapter
    from ostquant.nn import QuantLinear
    from ostquant.nn.quant_linear import _hadamard_rows
    from ostquant.ops import pack_int4
    from ostquant.quant import QuantConfig, get_preset
    from ostquant.quant.gptq import GPTQ
    from ostquant.transforms.fuse import ONLINE_HADAMARD_ATTR

    cfg = quant_config if isinstance(quant_config, QuantConfig) else get_preset(str(quant_config))
    if cfg.wbits >= 16:
        raise ValueError(f"apply_gptq: {cfg.name} does not quantize weights (wbits={cfg.wbits})")
    if cfg.wbits != 4 or cfg.abits not in (4, 16) or not cfg.w_sym:
        raise NotImplementedError(f"apply_gptq: {cfg.name}: QuantLinear supports symmetric W4 "
                                  f"with A4 or A16 only")
    if not isinstance(calib_data, torch.Tensor) or calib_data.dim() != 2 or \
            calib_data.dtype != torch.long or calib_data.numel() == 0:
        desc = (f"{calib_data.dtype} {tuple(calib_data.shape)}"
                if isinstance(calib_data, torch.Tensor) else type(calib_data).__name__)
        raise ValueError(f"apply_gptq: calib_data must be a non-empty LongTensor "
                         f"[nsamples, seqlen], got {desc}")
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    device = next(model.parameters()).device
    paths = list(adapter.proj_paths.values())

    # 1. inputs (and keyword arguments: position embeddings, masks) of the first layer
    caught = []

    def catcher(module, args, kwargs):
        kwargs = dict(kwargs)
        hs = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hs.detach(), args[1:], kwargs))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        for i in range(calib_data.shape[0]):
            try:
                model(input_ids=calib_data[i:i + 1].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(caught) != calib_data.shape[0]:  # pragma: no cover - model without decoder layers
        raise RuntimeError("apply_gptq: the first decoder layer was not reached")

    it = range(len(layers))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="GPTQ", unit="layer")
    for li in it:
        layer = layers[li]
        linears = {p: layer.get_submodule(p) for p in paths}
        for p, lin in linears.items():
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"apply_gptq: layer {li} {p} is a {type(lin).__name__}, not "
                                f"nn.Linear (already quantized?)")
        flags = {p: bool(getattr(lin, ONLINE_HADAMARD_ATTR, False)) for p, lin in linears.items()}
        gptq = {p: GPTQ(lin.weight) for p, lin in linears.items()}

        def make_hook(p):
            def hook(module, args):
                x = args[0]
                gptq[p].add_batch(_hadamard_rows(x.float()) if flags[p] else x)
            return hook

        handles = [lin.register_forward_pre_hook(make_hook(p)) for p, lin in linears.items()]
        try:
            for hs, args, kwargs in caught:
                layer(hs, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()

        for p, lin in linears.items():
            w = lin.weight.detach().float()
            if flags[p]:
                w = _hadamard_rows(w)
            q, scale, _ = gptq[p].quantize(w, bits=cfg.wbits, sym=True,
                                           clip_search=cfg.w_clip_search, percdamp=percdamp,
                                           act_order=act_order, block_size=block_size)
            gptq[p].free()
            ql = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None,
                             wbits=cfg.wbits, abits=cfg.abits, act_sym=cfg.act_sym,
                             act_clip_ratio=cfg.act_clip_ratio, online_hadamard=flags[p],
                             dtype=lin.weight.dtype, device=lin.weight.device)
            ql.qweight.copy_(pack_int4(q))
            ql.w_scale.copy_(scale)
            ql.w_sum.copy_(q.float().sum(dim=-1))
            if lin.bias is not None:
                ql.bias.copy_(lin.bias.detach())
            setattr(ql, ONLINE_HADAMARD_ATTR, flags[p])
            parent, _, child = p.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, ql)

        caught = [(_layer_output(layer(hs, *args, **kwargs)).detach(), args, kwargs)
                  for hs, args, kwargs in caught]
    log.info("GPTQ: %d layers x %d projections on %d samples", len(layers), len(paths),
             calib_data.shape[0])
    return model
