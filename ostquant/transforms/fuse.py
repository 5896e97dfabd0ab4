"""Fold the equivalent transformation pairs into a model's weights (and the shared weight math).

Three steps, all in place:

1. :func:`prepare_model` — untie ``lm_head`` from the embeddings and fold every RMSNorm weight
   ``γ`` into the linears it feeds (``W ← W·diag(γ)``; the final norm into ``lm_head``), then
   ``γ = 1``. After this RMSNorm commutes with any orthogonal ``R`` on the residual stream.
   Exact up to one rounding per weight (done in float64).
2. :func:`transform_linear` / :func:`norm_weight` — the transformed weights of one module as a
   differentiable function of (prepared weights, :class:`~.pairs.OSTParams`). The training-time
   form (:mod:`~.model`) calls the very same functions on every forward, so the two forms
   cannot drift apart.
3. :func:`fuse_transforms` — evaluate them once in float64, cast back and store. What remains
   at run time: the norm weights ``1/s`` and the online Hadamards, which are *flagged*, not
   applied: ``down_proj`` modules get ``ostquant_online_hadamard = True`` (turn them into
   ``QuantLinear(online_hadamard=True)`` with :func:`quantize_fused`, which folds ``Ĥ`` into
   the quantized weight), and Q/K Hadamard goes to the attention hook (``q_k_hadamard``).
   The float fused model with plain ``nn.Linear`` is exactly the original model.
   :func:`online_hadamards` returns the small dict a checkpoint stores.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .pairs import OSTParams, TransformConfig

READERS_ATTN = ("q_proj", "k_proj", "v_proj")
READERS_FFN = ("gate_proj", "up_proj")
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: attribute set on modules / the model by :func:`fuse_transforms`
ONLINE_HADAMARD_ATTR = "ostquant_online_hadamard"
ONLINE_SPEC_ATTR = "ostquant_online_hadamards"
PREPARED_ATTR = "ostquant_prepared"


# ---------------------------------------------------------------------------------- prepare
def _untie(model: nn.Module, adapter) -> None:
    emb = adapter.embed_tokens(model)
    head = adapter.lm_head(model)
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(),
                                   requires_grad=emb.weight.requires_grad)
    for cfg in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


@torch.no_grad()
def _fold_norm(norm: nn.Module, linears) -> None:
    g = norm.weight.detach().double()
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * g).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


@torch.no_grad()
def prepare_model(model: nn.Module) -> nn.Module:
    """Untie embeddings/lm_head and fold all RMSNorm weights into the following linears.

    In place; idempotent (a second call folds ``γ = 1``). The function of the model is
    unchanged up to one float rounding per weight. Returns the model.
    """
    from ostquant.models.adapters import get_adapter

    adapter = get_adapter(model)
    _untie(model, adapter)
    for layer in adapter.layers(model):
        _fold_norm(adapter.input_norm(layer), [adapter.proj(layer, r) for r in READERS_ATTN])
        _fold_norm(adapter.post_attn_norm(layer), [adapter.proj(layer, r) for r in READERS_FFN])
    _fold_norm(adapter.final_norm(model), [adapter.lm_head(model)])
    setattr(model, PREPARED_ATTR, True)
    return model


# ---------------------------------------------------------------------------------- math
def transform_linear(params: OSTParams, layer: int, role: str, weight: torch.Tensor,
                     bias: Optional[torch.Tensor], dtype=torch.float64
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Transformed ``(W', b')`` of projection ``role`` of decoder layer ``layer``, in ``dtype``.

    ``weight``/``bias`` are the *prepared* weights (:func:`prepare_model`). Differentiable in
    ``params``. Does not include the down_proj online Hadamard (that is the runtime's,
    :class:`~ostquant.nn.QuantLinear` folds ``Ĥ`` into its stored weight). Formulas: see
    :mod:`~.pairs`.
    """
    if role not in ROLES:
        raise KeyError(f"unknown projection role {role!r}")
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    r = params.rotation(dtype)
    hd, rep = params.head_dim, params.num_kv_groups

    if role in READERS_ATTN or role in READERS_FFN:
        if r is not None:
            w = w @ r
        s = params.norm_scale(layer, "attn" if role in READERS_ATTN else "ffn", dtype)
        if s is not None:
            w = w * s
        if role in ("q_proj", "k_proj"):
            sqk = params.qk_scale(layer, dtype)  # [Hkv, hd]
            if sqk is not None:
                if role == "q_proj":
                    f = sqk.repeat_interleave(rep, dim=0).reshape(-1)
                else:
                    f = (1.0 / sqk).reshape(-1)
                w = w * f[:, None]
                b = None if b is None else b * f
        elif role == "v_proj":
            ov = params.ov_factors(layer, dtype)
            if ov is not None:
                t = ov[0]  # [Hkv, hd, hd]; rows of head g <- T_gᵀ·W_g
                w = torch.einsum("gji,gjd->gid", t, w.reshape(-1, hd, w.shape[-1])).reshape(
                    w.shape)
                if b is not None:
                    b = torch.einsum("gj,gji->gi", b.reshape(-1, hd), t).reshape(b.shape)
        elif role == "up_proj":
            s = params.up_down_scale(layer, dtype)
            if s is not None:
                w = w * s[:, None]
                b = None if b is None else b * s
        return w, b

    if role == "o_proj":
        ov = params.ov_factors(layer, dtype)
        if ov is not None:
            u = ov[1].repeat_interleave(rep, dim=0)  # [Hq, hd, hd] = R_g·diag(1/s_g)
            d_out = w.shape[0]
            w = torch.einsum("ohj,hji->ohi", w.reshape(d_out, -1, hd), u).reshape(w.shape)
    else:  # down_proj
        s = params.up_down_scale(layer, dtype)
        if s is not None:
            w = w / s
    if r is not None:
        w = r.T @ w
        b = None if b is None else b @ r
    return w, b


