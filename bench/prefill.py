"""Decoder-layer prefill (paper Table 9): one quantized layer vs one bf16 layer of the same shape.

    python -m bench.prefill              # H100/H200: writes bench/results/prefill-<dev>.json
    python -m bench.prefill --quick      # llama-3-8b only, fewer lengths
    python -m bench.prefill --dry-run    # any device: tiny shape, consistency checks, no JSON

For each shape (LLaMA-2-7B, LLaMA-3-8B, LLaMA-2-13B, LLaMA-30B) and sequence length (256 to
8192, batch 1), one decoder layer with random weights
(:func:`ostquant.runtime.model.random_layers`) runs a prefill from an empty KV cache:

* ``ours``: the runtime layer at ``--preset`` (default W4A4KV4): RMSNorm, fused QKV int4 GEMM
  (per-token int4 activations), RoPE + online Hadamard on Q, fused RoPE + Hadamard + int4
  append of K/V (``kv_cache_append_fused``), causal SDPA over
  the dequantized new K/V, o_proj, fused gate|up, SiLU·mul, online Hadamard + down_proj;
* ``baseline``: the same layer code in bf16 (``nn.Linear`` projections, bf16 KV cache, the
  same SDPA), timed in the same run.

The RoPE table is computed outside the timed call (once per forward for all layers). Rows
(RESULTS.md ``prefill``): model, seqlen, ours_ms, baseline_ms, speedup (= baseline/ours),
ours_peak_bytes, baseline_peak_bytes (CUDA ``max_memory_allocated`` over one call, from a
state holding only that layer's weights, its KV cache and the input: weights + cache +
activations), memory_saving (= baseline/ours peak), plus the weight / KV-cache bytes of each.
Targets (DESIGN.md): >= 1.6x at seq >= 1024, memory saving >= 3x.

Before timing, each shape is checked at a short length: the layer's output is finite, and a
prefill split in two chunks (the second attending through the cache with the decode
attention op) matches the one-chunk prefill.
"""
from __future__ import annotations

import gc
import sys
from typing import Dict, List

import torch

from bench import common
from ostquant import ops as O

BENCH = "prefill"
MODELS = ["llama-2-7b", "llama-3-8b", "llama-2-13b", "llama-30b"]
SEQLENS = [256, 512, 1024, 2048, 4096, 8192]
QUICK_MODELS = ["llama-3-8b"]
QUICK_SEQLENS = [256, 1024, 4096]
DRY_MODELS = ["tiny"]
DRY_SEQLENS = [16, 40]
CHECK_LEN = 64


