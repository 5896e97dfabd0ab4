"""int4 GEMMs (W4A4 ``int4_gemm``, W4A16 ``w4a16_gemm``) vs bf16 torch.matmul and int8 torch._int_mm.

    python -m bench.gemm              # H100/H200: writes bench/results/gemm-<dev>.json
    python -m bench.gemm --quick      # fewer shapes and M
    python -m bench.gemm --dry-run    # any device: tiny sizes, correctness only, no JSON

Shapes: the linear projections of LLaMA-2-7B, LLaMA-3-8B and LLaMA-2-13B (N = out_features,
K = in_features; unfused q/k/v/o, gate/up, down), M (tokens) in {1, 4, 16, 64, 256, 1024, 2048,
4096, 8192}. Every timing is a median over calls cycling through enough input sets (weights
included) that operands come from DRAM, not L2 (bench/common.py).

* ``w4a4``: ``int4_gemm`` on int4 activations (asymmetric, per-token scale and zero, ``w_sum``
  precomputed as QuantLinear does) and packed int4 weights, bf16 output. The activations come
  in the layout QuantLinear hands the op: int8 codes where the kernel reads those
  (``int4_gemm_takes_codes``: the Hopper kernel), packed elsewhere; the row's ``x_layout``
  says which. The activation quantization itself is not timed (bench.quant measures it).
* ``w4a16``: ``w4a16_gemm`` on bf16 activations and packed int4 weights, bf16 output.
* baselines, timed in the same run on the same device: ``bf16`` = ``x @ w.t()`` with bf16 x and
  w; ``int8`` = ``torch._int_mm`` (cuBLASLt int8, int32 out), which needs M > 16: for M <= 16
  the int8 row has ``baseline_ms = null``.

Rows (RESULTS.md ``gemm``): op, model, layer, M, N, K, ours_ms, baseline, baseline_ms, speedup
(= baseline_ms / ours_ms), plus ours_tops / baseline_tops (2·M·N·K / time, 10^12 per second),
``sm90_tile`` (tokens per tile of the Hopper kernel that ran) and, for 16 < M <= 256 there,
``alt_tile`` / ``alt_tile_ms`` (the same op with the other tile, forced by
OSTQUANT_GEMM_SM90_TILE: the data to place the M-bucket boundary by)
and path (``small_m`` for M <= 16, else ``large_m``: on an H100/H200 the CUTLASS sm_90a
kernels, see docs/ops.md).
Targets (DESIGN.md): W4A4 >= 1.6x bf16 at M >= 2048; W4 >= 2.5x bf16 at M <= 16.

Before timing, every configuration is checked against the reference kernels on a subset of
rows: W4A4 bit-identical, W4A16 within rounding.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

from bench import common
from ostquant import ops as O
from ostquant.ops import reference as ref

BENCH = "gemm"
MODELS: Dict[str, Dict[str, Tuple[int, int]]] = {
    "llama-2-7b": {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (11008, 4096),
                   "down_proj": (4096, 11008)},
    "llama-3-8b": {"q/o_proj": (4096, 4096), "k/v_proj": (1024, 4096),
                   "gate/up_proj": (14336, 4096), "down_proj": (4096, 14336)},
    "llama-2-13b": {"q/k/v/o_proj": (5120, 5120), "gate/up_proj": (13824, 5120),
                    "down_proj": (5120, 13824)},
}
MS = [1, 4, 16, 64, 256, 1024, 2048, 4096, 8192]
QUICK_MODELS = {"llama-3-8b": MODELS["llama-3-8b"]}
QUICK_MS = [1, 16, 64, 256, 2048, 8192]
ALT_TILE_MAX_M = 256  # Hopper path, 16 < M <= this: the other token tile is timed too
DRY_MODELS = {"tiny": {"proj": (40, 64), "down": (64, 96)}}
DRY_MS = [1, 4, 17]
CHECK_ROWS = 48  # rows compared with the reference (first and last CHECK_ROWS / 2)
SMALL_M_MAX = 16
TILE_ENV = "OSTQUANT_GEMM_SM90_TILE"


def _check_rows(M: int) -> torch.Tensor:
    if M <= CHECK_ROWS:
        return torch.arange(M)
    h = CHECK_ROWS // 2
    return torch.cat([torch.arange(h), torch.arange(M - h, M)])


def sm90_tiles(M: int, N: int, K: int, device: str) -> Optional[Tuple[int, int]]:
    """(tile the dispatch uses, the other tile) when the Hopper kernels take this shape, else
    None (``_C.sm90_gemm_tile``; OSTQUANT_GEMM_SM90_TILE forces a tile)."""
    if not x_codes(M, N, K, device):  # the W4A4 Hopper path runs exactly where codes are read
        return None
    tile = int(O._ext.sm90_gemm_tile(M))
    return tile, (128 if tile == 64 else 64)


@contextlib.contextmanager
def _forced_tile(tile: int):
    """OSTQUANT_GEMM_SM90_TILE=tile inside the block (read by the extension on every call)."""
    old = os.environ.get(TILE_ENV)
    os.environ[TILE_ENV] = str(tile)
    try:
        yield
    finally:
        if old is None:
            del os.environ[TILE_ENV]
        else:
            os.environ[TILE_ENV] = old


def x_codes(M: int, N: int, K: int, device: str) -> bool:
    """Whether ``int4_gemm`` takes the activations as int8 codes at this shape (what
    QuantLinear then passes it), else packed."""
    return O.int4_gemm_takes_codes(torch.device(device), M, N, K, torch.bfloat16)


def make_inputs(M: int, N: int, K: int, device: str, seed: int = 0) -> dict:
    """One input set: int4 operands for ours (activations in the layout QuantLinear passes at
    this shape: ``xq``), bf16 / int8 operands for the baselines."""
    g = torch.Generator(device=device).manual_seed(seed)
    qx = torch.randint(-8, 8, (M, K), generator=g, device=device, dtype=torch.int8)
    qw = torch.randint(-8, 8, (N, K), generator=g, device=device, dtype=torch.int8)
    sx = torch.rand(M, generator=g, device=device) * 0.1 + 1e-3
    zx = torch.randint(-8, 8, (M,), generator=g, device=device).float()
    sw = torch.rand(N, generator=g, device=device) * 0.01 + 1e-4
    x16 = torch.randn(M, K, generator=g, device=device).to(torch.bfloat16)
    xp = O.pack_int4(qx)
    return {"xp": xp, "xq": qx if x_codes(M, N, K, device) else xp, "sx": sx, "zx": zx,
            "wp": O.pack_int4(qw), "sw": sw,
            "wsum": qw.float().sum(-1), "x16": x16, "w16": (qw.float() * sw[:, None]).to(
                torch.bfloat16), "x8": qx, "w8": qw}


def ours_w4a4(d):
    return O.int4_gemm(d["xq"], d["sx"], d["zx"], d["wp"], d["sw"], d["wsum"], None,
                       out_dtype=torch.bfloat16)


def ours_w4a16(d):
    return O.w4a16_gemm(d["x16"], d["wp"], d["sw"], None)


def base_bf16(d):
    return d["x16"] @ d["w16"].t()


def base_int8(d):
    return torch._int_mm(d["x8"], d["w8"].t())


def check(d: dict, what: str) -> None:
    """Compare our outputs with the reference kernels on a subset of rows."""
    M, K = d["x16"].shape
    rows = _check_rows(M).to(d["x16"].device)
    got = ours_w4a4(d)[rows]
    want = ref.int4_gemm(d["xp"][rows], d["sx"][rows], d["zx"][rows], d["wp"], d["sw"],
                         d["wsum"], None, torch.bfloat16)
    if not torch.equal(got, want):
        n_bad = int((got != want).sum())
        raise AssertionError(f"{what}: w4a4 differs from the reference in {n_bad} of "
                             f"{got.numel()} checked values")
    got = ours_w4a16(d)[rows].double()
    x = d["x16"][rows]
    want = ref.w4a16_gemm(x, d["wp"], d["sw"], None).double()
    w = ref.unpack_int4(d["wp"]).double().abs() * d["sw"].double()[:, None]
    tol = 2 * 2.0 ** -7 * want.abs() + 2.0 ** -16 * (x.double().abs() @ w.T) + 1e-30
    bad = (got - want).abs() > tol
    if bad.any():
        raise AssertionError(f"{what}: w4a16 off the reference in {int(bad.sum())} of "
                             f"{got.numel()} checked values")


def _set_bytes(M: int, N: int, K: int, codes: bool = False) -> Dict[str, int]:
    return {"w4a4": M * K // (1 if codes else 2) + N * K // 2, "w4a16": M * K * 2 + N * K // 2,
            "bf16": M * K * 2 + N * K * 2, "int8": M * K + N * K}


def _sets(M, N, K, device, key, nbytes):
    """Input sets for one timed function, each a 1-tuple holding a dict of its operands."""
    keep = {"w4a4": ("xq", "sx", "zx", "wp", "sw", "wsum"), "w4a16": ("x16", "wp", "sw"),
            "bf16": ("x16", "w16"), "int8": ("x8", "w8")}[key]
    out = []
    for i in range(common.num_sets(nbytes)):
        d = make_inputs(M, N, K, device, seed=1000 + i)
        out.append(({k: d[k] for k in keep},))
        del d
    return out


def _measure(M: int, N: int, K: int, what: str, dry_run: bool, device: str) -> Dict[str, float]:
    """Check ours against the reference at (M, N, K), then time ours and the baselines."""
    fns = {"w4a4": ours_w4a4, "w4a16": ours_w4a16, "bf16": base_bf16, "int8": base_int8}
    d = make_inputs(M, N, K, device)
    check(d, what)
    tiles = sm90_tiles(M, N, K, device)
    alt = tiles[1] if tiles is not None and M <= ALT_TILE_MAX_M else None
    if alt is not None:
        with _forced_tile(alt):
            check(d, f"{what} ({alt}-token tile)")
    if dry_run:
        base_bf16(d)
        base_int8(d)  # CPU _int_mm takes any M; CUDA needs M > 16
        print(f"[dry-run] {what}: w4a4 and w4a16 match the reference")
        return {}
    del d
    t = {}
    for name, nbytes in _set_bytes(M, N, K, x_codes(M, N, K, device)).items():
        if name == "int8" and M <= SMALL_M_MAX:
            continue  # torch._int_mm needs M > 16 on CUDA
        sets = _sets(M, N, K, device, name, nbytes)
        t[name] = common.time_ms(fns[name], sets)
        if alt is not None and name in ("w4a4", "w4a16"):  # the other tile, for the M buckets
            with _forced_tile(alt):
                t[name + "_alt_tile"] = common.time_ms(fns[name], sets)
        del sets
        torch.cuda.empty_cache()
    return t


def run(models, ms, dry_run: bool, device: str, rows=None) -> List[dict]:
    rows = rows if rows is not None else common.Rows(BENCH)
    timed: Dict[Tuple[int, int, int], Optional[Dict[str, float]]] = {}
    for model, layers in models.items():
        for layer, (N, K) in layers.items():
            for M in ms:
                what = f"{model} {layer} M={M} N={N} K={K}"
                key = (M, N, K)
                if key not in timed:
                    timed[key] = rows.guard(what, _measure, M, N, K, what, dry_run, device)
                t = timed[key]
                if dry_run or not t:
                    continue  # dry run, or this shape failed (its error row is written)
                flop = 2.0 * M * N * K
                tiles = sm90_tiles(M, N, K, device)
                for op in ("w4a4", "w4a16"):
                    tile_info = {} if tiles is None else {"sm90_tile": tiles[0]}
                    if op + "_alt_tile" in t:
                        tile_info.update(alt_tile=tiles[1], alt_tile_ms=t[op + "_alt_tile"])
                    for base in ("bf16", "int8"):
                        bms = t.get(base)
                        rows.append({
                            "op": op, "model": model, "layer": layer, "M": M, "N": N, "K": K,
                            "path": "small_m" if M <= SMALL_M_MAX else "large_m",
                            **({"x_layout": "int8" if x_codes(M, N, K, device) else "packed"}
                               if op == "w4a4" else {}),
                            **tile_info,
                            "ours_ms": t[op], "ours_tops": flop / t[op] / 1e9,
                            "baseline": base, "baseline_ms": bms,
                            "baseline_tops": None if bms is None else flop / bms / 1e9,
                            "speedup": None if bms is None else bms / t[op],
                            **({"note": "torch._int_mm needs M > 16"} if bms is None else {}),
                        })
                rows.flush()
                print(f"{what}: w4a4 {t['w4a4']:.4f} ms, w4a16 {t['w4a16']:.4f} ms, bf16 "
                      f"{t['bf16']:.4f} ms" + (f", int8 {t['int8']:.4f} ms" if "int8" in t
                                               else ""))
                sys.stdout.flush()
    return rows


def main(argv=None) -> int:
    ap = common.base_parser(__doc__.splitlines()[0])
    args = ap.parse_args(argv)
    if args.dry_run:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ms = DRY_MS if device == "cpu" else [17, 33]  # CUDA _int_mm baseline needs M > 16
        run(DRY_MODELS, ms, True, device)
        print("[dry-run] gemm: ok (no timings, no JSON)")
        return 0
    common.require_cuda(BENCH)
    missing = {"int4_gemm", "w4a16_gemm"} - set(O.cuda_ops())
    if missing:
        print(f"warning: no CUDA kernel for {sorted(missing)} (ostquant._C not built?); timing "
              f"the reference", file=sys.stderr)
    models, ms = (QUICK_MODELS, QUICK_MS) if args.quick else (MODELS, MS)
    rows, rc = common.collect(BENCH, args, lambda r: run(models, ms, False, "cuda", r))
    common.print_table([r for r in common.measured(rows) if r["baseline"] == "bf16"],
                       ["op", "model", "layer", "M", "ours_ms", "ours_tops", "baseline_ms",
                        "speedup"])
    return rc


if __name__ == "__main__":
    sys.exit(main())
