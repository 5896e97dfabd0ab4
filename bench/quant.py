"""Fused quantization kernels vs a device copy of the same bytes.

    python -m bench.quant              # H100/H200: writes bench/results/quant-<dev>.json
    python -m bench.quant --dry-run    # any device: tiny sizes, correctness only

Rows (RESULTS.md): op, M, K, ours_ms, gbps, copy_gbps, fraction_of_copy, plus dtype and bytes
(fused ops also unfused_ms and speedup_vs_unfused).
``bytes`` counts what the op must move: the input read plus every output written (codes,
scales, zero points). The baseline copies a buffer of bytes/2 on the device (reading bytes/2
and writing bytes/2, the same traffic); ``gbps = bytes / ours_ms``, ``copy_gbps = bytes /
copy_ms`` and ``fraction_of_copy = gbps / copy_gbps`` (target ≥ 0.7, DESIGN.md).

* ``quantize_per_token``: x [M, K] (bf16) -> int8 codes [M, K] + float32 scale/zero [M]
  (asymmetric 4-bit, the activation quantizer).
* ``quantize_kv``: x [M, 128] (M = tokens × KV heads) -> packed uint8 [M, 64] + fp16 scale/zero.
* ``hadamard_quantize_per_token``: x [M, K] (bf16) -> online Hadamard (n^-½) -> packed int4
  [M, K/2] + float32 scale/zero (the down_proj input; K = 11008 = 172·64 and 14336 = 28·512
  exercise the K×K stage). Also timed: the unfused sequence it replaces
  (``hadamard_transform`` → ``quantize_per_token`` → ``pack_int4``), ``unfused_ms``.
* ``rmsnorm_quantize_per_token``: x [M, K] (bf16) + bf16 weight [K] -> RMSNorm -> packed int4
  + float32 scale/zero (bytes include the weight). ``unfused_ms``: a torch RMSNorm
  (transformers' formula) → ``quantize_per_token`` → ``pack_int4``.
* ``quantize_per_token_packed``: x [M, K] (bf16) -> packed int4 + float32 scale/zero (the
  o_proj input). ``unfused_ms``: ``quantize_per_token`` → ``pack_int4``.

The two fused ops are also timed with ``packed=False`` (int8 codes [M, K], what the Hopper
GEMM reads; ``unfused_ms`` then without the ``pack_int4``): rows with ``layout = "int8"``
(the others ``"packed"``).

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
FUSED = [(M, K) for M in (1, 16, 2048, 8192) for K in (4096, 11008, 14336)]
QUICK_FUSED = [(2048, 4096), (8192, 11008), (8192, 14336)]
DRY_PER_TOKEN = [(3, 64), (5, 576)]
DRY_KV = [(6, 128)]
DRY_FUSED = [(3, 64), (5, 576), (2, 11008)]
FUSED_OPS = ("hadamard_quantize_per_token", "rmsnorm_quantize_per_token",
             "quantize_per_token_packed")
ALL_OPS = ("quantize_per_token", "quantize_kv") + FUSED_OPS
RMS_EPS = 1e-6


CODES_OPS = ("hadamard_quantize_per_token", "rmsnorm_quantize_per_token")  # packed=False too


def _bytes(op: str, M: int, K: int, esize: int, packed: bool = True) -> int:
    if op == "quantize_per_token":
        return M * K * esize + M * K + 2 * M * 4
    if op == "quantize_kv":
        return M * K * esize + M * K // 2 + 2 * M * 2
    extra = K * esize if op == "rmsnorm_quantize_per_token" else 0  # the norm weight
    return M * K * esize + (M * K // 2 if packed else M * K) + 2 * M * 4 + extra


def _weight(K: int, dtype, device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(K)
    return (torch.rand(K, generator=g) + 0.5).to(device=device, dtype=dtype)


def _call(op: str, packed: bool = True):
    """fn(x, w) of the op (w: the RMSNorm weight, unused by the others)."""
    if op == "quantize_per_token":
        return lambda a, w: O.quantize_per_token(a, 4, False, 1.0)
    if op == "quantize_kv":
        return lambda a, w: O.quantize_kv(a)
    if op == "hadamard_quantize_per_token":
        return lambda a, w: O.hadamard_quantize_per_token(a, a.shape[-1] ** -0.5, 4, False, 1.0,
                                                          packed=packed)
    if op == "quantize_per_token_packed":
        return lambda a, w: O.quantize_per_token_packed(a, 4, False, 1.0)
    return lambda a, w: O.rmsnorm_quantize_per_token(a, w, RMS_EPS, 4, False, 1.0, packed=packed)


def _llama_rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return w * h.to(x.dtype)


def _unfused(op: str, packed: bool = True):
    """The op sequence a fused op replaces (None for the plain quantizers)."""
    def quant_pack(y):
        q, s, z = O.quantize_per_token(y, 4, False, 1.0)
        return (O.pack_int4(q) if packed else q), s, z
    if op == "hadamard_quantize_per_token":
        return lambda a, w: quant_pack(O.hadamard_transform(a, a.shape[-1] ** -0.5))
    if op == "rmsnorm_quantize_per_token":
        return lambda a, w: quant_pack(_llama_rmsnorm(a, w))
    if op == "quantize_per_token_packed":
        return lambda a, w: quant_pack(a)
    return None


def _reference(op: str, x: torch.Tensor, w: torch.Tensor, packed: bool = True):
    if op == "quantize_per_token":
        return ref.quantize_per_token(x, 4, False, 1.0)
    if op == "quantize_kv":
        return ref.quantize_kv(x)
    if op == "hadamard_quantize_per_token":
        return ref.hadamard_quantize_per_token(x, x.shape[-1] ** -0.5, 4, False, 1.0, packed)
    if op == "quantize_per_token_packed":
        return ref.quantize_per_token_packed(x, 4, False, 1.0)
    return ref.rmsnorm_quantize_per_token(x, w, RMS_EPS, 4, False, 1.0, packed)


def check(op: str, x: torch.Tensor, w: torch.Tensor, packed: bool = True) -> None:
    got, want = _call(op, packed)(x, w), _reference(op, x, w, packed)
    for name, g, r in zip(("codes", "scale", "zero"), got, want):
        if not torch.equal(g.cpu(), r.cpu()):
            raise AssertionError(f"{op} M={x.shape[0]} K={x.shape[1]} packed={packed}: {name} "
                                 f"differ from the reference")


def _one(rows, op: str, M: int, K: int, dtype, dry_run: bool, device: str,
         packed: bool = True) -> None:
    """Check and time one (op, M, K, code layout); appends its row."""
    x = torch.randn(M, K, device=device).to(dtype)
    w = _weight(K, dtype, device)
    check(op, x, w, packed)
    if dry_run:
        print(f"[dry-run] {op} M={M} K={K} packed={packed}: matches the reference")
        return
    nbytes = _bytes(op, M, K, x.element_size(), packed)
    sets = [(torch.randn(M, K, device=device).to(dtype), w)
            for _ in range(common.num_sets(M * K * x.element_size()))]
    ours = common.time_ms(_call(op, packed), sets)
    unfused = _unfused(op, packed)
    unfused_ms = common.time_ms(unfused, sets) if unfused is not None else None
    half = max(1, nbytes // 2)
    csets = [(torch.empty(half, dtype=torch.uint8, device=device),
              torch.empty(half, dtype=torch.uint8, device=device))
             for _ in range(common.num_sets(2 * half))]
    copy = common.time_ms(lambda dst, src: dst.copy_(src), csets)
    gbps, copy_gbps = nbytes / ours / 1e6, nbytes / copy / 1e6
    row = {"op": op, "M": M, "K": K, "dtype": str(dtype).replace("torch.", ""),
           "layout": "int8" if op == "quantize_per_token" or not packed else "packed",
           "bytes": nbytes, "ours_ms": ours, "gbps": gbps, "copy_ms": copy,
           "copy_gbps": copy_gbps, "fraction_of_copy": gbps / copy_gbps}
    if unfused is not None:
        row["unfused_ms"] = unfused_ms
        row["speedup_vs_unfused"] = unfused_ms / ours
    rows.append(row)
    del sets, csets
    torch.cuda.empty_cache()


def run(cases, dtype, dry_run: bool, device: str, rows=None):
    rows = rows if rows is not None else common.Rows(BENCH)
    for op, shapes in cases:
        for M, K in shapes:
            rows.guard(f"{op} M={M} K={K}", _one, rows, op, M, K, dtype, dry_run, device)
            if op in CODES_OPS:
                rows.guard(f"{op} M={M} K={K} int8 codes", _one, rows, op, M, K, dtype, dry_run,
                           device, False)
    return rows


def main(argv=None) -> int:
    ap = common.base_parser(__doc__.splitlines()[0])
    args = ap.parse_args(argv)
    if args.dry_run:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        run([("quantize_per_token", DRY_PER_TOKEN), ("quantize_kv", DRY_KV)]
            + [(op, DRY_FUSED) for op in FUSED_OPS], torch.bfloat16, True, device)
        print("[dry-run] quant: ok (no timings, no JSON)")
        return 0
    common.require_cuda(BENCH)
    missing = set(ALL_OPS) - set(O.cuda_ops())
    if missing:
        print(f"warning: no CUDA kernel for {sorted(missing)} (ostquant._C not built?); timing "
              f"the reference", file=sys.stderr)
    pt, kv, fused = ((QUICK_PER_TOKEN, QUICK_KV, QUICK_FUSED) if args.quick
                     else (PER_TOKEN, KV, FUSED))
    cases = [("quantize_per_token", pt), ("quantize_kv", kv)] + [(op, fused) for op in FUSED_OPS]
    rows, rc = common.collect(BENCH, args,
                              lambda r: run(cases, torch.bfloat16, False, "cuda", r))
    common.print_table(common.measured(rows), ["op", "layout", "M", "K", "ours_ms", "gbps",
                                               "copy_gbps", "fraction_of_copy",
                                               "speedup_vs_unfused"])
    return rc


if __name__ == "__main__":
    sys.exit(main())
