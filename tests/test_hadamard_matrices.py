"""Tests for ostquant.transforms.hadamard_matrices (CPU only, fast)."""

import pytest
import torch

from ostquant.transforms.hadamard_matrices import (
    SUPPORTED_K,
    hadamard_factor,
    hadamard_matrix,
)


def _assert_hadamard(h: torch.Tensor, k: int) -> None:
    assert h.shape == (k, k)
    assert h.dtype == torch.float64
    assert h.device.type == "cpu"
    assert torch.all(h.abs() == 1), "entries must be +-1"
    # Integer-valued float64 products with |entries| <= k are exact.
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64))


def test_supported_k_value():
    assert SUPPORTED_K == (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)


@pytest.mark.parametrize("k", SUPPORTED_K)
def test_base_orders_are_hadamard(k):
    _assert_hadamard(hadamard_matrix(k), k)


@pytest.mark.parametrize("k", [1, 2, 4, 8, 64, 256])
def test_powers_of_two_are_sylvester(k):
    h = hadamard_matrix(k)
    _assert_hadamard(h, k)
    assert torch.all(h[0] == 1) and torch.all(h[:, 0] == 1)


def test_sylvester_convention():
    assert torch.equal(hadamard_matrix(1), torch.ones(1, 1, dtype=torch.float64))
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    assert torch.equal(hadamard_matrix(2), h2)
    assert torch.equal(hadamard_matrix(4), torch.kron(h2, h2))


@pytest.mark.parametrize("n", [24, 80, 576, 1120])
def test_composite_orders_follow_kron_convention(n):
    k, m = hadamard_factor(n)
    h = hadamard_matrix(n)
    _assert_hadamard(h, n)
    assert torch.equal(h, torch.kron(hadamard_matrix(k), hadamard_matrix(m)))


def test_576_is_orthogonal_after_scaling():
    h = hadamard_matrix(576) / 24.0
    assert torch.allclose(h @ h.T, torch.eye(576, dtype=torch.float64), atol=1e-12)


def test_returns_independent_copies():
    a = hadamard_matrix(12)
    a.zero_()
    _assert_hadamard(hadamard_matrix(12), 12)


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, (1, 1)),
        (2, (1, 2)),
        (4096, (1, 4096)),
        (576, (36, 16)),
        (11008, (172, 64)),
        (14336, (28, 512)),
        (13824, (108, 128)),
        (1536, (12, 128)),
        (12, (12, 1)),
        (40, (20, 2)),
        (156 * 8, (156, 8)),
        (140 * 32, (140, 32)),
        (52 * 4, (52, 4)),
        (60, (60, 1)),
    ],
)
def test_hadamard_factor(n, expected):
    assert hadamard_factor(n) == expected


@pytest.mark.parametrize("n", [576 * 7, 0, -4, -576, 3, 264, 44])
def test_hadamard_factor_rejects(n):
    with pytest.raises(ValueError, match="supported sizes") as info:
        hadamard_factor(n)
    assert str(n) in str(info.value)


@pytest.mark.parametrize("n", [576 * 7, 0, -8, 3, 44, 100])
def test_hadamard_matrix_rejects(n):
    with pytest.raises(ValueError, match="supported sizes") as info:
        hadamard_matrix(n)
    assert str(n) in str(info.value)
    assert "172" in str(info.value)


def test_hadamard_matrix_rejects_too_large_and_non_integers():
    with pytest.raises(ValueError, match="maximum"):
        hadamard_matrix(2**16)
    with pytest.raises(ValueError):
        hadamard_matrix(12.0)
    with pytest.raises(ValueError):
        hadamard_factor("12")
