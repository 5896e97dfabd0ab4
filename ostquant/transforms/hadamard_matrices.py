"""Hadamard matrices for rotation-based 4-bit quantization (QuaRot / OSTQuant style).

A Hadamard matrix of order ``K`` is a ``K x K`` matrix ``H`` with entries in
``{+1, -1}`` such that ``H @ H.T == K * I``.  Hidden sizes of LLMs are usually of
the form ``n = K * 2**j`` with a small odd-ish factor ``K``; the online transform
for such an ``n`` is ``kron(H_K, H_{2**j})`` where ``H_{2**j}`` is a Sylvester
matrix (applied in practice with a fast butterfly) and ``H_K`` is one of the
small "base" matrices built here.

Every matrix in this module is *computed*; nothing is copied from other
projects.  The constructions are:

============  ==============================================================
order         construction
============  ==============================================================
``2**j``      Sylvester: ``H_1 = [1]``, ``H_{2m} = [[H_m, H_m], [H_m, -H_m]]``
12, 20, 28,   Paley I from GF(q), ``q = 3 (mod 4)``, order ``q + 1``
60, 108, 140  (q = 11, 19, 27, 59, 107, 139; GF(27) = GF(3)[x]/(f), deg f = 3)
36, 52        Paley II from GF(q), ``q = 1 (mod 4)``, order ``2 (q + 1)``
              (q = 17, 25; GF(25) = GF(5)[x]/(f), deg f = 2)
40            ``kron(H_20, H_2)``
156, 172      Williamson array with four symmetric circulant matrices of
              order 39 / 43 whose first rows were found by our own computer
              search (see ``_WILLIAMSON_SEEDS``)
============  ==============================================================

Every base matrix is verified (entries ``+-1`` and ``H @ H.T == K * I``,
checked exactly in integer arithmetic) the first time it is built.

Convention: for ``n = K * m`` (``m`` a power of two) the full transform matrix
is ``kron(H_K, H_m)``; row/column index ``i * m + j`` with ``i < K``, ``j < m``.
"""

from __future__ import annotations

import functools
import operator

import numpy as np
import torch

__all__ = ["SUPPORTED_K", "hadamard_matrix", "hadamard_factor"]

#: Non-power-of-two base orders ``K`` for which ``hadamard_matrix(K)`` exists.
SUPPORTED_K: tuple[int, ...] = (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)

# Largest order hadamard_matrix() will build (a 2**15 x 2**15 float64 matrix is
# 8 GiB already).  Matrices above _CACHE_MAX_ORDER are rebuilt on every call
# instead of being kept in the LRU cache.
_MAX_ORDER = 2**15
_CACHE_MAX_ORDER = 4096


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #
def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _supported_sizes_message() -> str:
    ks = ", ".join(str(k) for k in SUPPORTED_K)
    return (
        "supported sizes are n = K * 2**j with j >= 0 and K = 1 (plain power of two) "
        f"or K in {{{ks}}}"
    )


def _check_hadamard(h: np.ndarray, what: str) -> np.ndarray:
    """Exactly verify that the integer matrix ``h`` is Hadamard; return it."""
    k = h.shape[0]
    if h.shape != (k, k) or not np.all(np.abs(h) == 1):
        raise RuntimeError(f"{what}: matrix is not a square +-1 matrix")
    hi = h.astype(np.int64)
    if not np.array_equal(hi @ hi.T, k * np.eye(k, dtype=np.int64)):
        raise RuntimeError(f"{what}: H @ H.T != {k} * I")
    return hi


# --------------------------------------------------------------------------- #
# Sylvester (powers of two)
# --------------------------------------------------------------------------- #
def _sylvester(m: int) -> np.ndarray:
    """Sylvester-Hadamard matrix of order ``m`` (a power of two), as int8."""
    assert _is_power_of_two(m)
    h = np.ones((1, 1), dtype=np.int8)
    while h.shape[0] < m:
        h = np.block([[h, h], [h, -h]])
    return h


# --------------------------------------------------------------------------- #
# Finite fields GF(p**e) and their quadratic character
# --------------------------------------------------------------------------- #
def _prime_power(q: int) -> tuple[int, int]:
    """Return ``(p, e)`` with ``q == p**e``, ``p`` prime; raise if ``q`` is not one."""
    for p in range(2, q + 1):
        if q % p == 0:
            e = 0
            while q % p == 0:
                q //= p
                e += 1
            if q != 1:
                raise ValueError("not a prime power")
            return p, e
    raise ValueError("not a prime power")