class Layer:
    """One random decoder layer with a KV cache sized for ``max_len`` tokens."""

    def __init__(self, shape: str, preset: str, dtype, device, max_len: int, seed: int = 0):
        from ostquant.runtime import KVCache
        from ostquant.runtime.model import random_layers

        self.spec, layers, self.rotary, _ = random_layers(shape, preset, 1, dtype, device, seed)
        self.layer = layers[0]
        self.dtype, self.device = dtype, torch.device(device)
        self.cache = KVCache(1, 1, max_len, self.spec.num_kv_heads, self.spec.head_dim,
                             self.spec.kv_bits, dtype=dtype, device=device)

    def rope(self, seqlen: int, start: int = 0):
        pos = torch.arange(start, start + seqlen, device=self.device)[None]
        return self.rotary(pos, self.dtype)

    def prefill(self, x, cos, sin):
        """One layer forward of ``x`` [1, S, H] from an empty cache (the layer writes the
        cache at slots 0..S-1 and does not advance its lengths, so calls repeat)."""
        return self.layer(x, cos, sin, self.cache, True)

    def weight_bytes(self) -> int:
        seen, n = set(), 0
        for t in list(self.layer.parameters()) + list(self.layer.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                n += t.numel() * t.element_size()
        return n


def check(lay: Layer, seqlen: int, what: str, tol: float) -> None:
    """Finite output, and two-chunk prefill == one-chunk prefill (on the layer's update).

    Run on a float32 layer: in float32 the fresh-prefill SDPA and the decode attention op
    agree to float rounding, so only a rare int4 activation code moves (in bf16 many do:
    with random weights the two prefills then differ by several percent, too close to what
    a subtly broken kernel would give)."""
    H = lay.spec.hidden_size
    g = torch.Generator(device=lay.device).manual_seed(1)
    x = torch.randn(1, seqlen, H, generator=g, device=lay.device).to(lay.dtype)
    cos, sin = lay.rope(seqlen)
    full = lay.prefill(x, cos, sin) - x
    if not torch.isfinite(full).all():
        raise AssertionError(f"{what}: non-finite prefill output")
    h = seqlen // 3
    c = lay.cache
    c.reset()
    a = lay.layer(x[:, :h], cos[:, :h], sin[:, :h], c, True) - x[:, :h]
    c.advance([h])
    b = lay.layer(x[:, h:], cos[:, h:], sin[:, h:], c, False) - x[:, h:]
    c.reset()
    two = torch.cat([a, b], 1).float()
    err = ((two - full.float()).norm() / full.float().norm()).item()
    if not err <= tol:
        raise AssertionError(f"{what}: chunked prefill differs from one-chunk prefill "
                             f"(relative error {err:.3g} > {tol})")
    print(f"[check] {what}: output finite, chunked vs one-chunk prefill rel. error {err:.2e}")


def measure(lay: Layer, seqlen: int, dry_run: bool) -> Dict[str, float]:
    H = lay.spec.hidden_size
    x_bytes = seqlen * H * 2
    g = torch.Generator(device=lay.device).manual_seed(2)
    nsets = 1 if dry_run else common.num_sets(x_bytes)
    sets = [(torch.randn(1, seqlen, H, generator=g, device=lay.device).to(lay.dtype),)
            for _ in range(nsets)]
    cos, sin = lay.rope(seqlen)
    fn = lambda x: lay.prefill(x, cos, sin)  # noqa: E731
    if dry_run:
        out = fn(*sets[0])
        assert out.shape == (1, seqlen, H) and torch.isfinite(out).all()
        return {}
    ms = common.time_ms(fn, sets)
    x = sets[0][0]
    del sets
    gc.collect()
    torch.cuda.empty_cache()
    from ostquant.runtime.memory import measure_peak
    _, peak = measure_peak(lambda: fn(x), lay.device)
    return {"ms": ms, "peak": peak}


def _one(rows, model: str, seqlen: int, preset: str, check_first: bool, dry_run: bool,
         device: str) -> None:
    """Check (``check_first``) and time ours and the bf16 layer at one (model, seqlen)."""
    dtype = torch.bfloat16
    tol = 1e-2 if "a4" in preset else 1e-3
    res = {}
    for side, p in (("ours", preset), ("baseline", "w16a16kv16")):
        if check_first:
            lay = Layer(model, p, torch.float32, device, CHECK_LEN)
            check(lay, min(CHECK_LEN, seqlen), f"{model} {side} ({p})",
                  tol if side == "ours" else 1e-3)
            del lay
        lay = Layer(model, p, dtype, device, seqlen)
        try:
            m = measure(lay, seqlen, dry_run)
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
            m = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        m["weights"] = lay.weight_bytes()
        m["kv"] = lay.cache.nbytes
        res[side] = m
        del lay
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if dry_run:
        print(f"[dry-run] {model} seqlen={seqlen}: ours ({preset}) and bf16 layers ran")
        return True
    o, b = res["ours"], res["baseline"]
    row = {"model": model, "seqlen": seqlen, "batch": 1, "preset": preset,
           "ours_ms": o.get("ms"), "baseline": "bf16", "baseline_ms": b.get("ms"),
           "speedup": b["ms"] / o["ms"] if "ms" in o and "ms" in b else None,
           "ours_peak_bytes": o.get("peak"), "baseline_peak_bytes": b.get("peak"),
           "memory_saving": b["peak"] / o["peak"] if "peak" in o and "peak" in b else None,
           "ours_weight_bytes": o["weights"], "baseline_weight_bytes": b["weights"],
           "ours_kv_bytes": o["kv"], "baseline_kv_bytes": b["kv"]}
    for side in ("ours", "baseline"):
        if "error" in res[side]:
            row[f"{side}_error"] = res[side]["error"]
    rows.append(row)
    print(f"{model} seqlen={seqlen}: ours {row['ours_ms']} ms, bf16 {row['baseline_ms']} ms, "
          f"speedup {row['speedup']}, memory saving {row['memory_saving']}")
    sys.stdout.flush()
    return True


def run(models, seqlens, preset: str, dry_run: bool, device: str, rows=None) -> List[dict]:
    rows = rows if rows is not None else common.Rows(BENCH)
    for model in models:
        checked = False  # the float32 check runs until it has passed once for the model
        for seqlen in seqlens:
            checked = bool(rows.guard(f"{model} seqlen={seqlen}", _one, rows, model, seqlen,
                                      preset, not checked, dry_run, device)) or checked
    return rows


def main(argv=None) -> int:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help=f"comma list from {', '.join(MODELS)}")
    ap.add_argument("--seqlens", default=None, help="comma list of sequence lengths")
    ap.add_argument("--preset", default="w4a4kv4",
                    help="our layer's preset (w4a4kv4, w4a4kv16, w4a16kv16)")
    args = ap.parse_args(argv)
    models = args.models.split(",") if args.models else None
    seqlens = [int(s) for s in args.seqlens.split(",")] if args.seqlens else None
    if args.dry_run:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        run(models or DRY_MODELS, seqlens or DRY_SEQLENS, args.preset, True, device)
        print("[dry-run] prefill: ok (no timings, no JSON)")
        return 0
    common.require_cuda(BENCH)
    missing = {"int4_gemm", "quantize_per_token_packed", "rmsnorm_quantize_per_token",
               "hadamard_quantize_per_token", "hadamard_transform",
               "kv_cache_append_fused"} - set(O.cuda_ops())
    if missing:
        print(f"warning: no CUDA kernel for {sorted(missing)}: those run the reference",
              file=sys.stderr)
    if models is None:
        models = QUICK_MODELS if args.quick else MODELS
    if seqlens is None:
        seqlens = QUICK_SEQLENS if args.quick else SEQLENS
    rows, rc = common.collect(
        BENCH, args, lambda r: run(models, seqlens, args.preset, False, "cuda", r))
    common.print_table(common.measured(rows), ["model", "seqlen", "ours_ms", "baseline_ms",
                                               "speedup", "ours_peak_bytes",
                                               "baseline_peak_bytes", "memory_saving"])
    return rc


if __name__ == "__main__":
    sys.exit(main())
