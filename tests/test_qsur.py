"""QSUR (OSTQuant eqs. 1, 2, 5, 7, 8, 28)."""
import math

import pytest
import torch

from ostquant.metrics.qsur import (QSURAccumulator, chi2_quantile, log_qsur, log_qsur_batches,
                                   log_qsur_from_stats, log_qsur_max, qsur)
from ostquant.ops import hadamard_transform


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


D = 32
N = 4096


def _correlated(n=N, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    # Spread-out spectrum: Σ = A Aᵀ with A having decaying singular values.
    u, _, v = torch.linalg.svd(a)
    s = torch.logspace(0, -1.5, d, dtype=torch.float64)
    a = u @ torch.diag(s) @ v
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ a.T


def _random_rotation(d, seed=1):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _whiten(x, c=3.0):
    """The paper's optimal transform T = c·Λ^(-1/2)·Qᵀ (eq. 8), applied to rows: x Tᵀ."""
    xc = x - x.mean(0)
    lam, q = torch.linalg.eigh(xc.T @ xc / (x.shape[0] - 1))
    t = c * torch.diag(lam.rsqrt()) @ q.T
    return x @ t.T


def test_scale_invariance():
    x = _correlated()
    ref = log_qsur(x)
    for s in (1e-3, 0.5, 7.0, -2.0, 1e4):
        assert log_qsur(x * s) == pytest.approx(ref, abs=1e-8)
    assert log_qsur(x.float()) == pytest.approx(ref, abs=1e-3)


def test_whitening_is_optimal():
    x = _correlated()
    white = _whiten(x)
    raw, rot, wht = log_qsur(x), log_qsur(x @ _random_rotation(D).T), log_qsur(white)
    assert wht > raw and wht > rot
    bound = log_qsur_max(D)
    assert wht <= bound + 1e-9
    # μ neglected: the whitened sample covariance is exactly c²·I -> the bound is attained.
    assert log_qsur(white, use_mean=False) == pytest.approx(bound, abs=1e-9)
    # With the (small, sample-noise) mean included it is still very close.
    assert wht > bound - 0.5


def test_bound_respected():
    bound = log_qsur_max(D)
    g = torch.Generator().manual_seed(3)
    cases = [_correlated(), torch.randn(N, D, generator=g, dtype=torch.float64) + 5.0,
             torch.randn(N, D, generator=g) * torch.linspace(0.1, 10, D)]
    for x in cases:
        for use_mean in (True, False):
            assert log_qsur(x, use_mean=use_mean) <= bound + 1e-9
    # eq. 28 closed form for d = 2: π/4.
    assert math.exp(log_qsur_max(2)) == pytest.approx(math.pi / 4)


def test_hadamard_on_outlier_channel_increases_qsur():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(N, D, generator=g)
    x[:, 5] *= 30.0  # one outlier channel
    y = hadamard_transform(x, D ** -0.5)
    for method in ("exact", "eq7"):
        assert log_qsur(y, method=method) > log_qsur(x, method=method) + 1.0


def test_eq7_is_not_bounded():
    # The paper's simplified eq. 7 takes the hypercube from the major axis' end point only, so
    # for (near-)isotropic data it exceeds the paper's own maximum (eq. 28); "exact" does not.
    white = _whiten(_correlated())
    assert log_qsur(white, method="eq7") > log_qsur_max(D)
    assert log_qsur(white, method="exact") <= log_qsur_max(D) + 1e-9


def test_chi2_constant_cancels_without_mean():
    x = _correlated()
    a = log_qsur(x, alpha=0.9, use_mean=False)
    b = log_qsur(x, alpha=0.999, use_mean=False)
    assert a == pytest.approx(b, abs=1e-12)
    # With a mean, alpha matters (the mean offset is compared against the ellipsoid's extent).
    xm = x + torch.linspace(-1, 1, D, dtype=torch.float64)
    assert log_qsur(xm, alpha=0.9) != pytest.approx(log_qsur(xm, alpha=0.999), abs=1e-6)
    # A mean shift never increases QSUR (translation only enlarges the hypercube).
    assert log_qsur(xm) < log_qsur(x)


def test_closed_form_small():
    # d = 2, Σ = diag(4, 1), μ = 0: QSUR = π·sqrt(4·1) / (2·2)^2 = π/8.
    cov = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    assert math.exp(log_qsur_from_stats(None, cov)) == pytest.approx(math.pi / 8)
    # with a mean: edge = max(μ+r) − min(μ−r), volume π·c·2.
    c = chi2_quantile(2, 0.99)
    mu = torch.tensor([1.0, -1.0], dtype=torch.float64)
    r = torch.tensor([2.0, 1.0], dtype=torch.float64) * math.sqrt(c)
    edge = float((mu + r).max() - (mu - r).min())
    expect = math.pi * c * 2.0 / edge ** 2
    assert math.exp(log_qsur_from_stats(mu, cov)) == pytest.approx(expect)
    # eq. 7 for this Σ: λ1 = 4, q1 = e1 -> π·2 / (4·2²) = π/8 as well.
    assert math.exp(log_qsur_from_stats(None, cov, method="eq7")) == pytest.approx(math.pi / 8)


def test_chi2_quantile():
    assert chi2_quantile(2, 0.99) == pytest.approx(-2 * math.log(0.01), rel=1e-10)
    scipy_stats = pytest.importorskip("scipy.stats")
    for d in (1, 7, 64, 4096):
        assert chi2_quantile(d, 0.99) == pytest.approx(scipy_stats.chi2.ppf(0.99, d), rel=1e-9)


def test_large_d_log_space():
    d = 256
    g = torch.Generator().manual_seed(5)
    x = torch.randn(d + 100, d, generator=g)
    x[:, 0] *= 100.0
    lq = log_qsur(x)
    assert math.isfinite(lq) and lq < -1000 and lq <= log_qsur_max(d)
    assert qsur(x) == 0.0  # exp underflows, as documented; the log is still exact
    assert log_qsur_max(4096) < -5000


def test_qsur_exp_and_batches():
    x = _correlated(n=600)
    assert qsur(x) == pytest.approx(math.exp(log_qsur(x)))
    batches = [x[:99], x[99:100], x[100:450].reshape(7, 50, D), x[450:]]
    assert log_qsur_batches(batches) == pytest.approx(log_qsur(x), abs=1e-9)
    acc = QSURAccumulator()
    for b in batches:
        acc.add(b)
    assert acc.n == 600
    assert acc.log_qsur(use_mean=False) == pytest.approx(log_qsur(x, use_mean=False), abs=1e-9)
    # [..., d] inputs are flattened.
    assert log_qsur(x.reshape(2, 300, D)) == pytest.approx(log_qsur(x), abs=1e-12)


def test_singular_covariance_is_minus_inf():
    x = torch.randn(200, 8)
    x[:, 3] = 1.0  # constant channel: flat ellipsoid
    assert log_qsur(x) == float("-inf")
    assert qsur(x) == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        log_qsur(torch.randn(100))
    with pytest.raises(ValueError, match="d \\+ 1"):
        log_qsur(torch.randn(8, 8))
    bad = torch.randn(100, 4)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        log_qsur(bad)
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        log_qsur(bad)
    with pytest.raises(ValueError, match="zero variance"):
        log_qsur(torch.ones(100, 4))
    with pytest.raises(ValueError, match="alpha"):
        log_qsur(torch.randn(100, 4), alpha=1.0)
    with pytest.raises(ValueError, match="method"):
        log_qsur(torch.randn(100, 4), method="nope")
    with pytest.raises(ValueError, match="no batches"):
        log_qsur_batches([])
    acc = QSURAccumulator().add(torch.randn(10, 4))
    with pytest.raises(ValueError, match="last dim"):
        acc.add(torch.randn(10, 5))
