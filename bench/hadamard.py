"""Hadamard transform: ostquant's CUDA kernel vs a dense matmul and vs fast_hadamard_transform.

    python -m bench.hadamard              # H100/H200: writes bench/results/hadamard-<dev>.json
    python -m bench.hadamard --dry-run    # any device: tiny sizes, correctness only

Rows (RESULTS.md): n, batch, dtype, ours_ms, baseline, baseline_ms, speedup (= baseline_ms /
ours_ms), plus ours_gbps (bytes read + written / time). Baselines:

* ``dense``: ``x @ (scale·H)ᵀ`` in the same dtype with the full n×n matrix (torch.matmul), for
  n ≤ 16384 (the matrix alone is 2 GiB in bf16 at 32768);
* ``fht``: ``fast_hadamard_transform`` (Dao-AILab) when importable, for the sizes it has kernels
  for (2^k, and 12/20/28/40·2^k); its H_K differ from ours, so it is timed, not compared.

Every configuration is checked against a float64 evaluation of the same transform first.
"""
from __future__ import annotations

import functools
import sys

import torch

from bench import common
from ostquant import ops as O
from ostquant.transforms.hadamard_matrices import hadamard_factor, hadamard_matrix

BENCH = "hadamard"
# LLaMA-family sizes: head dim, hidden sizes, intermediate sizes (7B 11008, 13B 13824,
# 8B 14336), plus the largest power of two.
SIZES = [128, 1024, 4096, 5120, 8192, 11008, 13824, 14336, 16384, 32768]
BATCHES = [1, 256, 4096]
DTYPES = [torch.bfloat16, torch.float16]
QUICK_SIZES = [128, 4096, 11008, 14336]
QUICK_BATCHES = [4096]
DRY_SIZES = [2, 64, 576, 768]
DRY_BATCHES = [3]
DENSE_MAX_N = 16384


def _fht_fn(n: int):
    """fast_hadamard_transform's function for size n, or None."""
    try:
        from fast_hadamard_transform import fast_hadamard_transform_interface as fht
    except ImportError:
        return None
    K, m = hadamard_factor(n)
    name = {1: "hadamard_transform", 12: "hadamard_transform_12N", 20: "hadamard_transform_20N",
            28: "hadamard_transform_28N", 40: "hadamard_transform_40N"}.get(K)
    fn = getattr(fht, name, None) if name else None
    if fn is None or n > 32768 * (K if K > 1 else 1):
        return None
    return fn


@functools.lru_cache(maxsize=1)
def _dense(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """``n^-½·H`` in ``dtype`` on ``device`` (cached for the batches of one size)."""
    return (hadamard_matrix(n) * n ** -0.5).to(device=device, dtype=dtype)


def _exact(x: torch.Tensor, scale: float) -> torch.Tensor:
    n = x.shape[-1]
    if n <= 4096:
        return scale * (x.double() @ hadamard_matrix(n).to(x.device, torch.float64).T)
    from ostquant.ops.reference import _fwht_pow2
    K, m = hadamard_factor(n)
    y = _fwht_pow2(x.double().reshape(*x.shape[:-1], K, m))
    if K > 1:
        y = torch.matmul(hadamard_matrix(K).to(x.device, torch.float64), y)
    return scale * y.reshape(x.shape)


def check(x: torch.Tensor, scale: float) -> float:
    """Max error of ours relative to the output's max magnitude; raises if implausible."""
    got = O.hadamard_transform(x, scale).double()
    want = _exact(x, scale)
    rel = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    limit = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[x.dtype]
    if not rel <= limit:
        raise AssertionError(f"hadamard n={x.shape[-1]} {x.dtype}: relative error {rel:.3g} > "
                             f"{limit}")
    return rel


def _one(rows, n: int, batch: int, dtype, dry_run: bool, device: str) -> None:
    """Check and time one (n, batch, dtype); appends its rows."""
    scale = n ** -0.5
    x = torch.randn(batch, n, device=device).to(dtype)
    rel = check(x, scale)
    if dry_run:
        print(f"[dry-run] n={n} batch={batch} {str(dtype)[6:]}: max rel err {rel:.2e}")
        return
    bytes_set = x.numel() * x.element_size()
    sets = [(torch.randn(batch, n, device=device).to(dtype),)
            for _ in range(common.num_sets(bytes_set))]
    ours = common.time_ms(lambda a: O.hadamard_transform(a, scale), sets)
    base = {"n": n, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
            "K": hadamard_factor(n)[0], "ours_ms": ours,
            "ours_gbps": 2 * bytes_set / ours / 1e6, "max_rel_err": rel}
    if n <= DENSE_MAX_N:
        hs = _dense(n, dtype, device)
        ms = common.time_ms(lambda a: torch.matmul(a, hs.T), sets)
        rows.append({**base, "baseline": "dense", "baseline_ms": ms, "speedup": ms / ours})
        del hs
    fht = _fht_fn(n)
    if fht is not None:
        try:
            ms = common.time_ms(lambda a: fht(a, scale), sets)
        except Exception as e:  # noqa: BLE001  (a size it has no kernel for)
            print(f"fast_hadamard_transform failed at n={n}: {e}", file=sys.stderr)
            fht = None
        else:
            rows.append({**base, "baseline": "fht", "baseline_ms": ms, "speedup": ms / ours})
    if n > DENSE_MAX_N and fht is None:
        rows.append({**base, "baseline": "none", "baseline_ms": None, "speedup": None})
    del sets
    torch.cuda.empty_cache()


def run(sizes, batches, dtypes, dry_run: bool, device: str, rows=None):
    rows = rows if rows is not None else common.Rows(BENCH)
    for dtype in dtypes:
        for n in sizes:
            for batch in batches:
                rows.guard(f"n={n} batch={batch} {str(dtype)[6:]}", _one, rows, n, batch,
                           dtype, dry_run, device)
    return rows


def main(argv=None) -> int:
    ap = common.base_parser(__doc__.splitlines()[0])
    args = ap.parse_args(argv)
    if args.dry_run:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        run(DRY_SIZES, DRY_BATCHES, [torch.float32, torch.bfloat16], True, device)
        print("[dry-run] hadamard: ok (no timings, no JSON)")
        return 0
    common.require_cuda(BENCH)
    if "hadamard_transform" not in O.cuda_ops():
        print("warning: no CUDA kernel for hadamard_transform (ostquant._C not built?); "
              "timing the reference", file=sys.stderr)
    sizes, batches = (QUICK_SIZES, QUICK_BATCHES) if args.quick else (SIZES, BATCHES)
    rows, rc = common.collect(BENCH, args,
                              lambda r: run(sizes, batches, DTYPES, False, "cuda", r))
    common.print_table(common.measured(rows), ["n", "batch", "dtype", "ours_ms", "ours_gbps",
                                               "baseline", "baseline_ms", "speedup"])
    return rc


if __name__ == "__main__":
    sys.exit(main())
