"""Fused quantization kernels vs a device copy of the same bytes.

    python -m bench.quant              # H100/H200: writes bench/results/quant-<dev>.json
    python -m bench.quant --dry-run    # any device: tiny sizes, correctness only

Rows (RESULTS.md): op, M, K, ours_ms, gbps, copy_gbps, fraction_of_copy, plus dtype and bytes.
``bytes`` counts what the op must move: the input read plus every output written (codes,
scales, zero points). The baseline copies a buffer of bytes/2 on the device (reading bytes/2
and writing bytes/2, the same traffic); ``gbps = bytes / ours_ms``, ``copy_gbps = bytes /
copy_ms`` and ``fraction_of_copy = gbps / copy_gbps`` (target ≥ 0.7, DESIGN.md).

* ``quantize_per_token``: x [M, K] (bf16) -> int8 codes [M, K] + float32 scale/zero [M]
  (asymmetric 4-bit, the activation quantizer).
* ``quantize_kv``: x [M, 128] (M = tokens × KV heads) -> packed uint8 [M, 64] + fp16 scale/zero.

Each configuration is first compared with the reference kernel (bit-exact codes and scales).
"""
from __future__ import annotations

import sys

import torch

from bench import common
from ostquant import ops as O
from ostquant.ops import reference as ref

BENCH = "quant"
PER_TOKEN = [(M, K) for M in (1, 16, 2048, 8192) for K in (4096, 11008, 14336)]
KV = [(M, 128) for M in (32 * 128, 32 * 2048, 8 * 32768)]
QUICK_PER_TOKEN = [(2048, 4096), (8192, 11008)]
QUICK_KV = [(32 * 2048, 128)]
DRY_PER_TOKEN = [(3, 64), (5, 576)]
DRY_KV = [(6, 128)]


def _bytes(op: str, M: int, K: int, esize: int) -> int:
    if op == "quantize_per_token":
        return M * K * esize + M * K + 2 * M * 4
    return M * K * esize + M * K // 2 + 2 * M * 2


def _call(op: str):
    if op == "quantize_per_token":
        return lambda a: O.quantize_per_token(a, 4, False, 1.0)
    return lambda a: O.quantize_kv(a)


def _reference(op: str, x: torch.Tensor):
    if op == "quantize_per_token":
        return ref.quantize_per_token(x, 4, False, 1.0)
    return ref.quantize_kv(x)


def check(op: str, x: torch.Tensor) -> None:
    got, want = _call(op)(x), _reference(op, x)
    for name, g, w in zip(("codes", "scale", "zero"), got, want):
        if not torch.equal(g.cpu(), w.cpu()):
            raise AssertionError(f"{op} M={x.shape[0]} K={x.shape[1]}: {name} differ from the "
                                 f"reference")


def run(cases, dtype, dry_run: bool, device: str):
    rows = []
    for op, shapes in cases:
        for M, K in shapes:
            x = torch.randn(M, K, device=device).to(dtype)
            check(op, x)
            if dry_run:
                print(f"[dry-run] {op} M={M} K={K}: matches the reference")
                continue
            nbytes = _bytes(op, M, K, x.element_size())
            sets = [(torch.randn(M, K, device=device).to(dtype),)
                    for _ in range(common.num_sets(M * K * x.element_size()))]
            ours = common.time_ms(_call(op), sets)
            half = max(1, nbytes // 2)
            csets = [(torch.empty(half, dtype=torch.uint8, device=device),
                      torch.empty(half, dtype=torch.uint8, device=device))
                     for _ in range(common.num_sets(2 * half))]
            copy = common.time_ms(lambda dst, src: dst.copy_(src), csets)
            gbps, copy_gbps = nbytes / ours / 1e6, nbytes / copy / 1e6
            rows.append({"op": op, "M": M, "K": K, "dtype": str(dtype).replace("torch.", ""),
                         "bytes": nbytes, "ours_ms": ours, "gbps": gbps, "copy_ms": copy,
                         "copy_gbps": copy_gbps, "fraction_of_copy": gbps / copy_gbps})
            del sets, csets
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = common.base_parser(__doc__.splitlines()[0])
    args = ap.parse_args(argv)
    if args.dry_run:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        run([("quantize_per_token", DRY_PER_TOKEN), ("quantize_kv", DRY_KV)], torch.bfloat16,
            True, device)
        print("[dry-run] quant: ok (no timings, no JSON)")
        return 0
    common.require_cuda(BENCH)
    missing = {"quantize_per_token", "quantize_kv"} - set(O.cuda_ops())
    if missing:
        print(f"warning: no CUDA kernel for {sorted(missing)} (ostquant._C not built?); timing "
              f"the reference", file=sys.stderr)
    pt, kv = (QUICK_PER_TOKEN, QUICK_KV) if args.quick else (PER_TOKEN, KV)
    rows = run([("quantize_per_token", pt), ("quantize_kv", kv)], torch.bfloat16, False, "cuda")
    short = args.device_short or common.device_short()
    path = common.write_results(BENCH, short, rows, args.out_dir)
    common.print_table(rows, ["op", "M", "K", "ours_ms", "gbps", "copy_gbps",
                              "fraction_of_copy"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