def _gf_tables(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Subtraction table and quadratic character of GF(q).

    Elements are encoded as integers ``0..q-1`` whose base-``p`` digits are the
    coefficients of a polynomial over GF(p) (digit ``t`` = coefficient of
    ``x**t``); 0 encodes the zero element.  For ``e > 1`` multiplication is
    modulo the first monic polynomial of degree ``e`` (in lexicographic order of
    its coefficients) without roots in GF(p), which is irreducible because
    ``e <= 3`` here.

    Returns ``(sub, chi)`` where ``sub[a, b]`` encodes ``a - b`` and ``chi[a]``
    is 0 for ``a == 0``, +1 for a non-zero square and -1 otherwise.
    """
    p, e = _prime_power(q)
    digits = np.array([[(a // p**t) % p for t in range(e)] for a in range(q)], dtype=np.int64)
    weights = p ** np.arange(e, dtype=np.int64)
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    sub = diff @ weights

    if e == 1:
        squares = {(a * a) % p for a in range(1, p)}
    else:
        if e > 3:  # the "no root => irreducible" test below needs e <= 3
            raise NotImplementedError("GF(p**e) with e > 3 is not needed here")
        # Find a monic f = x**e + c_{e-1} x**(e-1) + ... + c_0 without roots.
        modulus = None
        for code in range(p**e):
            c = [(code // p**t) % p for t in range(e)]
            if all((x**e + sum(c[t] * x**t for t in range(e))) % p for x in range(p)):
                modulus = c
                break
        assert modulus is not None

        def mul(a: list[int], b: list[int]) -> tuple[int, ...]:
            prod = [0] * (2 * e - 1)
            for i, ai in enumerate(a):
                for j, bj in enumerate(b):
                    prod[i + j] = (prod[i + j] + ai * bj) % p
            for deg in range(2 * e - 2, e - 1, -1):  # reduce x**deg using f
                coef = prod[deg]
                if coef:
                    prod[deg] = 0
                    for t in range(e):
                        prod[deg - e + t] = (prod[deg - e + t] - coef * modulus[t]) % p
            return tuple(prod[:e])

        squares = set()
        for a in range(1, q):
            sq = mul(list(digits[a]), list(digits[a]))
            squares.add(int(sum(d * p**t for t, d in enumerate(sq))))

    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=np.int64)
    assert len(squares) == (q - 1) // 2
    return sub, chi


def _jacobsthal(q: int) -> np.ndarray:
    """Jacobsthal matrix ``Q[a, b] = chi(a - b)`` over GF(q) (q odd prime power)."""
    sub, chi = _gf_tables(q)
    return chi[sub]


# --------------------------------------------------------------------------- #
# Paley constructions
# --------------------------------------------------------------------------- #
def _paley1(q: int) -> np.ndarray:
    """Paley construction I: Hadamard matrix of order ``q + 1`` for ``q = 3 (mod 4)``.

    With the (skew-symmetric) Jacobsthal matrix ``Q`` and the all-ones column
    ``j``, ``S = [[0, j^T], [-j, Q]]`` is a skew conference matrix and
    ``H = I + S`` is Hadamard.
    """
    assert q % 4 == 3
    Q = _jacobsthal(q)
    S = np.zeros((q + 1, q + 1), dtype=np.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return np.eye(q + 1, dtype=np.int64) + S


def _paley2(q: int) -> np.ndarray:
    """Paley construction II: Hadamard matrix of order ``2 (q + 1)`` for ``q = 1 (mod 4)``.

    ``C = [[0, j^T], [j, Q]]`` is a symmetric conference matrix (``Q`` is the
    symmetric Jacobsthal matrix); each 0 of ``C`` is replaced by
    ``[[1, -1], [-1, -1]]`` and each ``+-1`` by ``+-[[1, 1], [1, -1]]``.
    """
    assert q % 4 == 1
    Q = _jacobsthal(q)
    C = np.zeros((q + 1, q + 1), dtype=np.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    plus = np.array([[1, 1], [1, -1]], dtype=np.int64)
    zero = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    return np.kron(C, plus) + np.kron(np.eye(q + 1, dtype=np.int64), zero)


# --------------------------------------------------------------------------- #
# Williamson construction (orders 156 = 4*39 and 172 = 4*43)
# --------------------------------------------------------------------------- #
# First rows (index 0..n-1, '+' = +1, '-' = -1) of four symmetric circulant
# matrices A, B, C, D of odd order n with A^2 + B^2 + C^2 + D^2 = 4n I.
#
# How they were found (one-off offline search with numpy, not part of the
# package): rows are symmetric (a_j = a_{n-j}) and normalised to a_0 = +1.
#   * n = 43: the rows were additionally required to be constant on the orbits
#     of the multiplicative subgroup {1, 6, 36, 42, 37, 7} = <-1, 6> of Z_43^*
#     (7 orbits of size 6 plus {0}), leaving 2**7 candidates per row.  All rows
#     with power spectral density |DFT_k|^2 <= 4n at every k were kept, and a
#     meet-in-the-middle match of PSD_A + PSD_B against 4n - PSD_C - PSD_D was
#     run for every decomposition 4n = a^2 + b^2 + c^2 + d^2 of the row sums
#     (< 1 s).  Row sums: -5, 7, 7, 7.
#   * n = 39: no solution has such extra symmetry, so the full symmetric space
#     (2**19 rows) was searched: PSD filter, row sums fixed by the sum-of-four-
#     odd-squares decomposition (sign forced by r = n mod 4), A restricted to
#     representatives of the multiplier action j -> s*j (s in Z_39^*), the
#     product condition a_j b_j c_j d_j = -1 (j >= 1) folded into the
#     meet-in-the-middle key together with the rounded PSD vectors, and every
#     key match re-checked exactly.  The first solution appeared after ~7 min
#     on 2 CPU cores.  Row sums: -5, -5, -5, -9.
# The module rebuilds the matrices from these rows and verifies the result.
_WILLIAMSON_SEEDS: dict[int, tuple[str, str, str, str]] = {
    39: (
        "+-++------++--+-+-++++-+-+--++------++-",
        "++--+++-+--++-+----------+-++--+-+++--+",
        "+---+--++++----+-+-++-+-+----++++--+---",
        "+---+---+-++-++----++----++-++-+---+---",
    ),
    43: (
        "++---++++-+--+--++--------++--+--+-++++---+",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
    ),
}


def _pm_string_to_array(row: str) -> np.ndarray:
    """Decode a string of '+'/'-' characters into an int64 array of +-1."""
    if set(row) - {"+", "-"}:
        raise ValueError(f"bad seed row {row!r}")
    return np.array([1 if ch == "+" else -1 for ch in row], dtype=np.int64)


def _circulant(first_row: np.ndarray) -> np.ndarray:
    """Circulant matrix with ``M[i, j] = first_row[(j - i) mod n]``."""
    n = first_row.shape[0]
    idx = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n
    return first_row[idx]


def _williamson(n: int) -> np.ndarray:
    """Hadamard matrix of order ``4 n`` from the stored Williamson seeds.

    Uses the Williamson array::

        [[ A,  B,  C,  D],
         [-B,  A, -D,  C],
         [-C,  D,  A, -B],
         [-D, -C,  B,  A]]

    which is Hadamard whenever ``A, B, C, D`` are symmetric, pairwise commuting
    (true for circulants) ``+-1`` matrices with ``A^2 + B^2 + C^2 + D^2 = 4n I``.
    """
    rows = [_pm_string_to_array(r) for r in _WILLIAMSON_SEEDS[n]]
    for r in rows:
        if r.shape[0] != n or not np.array_equal(r[1:], r[1:][::-1]):
            raise RuntimeError(f"Williamson seed for n={n} is not a symmetric row of length {n}")
    A, B, C, D = (_circulant(r) for r in rows)
    return np.block(
        [
            [A, B, C, D],
            [-B, A, -D, C],
            [-C, D, A, -B],
            [-D, -C, B, A],
        ]
    )


# --------------------------------------------------------------------------- #
# Base matrices
# --------------------------------------------------------------------------- #
_BASE_BUILDERS = {
    12: lambda: _paley1(11),
    20: lambda: _paley1(19),
    28: lambda: _paley1(27),
    36: lambda: _paley2(17),
    40: lambda: np.kron(_base_matrix(20), _sylvester(2).astype(np.int64)),
    52: lambda: _paley2(25),
    60: lambda: _paley1(59),
    108: lambda: _paley1(107),
    140: lambda: _paley1(139),
    156: lambda: _williamson(39),
    172: lambda: _williamson(43),
}
assert tuple(sorted(_BASE_BUILDERS)) == SUPPORTED_K


@functools.lru_cache(maxsize=None)
def _base_matrix(k: int) -> np.ndarray:
    """Verified base Hadamard matrix of order ``k in SUPPORTED_K`` (int64, do not mutate)."""
    h = _check_hadamard(_BASE_BUILDERS[k](), f"base Hadamard matrix of order {k}")
    h.setflags(write=False)
    return h


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def hadamard_factor(n: int) -> tuple[int, int]:
    """Split a dimension ``n`` into ``(K, m)`` with ``n == K * m`` for a Hadamard transform.

    ``m`` is a power of two and ``K`` is 1 or one of :data:`SUPPORTED_K`; the
    smallest such ``K`` is returned (so a power of two ``n`` gives ``(1, n)``,
    ``576 -> (36, 16)``, ``11008 -> (172, 64)``, ``14336 -> (28, 512)``).  The
    transform matrix for ``n`` is then ``kron(H_K, H_m)``.

    Raises:
        ValueError: if ``n`` is not a positive integer of the form ``K * 2**j``.
    """
    try:
        n_int = operator.index(n)
    except TypeError:
        raise ValueError(f"hadamard_factor: n must be an integer, got {n!r}") from None
    if isinstance(n, bool) or n_int <= 0:
        raise ValueError(f"hadamard_factor: n must be a positive integer, got {n!r}; "
                         + _supported_sizes_message())
    for k in (1,) + SUPPORTED_K:
        if n_int % k == 0 and _is_power_of_two(n_int // k):
            return k, n_int // k
    raise ValueError(f"hadamard_factor: no Hadamard matrix construction for n={n_int}; "
                     + _supported_sizes_message())


@functools.lru_cache(maxsize=16)
def _hadamard_cached(k: int) -> torch.Tensor:
    return _build_hadamard(k)


def _build_hadamard(k: int) -> torch.Tensor:
    base, m = hadamard_factor(k)
    syl = _sylvester(m)
    if base == 1:
        h = syl
    else:
        h = np.kron(_base_matrix(base), syl)
    return torch.from_numpy(np.ascontiguousarray(h, dtype=np.float64))


def hadamard_matrix(k: int) -> torch.Tensor:
    """Return a ``k x k`` Hadamard matrix (entries +-1, ``H @ H.T == k * I``).

    Supported ``k``: powers of two (Sylvester), the base orders in
    :data:`SUPPORTED_K`, and ``k = K * 2**j`` for ``K`` in ``SUPPORTED_K``, built as
    ``kron(H_K, Sylvester(2**j))`` with ``K`` chosen by :func:`hadamard_factor`
    (row index ``i * 2**j + j'``).  ``k`` may be at most ``2**15``.

    The result is an unscaled ``torch.float64`` CPU tensor (divide by
    ``sqrt(k)`` for an orthogonal matrix).  Matrices up to order 4096 are cached;
    each call returns a fresh clone, so the caller may modify it.

    Raises:
        ValueError: if no construction is available for ``k``; the message lists
            the supported sizes.
    """
    try:
        k_int = operator.index(k)
    except TypeError:
        raise ValueError(f"hadamard_matrix: size must be an integer, got {k!r}") from None
    if isinstance(k, bool) or k_int <= 0:
        raise ValueError(f"hadamard_matrix: size must be a positive integer, got {k!r}; "
                         + _supported_sizes_message())
    if k_int > _MAX_ORDER:
        raise ValueError(f"hadamard_matrix: size {k_int} exceeds the maximum {_MAX_ORDER}; "
                         "use a fast Hadamard transform instead of a dense matrix")
    try:
        hadamard_factor(k_int)
    except ValueError:
        raise ValueError(f"hadamard_matrix: no Hadamard matrix construction for size {k_int}; "
                         + _supported_sizes_message()) from None
    if k_int <= _CACHE_MAX_ORDER:
        return _hadamard_cached(k_int).clone()
    return _build_hadamard(k_int)
