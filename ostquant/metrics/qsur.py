"""Quantization Space Utilization Rate (QSUR), OSTQuant (arXiv 2501.13987) §3 / Definition 1.

QSUR measures how much of the quantization space a set of d-dimensional vectors actually
fills. The rows of ``x`` [N, d] are the samples (tokens for activations, output channels for
a weight [out, in]), the columns are the d coordinates that share **one** quantization range.
That shared range is exactly what per-token activation quantization (and per-output-channel
weight quantization) does: every coordinate of a vector is quantized with the same step, so
the quantization space is a d-dimensional *hypercube* whose edge is the largest range over
all coordinates (the paper's Definition 1). There is a single hypercube for the whole sample
set — the one that covers the data's confidence ellipsoid.

Definition implemented (paper eqs. 1, 2, 5; ``method="exact"``, the default)
------------------------------------------------------------------------------
The data are modelled as Gaussian, ``X ~ N(μ, Σ)`` with ``Σ = QΛQᵀ`` (sample mean and sample
covariance, float64). At confidence ``α`` (default 0.99) let ``c = χ²_d(α)`` (chi-square
quantile, d degrees of freedom). The data occupy the ellipsoid
``E = {v : (v−μ)ᵀ Σ⁻¹ (v−μ) ≤ c}`` of volume (eq. 2)

    V_X = π^(d/2) / Γ(d/2+1) · c^(d/2) · sqrt(det Σ)

Its extreme value along coordinate j is ``μ_j ± sqrt(c·Σ_jj)``, so the quantization hypercube
(eq. 5) has edge ``L = max_j(μ_j + sqrt(c·Σ_jj)) − min_j(μ_j − sqrt(c·Σ_jj))`` and

    QSUR = V_X / L^d                                                               (eq. 1)

Assumption: eqs. 3–4 of the paper take the extreme coordinates from the end point of the
longest principal axis, ``±sqrt(c·λ₁)·q₁ + μ``. That point lies on the ellipsoid but is not
its extreme coordinate, so the resulting "hypercube" does not contain the ellipsoid and the
ratio is not bounded by 1 nor by the paper's own maximum (eq. 28). We use the exact extreme
coordinates ``sqrt(c·Σ_jj)`` (= ``max_{v∈E} v_j − μ_j``) instead; this is what the paper itself
uses for the isotropic case in its Appendix A.2.3 (a ball of radius sqrt(c) in a cube of edge
2·sqrt(c)), and it makes the paper's claims hold exactly:

* ``QSUR ≤ π^(d/2) / (Γ(d/2+1)·2^d)`` (eq. 28, :func:`log_qsur_max`), by Hadamard's inequality
  ``det Σ ≤ Π_j Σ_jj ≤ (max_j Σ_jj)^d`` and ``L ≥ 2·max_j sqrt(c·Σ_jj)``;
* equality iff ``Σ ∝ I`` and all ``μ_j`` are equal, i.e. after the optimal transform
  ``T = c'·Λ^(−1/2)·Qᵀ`` of eq. 8 applied to zero-mean data;
* rotations keep ``det Σ`` and change only the hypercube: a rotation that evens out the
  channel variances (e.g. a Hadamard transform of data with an outlier channel) raises QSUR.

The chi-square constant: with ``use_mean=False`` (μ neglected, as in the paper's simplified
eq. 7) ``c^(d/2)`` appears in numerator and denominator and **cancels exactly**, so QSUR does
not depend on ``α`` and ``QSUR = π^(d/2)/Γ(d/2+1) · sqrt(det Σ) / (2·max_j sqrt(Σ_jj))^d``.
With the mean included (default) ``α`` only sets how large the mean offset is relative to the
spread (``c ≈ d`` for large d, so for d in the thousands the mean matters little unless it is
large compared with the standard deviations).

``method="eq7"`` evaluates the paper's simplified formula literally (μ neglected, only the
largest principal axis):

    QSUR_eq7 = π^(d/2)/Γ(d/2+1) · sqrt(Π_i λ_i) / (2^d · (sqrt(λ₁)·max_j |q₁_j|)^d)   (eq. 7)

It is offered to reproduce the paper's analysis; it is ill-defined when λ₁ is degenerate
(e.g. whitened data) and, as noted above, can exceed eq. 28.

Numerics
--------
All statistics are computed in float64 and QSUR is returned in log space: for d = 4096 the
volume ratio is around ``exp(−5000)`` or smaller and underflows any float. :func:`qsur` returns
``exp(log_qsur)`` as a Python float, which is 0.0 for large d — compare :func:`log_qsur` values
(or the per-dimension form ``log_qsur/d``) instead. A singular covariance (fewer independent
directions than d, e.g. a constant channel) has zero ellipsoid volume: ``log_qsur = -inf``.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable, Optional

import torch

__all__ = ["log_qsur", "qsur", "log_qsur_max", "log_qsur_from_stats", "log_qsur_batches",
           "QSURAccumulator", "chi2_quantile"]

_METHODS = ("exact", "eq7")


# ---------------------------------------------------------------------------------- helpers
def _log_unit_ball_volume(d: int) -> float:
    """log of the volume of the unit d-ball, π^(d/2) / Γ(d/2+1)."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)


