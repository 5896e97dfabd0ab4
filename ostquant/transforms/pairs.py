"""Equivalent transformation pairs of OSTQuant (paper §4.2.3, eqs. 9–11): the learnable tensors.

Convention throughout :mod:`ostquant.transforms`: row vectors, ``y = x·Wᵀ + b`` with
``W`` of shape ``[out, in]``. A pair ``T = O·Λ`` transforms the output of one linear map and
its inverse ``Λ⁻¹·Oᵀ`` the input of the next, so the network is unchanged in exact arithmetic.

Pairs (names of the paper's Table 4 ablation in brackets), one switch each in
:class:`TransformConfig`:

* ``r_res`` [R_res] — one global orthogonal ``R`` (d×d) on the residual stream:
  ``h ← h·R``. Embedding ``E ← E·R``; residual readers (q, k, v, gate, up, lm_head)
  ``W ← W·R``; writers (o, down) ``W ← Rᵀ·W``, ``b ← b·R``. Exact through RMSNorm once the
  norm weights are folded into the readers (``‖h·R‖ = ‖h‖``; :func:`~.fuse.prepare_model`).
* ``s_res`` [S_res = S_attn, S_ffn] — per layer, per norm: the norm weight becomes ``1/s`` and
  the readers it feeds ``W ← W·diag(s)`` (applied after ``R``: the norm output lives in the
  rotated basis).
* ``r_ov``, ``s_ov`` [R_ov, S_ov] — per KV head ``g``: ``v_g ← v_g·T_g``, ``T_g = R_g·diag(s_g)``;
  v_proj rows of head g ``W ← T_gᵀ·W`` (bias ``b ← b·T_g``); o_proj columns of every query
  head ``i`` of group g ``W_i ← W_i·T_g⁻ᵀ = W_i·R_g·diag(1/s_g)`` (GQA: shared by the group).
* ``s_qk`` [S_qk] — per KV head: q channels of each query head of group g ``× s_g``, k channels
  of head g ``× 1/s_g`` (biases too). RoPE rotates channels ``i`` and ``i + rotary_dim/2``
  together, so both get one factor: ``rotary_dim/2`` free values (+ one per non-rotary
  channel) per KV head.
* ``qk_hadamard`` [R_qk] — online orthonormal Hadamard on Q and K after RoPE (attention hook).
* ``s_up_down`` [S_u|d] — up rows (and bias) ``× s``, down columns ``× 1/s`` (SwiGLU gating is
  elementwise, so ``act(g)·(u·s)·(1/s) = act(g)·u``).
* ``down_hadamard`` [R_dn] — online orthonormal Hadamard before down_proj:
  ``x ← x·Ĥᵀ``, ``W_down ← W_down·Ĥᵀ`` (as :class:`ostquant.nn.QuantLinear` does).

Parametrization
---------------
Orthogonal matrices are :class:`geoopt.ManifoldParameter` on ``geoopt.Stiefel()`` (train with
``geoopt.optim.RiemannianAdam``), initialized per :attr:`TransformConfig.r_res_init` /
:attr:`TransformConfig.r_ov_init`. Scalings are plain ``nn.Parameter`` holding **log-scales**
``θ`` with ``s = exp(θ)``: always positive (never zero, so the inverse pair exists), identity at
``θ = 0``, and Adam steps act multiplicatively on ``s``, which matches how scales behave.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

PAIR_NAMES = ("r_res", "s_res", "r_ov", "s_ov", "s_qk", "qk_hadamard", "s_up_down",
              "down_hadamard")
R_RES_INITS = ("identity", "hadamard", "random_hadamard", "womi")
R_OV_INITS = ("identity", "hadamard")


@dataclass(frozen=True)
class TransformConfig:
    """Which equivalent transformation pairs are used, and how ``R_res`` is initialized.

    ``s_res`` switches both per-layer norm scalings (S_attn and S_ffn). ``r_res_init`` is one
    of ``"identity"``, ``"hadamard"``, ``"random_hadamard"`` (QuaRot-style, seeded by
    ``seed``) or ``"womi"`` (the paper's weight-outlier-minimizing init; needs the model's
    weights). ``r_ov_init``: ``"identity"`` or ``"hadamard"`` (of size head_dim).
    """

    r_res: bool = True
    s_res: bool = True
    r_ov: bool = True
    s_ov: bool = True
    s_qk: bool = True
    qk_hadamard: bool = True
    s_up_down: bool = True
    down_hadamard: bool = True
    r_res_init: str = "womi"
    r_ov_init: str = "identity"
    seed: int = 0

    def __post_init__(self):
        if self.r_res_init not in R_RES_INITS:
            raise ValueError(f"TransformConfig.r_res_init must be one of {R_RES_INITS}, "
                             f"got {self.r_res_init!r}")
        if self.r_ov_init not in R_OV_INITS:
            raise ValueError(f"TransformConfig.r_ov_init must be one of {R_OV_INITS}, "
                             f"got {self.r_ov_init!r}")

    @classmethod
    def none(cls, **kw) -> "TransformConfig":
        """All pairs off (the identity transform)."""
        return cls(**{**{p: False for p in PAIR_NAMES}, **kw})

    @classmethod
    def only(cls, *names: str, **kw) -> "TransformConfig":
        """Only the named pairs on (e.g. ``TransformConfig.only("s_qk")``)."""
        bad = [n for n in names if n not in PAIR_NAMES]
        if bad:
            raise ValueError(f"unknown pair(s) {bad}; choose from {PAIR_NAMES}")
        return cls(**{**{p: p in names for p in PAIR_NAMES}, **kw})

    @property
    def enabled(self) -> List[str]:
        """Names of the pairs that are on."""
        return [p for p in PAIR_NAMES if getattr(self, p)]

    def replace(self, **kw) -> "TransformConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        """Plain dict (for checkpoints); inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformConfig":
        """Rebuild from :meth:`to_dict` output (unknown keys are ignored)."""
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