def transform_head(params: OSTParams, weight: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """``lm_head`` weight ``W·R`` (prepared: final-norm γ folded in)."""
    r = params.rotation(dtype)
    w = weight.to(dtype)
    return w if r is None else w @ r


def transform_embedding(params: OSTParams, weight: torch.Tensor, dtype=torch.float64
                        ) -> torch.Tensor:
    """Embedding table ``E·R``."""
    return transform_head(params, weight, dtype)


def norm_weight(params: OSTParams, layer: int, which: str, dtype=torch.float64
                ) -> Optional[torch.Tensor]:
    """Weight ``1/s`` of the layer's input (``"attn"``) or post-attention (``"ffn"``) RMSNorm,
    or None when S_res is off (the prepared weight, 1, stays)."""
    s = params.norm_scale(layer, which, dtype)
    return None if s is None else 1.0 / s


def online_hadamard_spec(config: TransformConfig) -> Dict[str, bool]:
    """Which online Hadamards a model fused with ``config`` needs at run time."""
    return {"down_proj": bool(config.down_hadamard), "q_k": bool(config.qk_hadamard)}


# ---------------------------------------------------------------------------------- fuse
def _check_params(model, params: OSTParams, config: TransformConfig) -> None:
    from ostquant.models.adapters import get_adapter

    a = get_adapter(model)
    want = (a.hidden_size, a.intermediate_size, a.num_layers, a.num_heads, a.num_kv_heads,
            a.head_dim)
    have = (params.hidden_size, params.intermediate_size, params.num_layers, params.num_heads,
            params.num_kv_heads, params.head_dim)
    if want != have:
        raise ValueError(f"OSTParams shapes {have} do not match the model {want} "
                         f"(hidden, ffn, layers, heads, kv heads, head_dim)")
    for name in ("r_res", "s_res", "r_ov", "s_ov", "s_qk", "s_up_down"):
        if getattr(config, name) != getattr(params.config, name):
            raise ValueError(f"config.{name}={getattr(config, name)} but the params were "
                             f"built with {name}={getattr(params.config, name)}")


@torch.no_grad()
def fuse_transforms(model: nn.Module, params: OSTParams,
                    config: Optional[TransformConfig] = None, install_hooks: bool = True,
                    orthogonalize: bool = True) -> nn.Module:
    """Fold ``params`` into ``model``'s weights (in place, computed in float64) and return it.

    Accepts a plain model (prepared or not: :func:`prepare_model` is applied) or one that went
    through :func:`~.model.apply_training_transforms` (the training wrappers are removed
    first). ``config`` defaults to ``params.config``; its ``qk_hadamard``/``down_hadamard``
    decide the online Hadamards (which need no tensors). With ``install_hooks`` the attention
    hook is installed with ``q_k_hadamard`` when needed (keeping its other settings).
    ``orthogonalize``: fold polar-projected copies of the orthogonal matrices (removes the
    ~1e-6 drift of float32 training; the params object itself is not modified).

    Records :func:`online_hadamard_spec` as ``model.ostquant_online_hadamards`` and flags
    each ``down_proj`` with ``ostquant_online_hadamard``.
    """
    from ostquant.models.adapters import get_adapter
    from ostquant.models.attention import (AttentionHookConfig, get_attention_hook,
                                           install_attention_hook)

    from .model import remove_training_transforms

    config = config or params.config
    remove_training_transforms(model)
    _check_params(model, params, config)
    prepare_model(model)
    adapter = get_adapter(model)
    emb = adapter.embed_tokens(model)
    dev = emb.weight.device  # fold on the model's device (float64 works on CPU and GPU)
    p = copy.deepcopy(params).double().to(dev)
    if orthogonalize:
        p.orthogonalize_()

    def store(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src.to(dtype=dst.dtype, device=dst.device))

    def get(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach().to(dev)

    for i, layer in enumerate(adapter.layers(model)):
        for role in ROLES:
            lin = adapter.proj(layer, role)
            w, b = transform_linear(p, i, role, get(lin.weight), get(lin.bias), torch.float64)
            store(lin.weight, w)
            if lin.bias is not None:
                store(lin.bias, b)
        for which, norm in (("attn", adapter.input_norm(layer)),
                            ("ffn", adapter.post_attn_norm(layer))):
            nw = norm_weight(p, i, which, torch.float64)
            if nw is not None:
                store(norm.weight, nw)
        down = adapter.proj(layer, "down_proj")
        setattr(down, ONLINE_HADAMARD_ATTR, bool(config.down_hadamard))
    store(emb.weight, transform_embedding(p, get(emb.weight)))
    head = adapter.lm_head(model)
    store(head.weight, transform_head(p, get(head.weight)))

    spec = online_hadamard_spec(config)
    setattr(model, ONLINE_SPEC_ATTR, spec)
    if install_hooks and spec["q_k"]:
        cur = get_attention_hook(model) or AttentionHookConfig()
        import dataclasses
        install_attention_hook(model, dataclasses.replace(cur, q_k_hadamard=True))
    return model


def online_hadamards(model: nn.Module) -> Dict[str, bool]:
    """The online-Hadamard record of a fused model (all False for a model never fused)."""
    return dict(getattr(model, ONLINE_SPEC_ATTR, {"down_proj": False, "q_k": False}))


def quantize_fused(model: nn.Module, quant_config, progress: bool = False) -> nn.Module:
    """Quantize a fused model for the runtime (in place): decoder linears → ``QuantLinear``
    (``online_hadamard=True`` exactly on the flagged down_proj modules), KV fake quantization
    through the attention hook (which keeps ``q_k_hadamard``). Embeddings, norms and lm_head
    stay in float, as in :func:`ostquant.baselines.rtn.apply_rtn`. Returns the model."""
    from ostquant.models.adapters import get_adapter
    from ostquant.models.attention import enable_kv_fake_quant
    from ostquant.nn import replace_linear
    from ostquant.quant import QuantConfig, get_preset

    cfg = quant_config if isinstance(quant_config, QuantConfig) else get_preset(str(quant_config))
    adapter = get_adapter(model)
    if cfg.wbits < 16:
        if cfg.wbits != 4 or cfg.abits not in (4, 16) or not cfg.w_sym:
            raise NotImplementedError(f"{cfg.name}: QuantLinear supports symmetric W4 with "
                                      f"A4 or A16 only")
        names = set(adapter.decoder_linear_names(model))
        kw = dict(wbits=cfg.wbits, abits=cfg.abits, act_sym=cfg.act_sym,
                  act_clip_ratio=cfg.act_clip_ratio, w_clip_search=cfg.w_clip_search)
        flagged = lambda n, m: n in names and getattr(m, ONLINE_HADAMARD_ATTR, False)  # noqa
        plain = lambda n, m: n in names and not getattr(m, ONLINE_HADAMARD_ATTR, False)  # noqa
        replace_linear(model, filter=flagged, progress=progress, online_hadamard=True, **kw)
        replace_linear(model, filter=plain, progress=progress, online_hadamard=False, **kw)
    elif cfg.abits < 16:
        raise NotImplementedError(f"{cfg.name}: activation quantization without weight "
                                  f"quantization is not supported")
    if cfg.kvbits < 16:
        enable_kv_fake_quant(model, cfg.kvbits, sym=cfg.kv_sym, clip_ratio=cfg.kv_clip_ratio)
    model.ostquant_quant_config = cfg
    return model


__all__ = ["prepare_model", "transform_linear", "transform_head", "transform_embedding",
           "norm_weight", "online_hadamard_spec", "fuse_transforms", "online_hadamards",
           "quantize_fused", "ROLES"]