def log_qsur_max(d: int) -> float:
    """log of the largest possible QSUR in d dimensions (paper eq. 28).

    ``π^(d/2) / (Γ(d/2+1)·2^d)``: a ball inscribed in its bounding cube. The chi-square
    constant cancels (see the module docstring), so no extra factor applies.
    """
    if int(d) != d or d < 1:
        raise ValueError(f"log_qsur_max: d must be a positive integer, got {d!r}")
    d = int(d)
    return _log_unit_ball_volume(d) - d * math.log(2.0)


@lru_cache(maxsize=256)
def chi2_quantile(d: int, alpha: float) -> float:
    """``χ²_d(α)``: the α-quantile of the chi-square distribution with d degrees of freedom.

    Solved by bisection on the regularized lower incomplete gamma function
    ``P(d/2, x/2) = α`` (``torch.special.gammainc``, float64), to ~1e-12 relative accuracy.
    """
    if int(d) != d or d < 1:
        raise ValueError(f"chi2_quantile: d must be a positive integer, got {d!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"chi2_quantile: alpha must be in (0, 1), got {alpha!r}")
    a = torch.tensor(0.5 * d, dtype=torch.float64)

    def cdf(x: float) -> float:
        return float(torch.special.gammainc(a, torch.tensor(0.5 * x, dtype=torch.float64)))

    lo, hi = 0.0, d + 10.0 * math.sqrt(2.0 * d) + 50.0
    while cdf(hi) < alpha:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cdf(mid) < alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def _check_alpha_method(alpha: float, method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"QSUR: method must be one of {_METHODS}, got {method!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):
        raise ValueError(f"QSUR: alpha (confidence level) must be in (0, 1), got {alpha!r}")


def _as_samples(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Validate and reshape ``x`` [..., d] into float64 samples [N, d]."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"QSUR: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"QSUR: {name} must have shape [N, d] (samples × dimensions) or "
                         f"[..., d]; got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if x.is_complex() or not (x.is_floating_point() or x.dtype in
                              (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"QSUR: {name} must be a real tensor, got dtype {x.dtype}")
    d = x.shape[-1]
    if d < 1:
        raise ValueError(f"QSUR: {name} has no dimensions (last dim is 0)")
    x = x.detach().reshape(-1, d).to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"QSUR: {name} contains NaN or Inf values")
    return x


# ---------------------------------------------------------------------------------- core
def log_qsur_from_stats(mean: Optional[torch.Tensor], cov: torch.Tensor, alpha: float = 0.99,
                        method: str = "exact") -> float:
    """log QSUR of the Gaussian ``N(mean, cov)`` (see the module docstring).

    ``mean`` [d] may be None (treated as 0, the paper's "μ neglected" simplification); ``cov``
    [d, d] must be symmetric positive semi-definite. Returns ``-inf`` for a singular ``cov``.
    """
    _check_alpha_method(alpha, method)
    if not isinstance(cov, torch.Tensor) or cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        shape = tuple(cov.shape) if isinstance(cov, torch.Tensor) else type(cov).__name__
        raise ValueError(f"QSUR: cov must be a square [d, d] tensor, got {shape}")
    d = cov.shape[0]
    if d < 1:
        raise ValueError("QSUR: cov is empty (d = 0)")
    cov = cov.detach().to(torch.float64)
    if not bool(torch.isfinite(cov).all()):
        raise ValueError("QSUR: cov contains NaN or Inf values")
    cov = 0.5 * (cov + cov.T)
    if mean is not None:
        if not isinstance(mean, torch.Tensor) or tuple(mean.shape) != (d,):
            shape = tuple(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__
            raise ValueError(f"QSUR: mean must have shape ({d},) to match cov, got {shape}")
        mean = mean.detach().to(device=cov.device, dtype=torch.float64)
        if not bool(torch.isfinite(mean).all()):
            raise ValueError("QSUR: mean contains NaN or Inf values")

    var = torch.diagonal(cov).clamp(min=0.0)
    if float(var.max()) <= 0.0:
        raise ValueError("QSUR: the data have zero variance in every dimension; QSUR is "
                         "undefined (zero-volume data in a zero-volume hypercube)")

    if method == "eq7":
        evals, evecs = torch.linalg.eigh(cov)
    else:
        evals = torch.linalg.eigvalsh(cov)
    lam_max = float(evals[-1])
    # Numerical rank test (as numpy.linalg.matrix_rank): eigenvalues at round-off level of the
    # largest one mean the ellipsoid is flat in some direction -> zero volume.
    tol = lam_max * d * torch.finfo(torch.float64).eps
    if float(evals[0]) <= tol:
        return float("-inf")
    half_logdet = 0.5 * float(torch.log(evals).sum())
    log_ball = _log_unit_ball_volume(d)

    if method == "eq7":
        # Eq. 7: μ neglected, hypercube half-edge sqrt(λ1)·max|q1| (chi-square cancels).
        q1 = evecs[:, -1]
        half_edge = math.sqrt(lam_max) * float(q1.abs().max())
        return log_ball + half_logdet - d * math.log(2.0 * half_edge)

    c = chi2_quantile(d, float(alpha))
    if mean is None:
        # μ = 0: c^(d/2) cancels; edge = 2·max_j sqrt(Σ_jj).
        edge = 2.0 * math.sqrt(float(var.max()))
        return log_ball + half_logdet - d * math.log(edge)
    r = torch.sqrt(c * var)
    edge = float((mean + r).max() - (mean - r).min())
    return log_ball + 0.5 * d * math.log(c) + half_logdet - d * math.log(edge)


def log_qsur(x: torch.Tensor, alpha: float = 0.99, method: str = "exact",
             use_mean: bool = True) -> float:
    """log of the Quantization Space Utilization Rate of ``x`` (paper eqs. 1, 2, 5).

    Args:
        x: samples [N, d] (or [..., d], leading dims flattened): tokens × channels for
            activations, output channels × input channels for a weight. Needs ``N ≥ d + 1``
            so the sample covariance can be non-singular.
        alpha: confidence level of the data ellipsoid (paper: e.g. 0.99).
        method: ``"exact"`` (default; exact bounding hypercube of the ellipsoid) or ``"eq7"``
            (the paper's simplified eq. 7; ignores ``alpha`` and ``use_mean``).
        use_mean: include the sample mean μ (eq. 5/6); ``False`` neglects it as the paper's
            eq. 7 does, and then ``alpha`` cancels out.

    Returns:
        ``log QSUR`` as a Python float, ``≤ log_qsur_max(d)`` for ``method="exact"``;
        ``-inf`` if the sample covariance is singular.

    Raises:
        ValueError: ``x`` is not at least 2-D, has fewer than ``d + 1`` samples, contains
            NaN/Inf, or has zero variance everywhere; bad ``alpha``/``method``.
    """
    _check_alpha_method(alpha, method)
    xs = _as_samples(x)
    n, d = xs.shape
    if n < d + 1:
        raise ValueError(f"QSUR: need at least d + 1 = {d + 1} samples (rows) to estimate a "
                         f"non-singular {d}x{d} covariance, got {n}")
    mean = xs.mean(dim=0)
    xc = xs - mean
    cov = xc.T @ xc / (n - 1)
    return log_qsur_from_stats(mean if use_mean else None, cov, alpha, method)


def qsur(x: torch.Tensor, alpha: float = 0.99, method: str = "exact",
         use_mean: bool = True) -> float:
    """``exp(log_qsur(x, ...))``. Underflows to 0.0 for large d (≳ 200): compare logs there."""
    return math.exp(log_qsur(x, alpha, method, use_mean))


# ---------------------------------------------------------------------------------- batches
class QSURAccumulator:
    """Streaming mean/covariance (float64, Chan et al. pairwise update) for QSUR.

    ``add(x)`` accepts batches [..., d] (e.g. the inputs a hooked Linear sees on each forward);
    ``log_qsur()`` evaluates QSUR of everything added so far. Numerically stable: batches are
    centred on their own mean before being merged.
    """

    def __init__(self):
        self.n = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None  # Σ (x-mean)(x-mean)ᵀ

    @property
    def dim(self) -> Optional[int]:
        return None if self.mean is None else self.mean.shape[0]

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> "QSURAccumulator":
        xs = _as_samples(x, "batch")
        nb, d = xs.shape
        if nb == 0:
            return self
        if self.mean is not None and d != self.dim:
            raise ValueError(f"QSUR: batch has last dim {d}, earlier batches had {self.dim}")
        mb = xs.mean(dim=0)
        xc = xs - mb
        m2b = xc.T @ xc
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return self
        xs_dev = self.mean.device
        mb, m2b = mb.to(xs_dev), m2b.to(xs_dev)
        n = self.n + nb
        delta = mb - self.mean
        self.m2 = self.m2 + m2b + torch.outer(delta, delta) * (self.n * nb / n)
        self.mean = self.mean + delta * (nb / n)
        self.n = n
        return self

    def covariance(self) -> torch.Tensor:
        """Unbiased sample covariance [d, d] (float64)."""
        if self.mean is None or self.n < 2:
            raise ValueError("QSUR: need at least 2 samples to estimate a covariance")
        return self.m2 / (self.n - 1)

    def log_qsur(self, alpha: float = 0.99, method: str = "exact",
                 use_mean: bool = True) -> float:
        """log QSUR of all samples added so far (same definition as :func:`log_qsur`)."""
        _check_alpha_method(alpha, method)
        if self.mean is None:
            raise ValueError("QSUR: no samples were added")
        d = self.dim
        if self.n < d + 1:
            raise ValueError(f"QSUR: need at least d + 1 = {d + 1} samples (rows) to estimate "
                             f"a non-singular {d}x{d} covariance, got {self.n}")
        return log_qsur_from_stats(self.mean if use_mean else None, self.covariance(), alpha,
                                   method)


def log_qsur_batches(batches: Iterable[torch.Tensor], alpha: float = 0.99,
                     method: str = "exact", use_mean: bool = True) -> float:
    """log QSUR of the union of several activation batches (each [..., d]), streamed.

    Equal to ``log_qsur(torch.cat([b.reshape(-1, d) for b in batches]))`` up to round-off,
    without materialising the concatenation.
    """
    acc = QSURAccumulator()
    count = 0
    for b in batches:
        acc.add(b)
        count += 1
    if count == 0:
        raise ValueError("QSUR: log_qsur_batches got no batches")
    return acc.log_qsur(alpha, method, use_mean)
