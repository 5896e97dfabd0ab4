"""Hadamard rotations and the Weight Outlier Minimization Initialization (WOMI) of ``R_res``.

Conventions (row vectors, ``y = x·Wᵀ``): ``Ĥ = H/√n`` is the orthonormal Hadamard matrix of
:func:`~ostquant.transforms.hadamard_matrices.hadamard_matrix` and ``had(x) = x·Ĥᵀ`` is what
:func:`ostquant.ops.hadamard_transform` (with ``scale = n^-1/2``) computes. A residual rotation
``R`` maps the stream ``h ← h·R`` and every residual reader ``W ← W·R``.

WOMI (paper §4.2.3, with eq. 27's ``T = d^-1/2·H·Qᵀ``)
-------------------------------------------------------
Treat each row ``w`` (1×d) of every residual reader — q, k, v, gate, up of all layers, with
the RMSNorm weights folded in, i.e. exactly the matrices that will be quantized per output
channel — as a sample. Their second-moment matrix ``C = Σ wᵀw / N = Q·Λ·Qᵀ`` (eigenvectors
``Q``, eigenvalues ``λ`` descending). After the rotation a row is ``w·R``; choose

    ``R = Q·Ĥᵀ``      (so ``w·R = had(w·Q)``; the paper's ``O = H·Q_Wᵀ`` is ``Rᵀ``, the
                       same map written for column vectors).

Why: ``z = w·Q`` are the coordinates along the principal axes (``E[zᵀz] = Λ``, decorrelated);
``had`` then spreads every principal axis evenly over all d channels with weights ``±1/√d``.
The variance of output channel ``c`` becomes ``Σ_i λ_i·Ĥ[c,i]² = tr(C)/d`` — the same for
every channel — and the dominant direction ``q_1`` lands on a vector with all components
``±1/√d``, which minimizes the max-component term of QSUR (eq. 7) and hence the per-row
max-abs that sets the quantization step. With a plain Hadamard ``R = Ĥᵀ`` channel ``c`` gets
the variance ``ĥ_c·C·ĥ_cᵀ`` (``ĥ_c`` row c of Ĥ), equal across channels only when ``C`` is
diagonal; WOMI removes the correlations first. We use the uncentered second moment (weights are near zero-mean, and an offset shared
by all rows is an outlier too).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ostquant.ops.reference import fwht_pow2

from .hadamard_matrices import hadamard_factor, hadamard_matrix

_DENSE_POW2_MAX = 1024
_CACHE: Dict[Tuple[int, torch.dtype, str], torch.Tensor] = {}


def orthonormal_hadamard(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """The orthonormal Hadamard matrix ``Ĥ = H/√n`` [n, n] (``Ĥ·Ĥᵀ = I``), for n = K·2^k."""
    return (hadamard_matrix(n) / n ** 0.5).to(dtype=dtype, device=device)


def _cached(k: int, dtype, device) -> torch.Tensor:
    key = (k, dtype, str(device))
    h = _CACHE.get(key)
    if h is None:
        h = _CACHE[key] = hadamard_matrix(k).to(dtype=dtype, device=device)
    return h


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """``had(x) = x·Ĥᵀ`` over the last dim, in ``x``'s dtype, differentiable, any device.

    Same matrix as :func:`ostquant.ops.hadamard_transform` with ``scale = n^-1/2`` (which
    computes in float32 and is not meant for autograd); used for training and float64 tests.
    ``H = kron(H_K, H_m)``, so ``x·Hᵀ`` reshaped to [..., K, m] is ``H_K·X·H_mᵀ``.
    """
    n = x.shape[-1]
    k, m = hadamard_factor(n)
    dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    y = x.to(dt).reshape(*x.shape[:-1], k, m)
    if m <= _DENSE_POW2_MAX:
        y = torch.matmul(y, _cached(m, dt, x.device))  # Sylvester H_m is symmetric
    else:
        y = fwht_pow2(y)
    if k > 1:
        y = torch.matmul(_cached(k, dt, x.device), y)
    return (y.reshape(x.shape) * (n ** -0.5)).to(x.dtype)


def hadamard_rotation(n: int, dtype=torch.float64) -> torch.Tensor:
    """``R = Ĥᵀ`` [n, n], so that ``x·R = had(x)`` (QuaRot's fixed rotation)."""
    return orthonormal_hadamard(n, dtype).T.contiguous()


def random_hadamard_rotation(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """``R = D·Ĥᵀ`` with ``D`` a seeded random ±1 diagonal: ``x·R = had(x·D)`` (QuaRot-style)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return (d[:, None] * hadamard_rotation(n)).to(dtype)


def reader_weights(model: nn.Module, layers: Optional[Iterable[int]] = None
                   ) -> List[torch.Tensor]:
    """The residual readers' weights (q, k, v, gate, up per layer) with the RMSNorm weight that
    feeds them folded in (``W·diag(γ)``), as float32 copies — the matrices R_res acts on."""
    from ostquant.models.adapters import get_adapter

    adapter = get_adapter(model)
    all_layers = adapter.layers(model)
    idx = range(len(all_layers)) if layers is None else layers
    out = []
    with torch.no_grad():
        for i in idx:
            layer = all_layers[i]
            g_attn = _plain_weight(adapter.input_norm(layer)).float()
            g_ffn = _plain_weight(adapter.post_attn_norm(layer)).float()
            for role, g in (("q_proj", g_attn), ("k_proj", g_attn), ("v_proj", g_attn),
                            ("gate_proj", g_ffn), ("up_proj", g_ffn)):
                w = _plain_weight(adapter.proj(layer, role))
                out.append(w.float() * g)
    return out


def _plain_weight(mod: nn.Module) -> torch.Tensor:
    base = getattr(mod, "base", mod)  # a training-time wrapper keeps the original as .base
    return base.weight.detach()


def reader_second_moment(model: nn.Module) -> torch.Tensor:
    """``C = Σ wᵀw / N`` [d, d] (float64) over every row ``w`` of :func:`reader_weights`."""
    ws = reader_weights(model)
    d = ws[0].shape[1]
    c = torch.zeros(d, d, dtype=torch.float64, device=ws[0].device)
    n = 0
    for w in ws:
        c += (w.T @ w).double()
        n += w.shape[0]
    return c / n


def womi_rotation(model_or_moment, dtype=torch.float64) -> torch.Tensor:
    """WOMI's ``R = Q_W·Ĥᵀ`` (module docstring) from a model or a precomputed second moment.

    ``Q_W``: eigenvectors of the readers' second moment, sorted by descending eigenvalue, each
    with its sign fixed (largest-magnitude component positive) so the result is deterministic.
    """
    c = model_or_moment if isinstance(model_or_moment, torch.Tensor) else \
        reader_second_moment(model_or_moment)
    c = c.double().cpu()
    c = (c + c.T) / 2
    evals, q = torch.linalg.eigh(c)
    order = torch.argsort(evals, descending=True)
    q = q[:, order]
    idx = q.abs().argmax(dim=0)
    sign = torch.sign(q[idx, torch.arange(q.shape[1])])
    q = q * torch.where(sign == 0, torch.ones_like(sign), sign)
    return (q @ hadamard_rotation(c.shape[0])).to(dtype)


def init_residual_rotation(kind: str, d: int, model: Optional[nn.Module] = None,
                           seed: int = 0) -> torch.Tensor:
    """Initial ``R_res`` [d, d] (float64): ``"identity"``, ``"hadamard"`` (``Ĥᵀ``),
    ``"random_hadamard"`` (``D·Ĥᵀ``, seeded) or ``"womi"`` (needs ``model``)."""
    if kind == "identity":
        return torch.eye(d, dtype=torch.float64)
    if kind == "hadamard":
        return hadamard_rotation(d)
    if kind == "random_hadamard":
        return random_hadamard_rotation(d, seed)
    if kind == "womi":
        if model is None:
            raise ValueError("r_res_init='womi' needs the model's weights: build OSTParams "
                             "from the model, not from its adapter")
        return womi_rotation(model)
    raise ValueError(f"unknown R_res init {kind!r}; choose identity, hadamard, "
                     f"random_hadamard or womi")


@torch.no_grad()
def weight_outlier_stats(weights: Iterable[torch.Tensor], r: Optional[torch.Tensor] = None,
                         bits: int = 4) -> Dict[str, float]:
    """How quantization-friendly the rows of ``weights`` (rotated by ``r``) are.

    Returns ``max_abs`` (largest |w| over all), ``max_over_rms`` (mean over rows of
    max|w| / rms(w), the per-channel outlier ratio), and ``quant_err`` (Σ‖W − Q(W)‖² / Σ‖W‖²
    for symmetric per-row RTN at ``bits``, no clipping). Rotations preserve ‖W‖, so the
    numbers compare directly across choices of ``r``.
    """
    from ostquant.quant.fake import fake_quant

    mx, ratio, rows, err, tot = 0.0, 0.0, 0, 0.0, 0.0
    for w in weights:
        w = w.float()
        if r is not None:
            w = w @ r.to(w)
        a = w.abs().amax(dim=1)
        rms = w.pow(2).mean(dim=1).sqrt().clamp_min(1e-30)
        mx = max(mx, float(a.max()))
        ratio += float((a / rms).sum())
        rows += w.shape[0]
        err += float((fake_quant(w, bits, sym=True, ste=False) - w).pow(2).sum())
        tot += float(w.pow(2).sum())
    return {"max_abs": mx, "max_over_rms": ratio / max(rows, 1), "quant_err": err / tot}


__all__ = ["orthonormal_hadamard", "hadamard_rotate", "hadamard_rotation",
           "random_hadamard_rotation", "reader_weights", "reader_second_moment",
           "womi_rotation", "init_residual_rotation", "weight_outlier_stats"]