def _stiefel_param(init: torch.Tensor):
    import geoopt

    return geoopt.ManifoldParameter(init.contiguous(), manifold=geoopt.Stiefel())


def _random_orthogonal(shape, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrices (float64) of ``shape[-2:] = (n, n)`` via QR."""
    a = torch.randn(*shape, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def _plain(p: torch.Tensor) -> torch.Tensor:
    """A ManifoldParameter as a plain tensor (differentiable alias): keeps geoopt's tensor
    subclass out of the transform math."""
    return p.as_subclass(torch.Tensor)


class LayerPairs(nn.Module):
    """The per-decoder-layer tensors of :class:`OSTParams` (disabled pairs are ``None``).

    Attributes: ``log_s_attn``, ``log_s_ffn`` [d]; ``r_ov`` [Hkv, hd, hd] (Stiefel);
    ``log_s_ov`` [Hkv, hd]; ``log_s_qk`` [Hkv, rotary_dim/2 + head_dim - rotary_dim];
    ``log_s_up_down`` [intermediate].
    """

    def __init__(self, hidden: int, inter: int, kv_heads: int, head_dim: int, qk_free: int,
                 config: TransformConfig):
        super().__init__()

        def scale(flag, *shape):
            return nn.Parameter(torch.zeros(*shape)) if flag else None

        self.log_s_attn = scale(config.s_res, hidden)
        self.log_s_ffn = scale(config.s_res, hidden)
        if config.r_ov:
            if config.r_ov_init == "hadamard":
                from .womi import hadamard_rotation
                r0 = hadamard_rotation(head_dim).float()
            else:
                r0 = torch.eye(head_dim)
            self.r_ov = _stiefel_param(r0.expand(kv_heads, head_dim, head_dim).clone())
        else:
            self.register_parameter("r_ov", None)
        self.log_s_ov = scale(config.s_ov, kv_heads, head_dim)
        self.log_s_qk = scale(config.s_qk, kv_heads, qk_free)
        self.log_s_up_down = scale(config.s_up_down, inter)


class OSTParams(nn.Module):
    """All learnable tensors of the equivalent transformation pairs of one model.

    Build it from the model (needed for ``r_res_init="womi"``) or from its adapter::

        params = OSTParams(model, TransformConfig())          # WOMI-initialized R_res
        opt = geoopt.optim.RiemannianAdam([
            {"params": params.orthogonal_parameters(), "lr": lr_rot},
            {"params": params.scaling_parameters(), "lr": lr_scale}])

    Every scaling starts at 1 (log-scale 0) and ``R_ov`` at the identity (or Hadamard), so a
    fresh ``OSTParams`` changes the model only by ``R_res``. The accessors (:meth:`rotation`,
    :meth:`norm_scale`, ...) return dense factors in a requested dtype, differentiably, or
    ``None`` where the pair is off; :mod:`~.fuse` and :mod:`~.model` build weights from them.

    Args:
        model_or_adapter: a supported ``*ForCausalLM`` model, or its
            :class:`~ostquant.models.adapters.ModelAdapter`.
        config: which pairs exist (tensors of disabled pairs are not created).
        r_res: optional initial value of ``R_res`` (overrides ``config.r_res_init``).
    """

    def __init__(self, model_or_adapter, config: Optional[TransformConfig] = None,
                 r_res: Optional[torch.Tensor] = None):
        super().__init__()
        from ostquant.models.adapters import ModelAdapter, get_adapter

        config = config or TransformConfig()
        if isinstance(model_or_adapter, ModelAdapter):
            adapter, model = model_or_adapter, None
        else:
            adapter, model = get_adapter(model_or_adapter), model_or_adapter
        self.config = config
        self.hidden_size = adapter.hidden_size
        self.intermediate_size = adapter.intermediate_size
        self.num_layers = adapter.num_layers
        self.num_heads = adapter.num_heads
        self.num_kv_heads = adapter.num_kv_heads
        self.head_dim = adapter.head_dim
        self.rotary_dim = adapter.rope.rotary_dim
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and <= head_dim")
        qk_free = self.rotary_dim // 2 + (self.head_dim - self.rotary_dim)

        if config.r_res:
            if r_res is None:
                from .womi import init_residual_rotation
                r_res = init_residual_rotation(config.r_res_init, self.hidden_size, model=model,
                                               seed=config.seed)
            if tuple(r_res.shape) != (self.hidden_size, self.hidden_size):
                raise ValueError(f"r_res must be {self.hidden_size}x{self.hidden_size}, "
                                 f"got {tuple(r_res.shape)}")
            self.r_res = _stiefel_param(r_res.detach().float().clone())
        else:
            if r_res is not None:
                raise ValueError("r_res given but TransformConfig.r_res is off")
            self.register_parameter("r_res", None)
        self.layers = nn.ModuleList(
            LayerPairs(self.hidden_size, self.intermediate_size, self.num_kv_heads,
                       self.head_dim, qk_free, config) for _ in range(self.num_layers))

    # ------------------------------------------------------------------ parameter groups
    def orthogonal_parameters(self) -> List[nn.Parameter]:
        """The Stiefel-manifold parameters (R_res, R_ov): the rotation learning-rate group."""
        import geoopt

        return [p for p in self.parameters() if isinstance(p, geoopt.ManifoldParameter)]

    def scaling_parameters(self) -> List[nn.Parameter]:
        """The log-scale parameters (S_attn, S_ffn, S_ov, S_qk, S_up|down)."""
        import geoopt

        return [p for p in self.parameters() if not isinstance(p, geoopt.ManifoldParameter)]

    # ------------------------------------------------------------------ dense factors
    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def rotation(self, dtype=torch.float32) -> Optional[torch.Tensor]:
        """``R_res`` [d, d] in ``dtype`` (None if off)."""
        return None if self.r_res is None else _plain(self.r_res).to(dtype)

    def norm_scale(self, layer: int, which: str, dtype=torch.float32) -> Optional[torch.Tensor]:
        """``s`` [d] of S_attn (``which="attn"``) or S_ffn (``"ffn"``) of a layer (None if off)."""
        p = getattr(self.layers[layer], {"attn": "log_s_attn", "ffn": "log_s_ffn"}[which])
        return None if p is None else torch.exp(p.to(dtype))

    def ov_factors(self, layer: int, dtype=torch.float32):
        """``(T, T⁻ᵀ)``, each [Hkv, hd, hd], with ``T_g = R_g·diag(s_g)`` (None if both off).

        ``T⁻ᵀ = R_g·diag(1/s_g)`` (R_g orthogonal).
        """
        lp = self.layers[layer]
        if lp.r_ov is None and lp.log_s_ov is None:
            return None
        if lp.r_ov is not None:
            r = _plain(lp.r_ov).to(dtype)
        else:
            r = torch.eye(self.head_dim, dtype=dtype, device=lp.log_s_ov.device).expand(
                self.num_kv_heads, self.head_dim, self.head_dim)
        if lp.log_s_ov is None:
            return r, r
        s = torch.exp(lp.log_s_ov.to(dtype)).unsqueeze(-2)  # scales columns
        return r * s, r / s

    def qk_scale(self, layer: int, dtype=torch.float32) -> Optional[torch.Tensor]:
        """S_qk expanded to every channel: [Hkv, head_dim] (None if off).

        Channels ``i`` and ``i + rotary_dim/2`` share a factor; non-rotary channels
        (``>= rotary_dim``) have their own.
        """
        p = self.layers[layer].log_s_qk
        if p is None:
            return None
        half = self.rotary_dim // 2
        s = torch.exp(p.to(dtype))
        return torch.cat([s[:, :half], s[:, :half], s[:, half:]], dim=-1)

    def up_down_scale(self, layer: int, dtype=torch.float32) -> Optional[torch.Tensor]:
        """S_up|down ``s`` [intermediate] (None if off)."""
        p = self.layers[layer].log_s_up_down
        return None if p is None else torch.exp(p.to(dtype))

    # ------------------------------------------------------------------ utilities
    @torch.no_grad()
    def randomize_(self, seed: int = 0, scale_std: float = 0.5) -> "OSTParams":
        """Set every tensor to a random non-identity value (tests of exactness): Haar-random
        orthogonal matrices (QR, generated in float64 then stored in the parameters' dtype)
        and scalings ``exp(N(0, scale_std²))``. Returns ``self``."""
        g = torch.Generator().manual_seed(seed)
        orth = {id(p) for p in self.orthogonal_parameters()}
        for p in self.parameters():
            if id(p) in orth:
                new = _random_orthogonal(p.shape, g)
            else:
                new = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale_std
            p.copy_(new.to(p.dtype))
        return self

    @torch.no_grad()
    def orthogonalize_(self) -> "OSTParams":
        """Project every orthogonal parameter back onto the orthogonal group (polar factor
        ``U·Vᵀ`` of its SVD, computed in float64) — removes the drift of float32 training."""
        for p in self.orthogonal_parameters():
            u, _, vh = torch.linalg.svd(p.double())
            p.copy_((u @ vh).to(p.dtype))
        return self

    def max_orthogonality_error(self) -> float:
        """``max |RᵀR − I|`` over every orthogonal parameter (0.0 if there are none)."""
        err = 0.0
        with torch.no_grad():
            for p in self.orthogonal_parameters():
                q = p.double()
                eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
                err = max(err, float((q.transpose(-1, -2) @ q - eye).abs().max()))
        return err

    def describe(self) -> Dict[str, int]:
        """Number of learnable values per pair kind (for logs)."""
        out: Dict[str, int] = {}
        for name, p in self.named_parameters():
            key = name.split(".")[-1]
            out[key] = out.get(key, 0) + p.numel()
        return out

    def extra_repr(self) -> str:
        return (f"pairs={self.config.enabled}, hidden={self.hidden_size}, "
                f"layers={self.num_layers}, heads={self.num_heads}/{self.num_kv_heads}, "
                f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}")


def log_scale_of(s: torch.Tensor) -> torch.Tensor:
    """The log-scale parameter value for a (positive) scaling ``s``."""
    if bool((s <= 0).any()):
        raise ValueError("scalings must be positive")
    return torch.log(s)


__all__ = ["PAIR_NAMES", "R_RES_INITS", "R_OV_INITS", "TransformConfig", "LayerPairs",
           "OSTParams", "log_scale_of"]
