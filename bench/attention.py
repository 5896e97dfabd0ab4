"""int4-KV attention (decode, prefill) and cache append vs bf16 attention over a bf16 cache.

    python -m bench.attention              # H100/H200: writes bench/results/attention-<dev>.json
    python -m bench.attention --quick      # fewer sizes
    python -m bench.attention --dry-run    # any device (CPU: reference ops), tiny sizes, no JSON

Rows (RESULTS.md ``attention``): phase, model, batch, context, ours_ms, baseline, baseline_ms,
speedup, plus heads, cache bytes per token and GB/s.

* ``decode``: one query token per sequence, every sequence ``context`` tokens long,
  ``ostquant.ops.int4_kv_attention`` over the int4 cache vs bf16 SDPA (``enable_gqa``) over a
  bf16 cache holding the same K/V, and vs ``flash_attn_with_kvcache`` when flash-attn is
  importable (one row per baseline). Batch {1, 8, 32} × context {1K, 4K, 16K, 32K}; LLaMA-3-8B
  heads (32 q / 8 kv, head_dim 128) and LLaMA-2-7B heads (32 / 32). Target (DESIGN.md):
  ≥ 2.5× bf16 at ≥ 8K context. ``ours_gbps`` = int4 cache bytes read / time.
* ``prefill``: causal attention of ``context`` new tokens over themselves (batch 1).
* ``append_decode`` / ``append_prefill``: ``kv_cache_append`` of 1 token per sequence (batch
  32) / ``context`` tokens (batch 1) vs writing the same bf16 K/V into a bf16 cache (index copy).
  ``tokens_per_s`` is appended tokens (× layers = 1) per second.

Cache memory per token and layer: int4 = 2·Hkv·(D/2 + 4) bytes (codes + fp16 scale and zero),
bf16 = 2·Hkv·D·2 bytes; ``memory_ratio`` = bf16 / int4 (3.76× at D = 128).

Before timing, every configuration checks the int4 attention against float32 SDPA over the
dequantized cache (first two sequences) and stops on a mismatch.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from bench import common
from ostquant import ops as O
from ostquant.ops import reference as ref

BENCH = "attention"
MODELS: Dict[str, tuple] = {"llama3-8b": (32, 8, 128), "llama2-7b": (32, 32, 128)}
BATCHES = (1, 8, 32)
CONTEXTS = (1024, 4096, 16384, 32768)
QUICK_BATCHES = (1, 8)
QUICK_CONTEXTS = (4096, 16384)
PREFILL_CONTEXTS = (1024, 4096)
DRY_MODELS: Dict[str, tuple] = {"tiny-gqa": (4, 2, 64), "tiny-mha": (3, 3, 128)}
DRY_BATCHES = (1, 2)
DRY_CONTEXTS = (17, 64)
FILL_CHUNK = 2048


def int4_bytes_per_token(hkv: int, d: int) -> int:
    return 2 * hkv * (d // 2 + 4)


def bf16_bytes_per_token(hkv: int, d: int) -> int:
    return 2 * hkv * d * 2


def _flash_attn():
    try:
        from flash_attn import flash_attn_with_kvcache  # type: ignore
        return flash_attn_with_kvcache
    except Exception:  # noqa: BLE001 - not installed / built for another torch
        return None


class Caches:
    """Int4 cache + a bf16 cache [B, S, Hkv, D] holding the same (unquantized) K/V."""

    def __init__(self, B, S, hkv, d, device, with_bf16=True, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        self.k = list(O.int4_kv_tensors(B, S, hkv, d, device))  # the runtime's layout
        self.v = list(O.int4_kv_tensors(B, S, hkv, d, device))
        self.kb = torch.empty(B, S, hkv, d, dtype=torch.bfloat16, device=device) if with_bf16 else None
        self.vb = torch.empty_like(self.kb) if with_bf16 else None
        for s0 in range(0, S, FILL_CHUNK):
            n = min(FILL_CHUNK, S - s0)
            k = torch.randn(B, n, hkv, d, generator=g, device=device).to(torch.bfloat16)
            v = torch.randn(B, n, hkv, d, generator=g, device=device).to(torch.bfloat16)
            O.kv_cache_append(k, v, *self.k, *self.v,
                              torch.full((B,), s0, dtype=torch.int32, device=device))
            if with_bf16:
                self.kb[:, s0:s0 + n] = k
                self.vb[:, s0:s0 + n] = v
        self.lens = torch.full((B,), S, dtype=torch.int32, device=device)


def sdpa_reference(q, caches: Caches, nseq: int, causal: bool) -> torch.Tensor:
    """float32 SDPA over the dequantized int4 cache for the first ``nseq`` sequences."""
    kc = [t[:nseq] for t in caches.k]
    vc = [t[:nseq] for t in caches.v]
    k = ref.dequantize_kv(*kc).transpose(1, 2)  # [n, Hkv, S, D]
    v = ref.dequantize_kv(*vc).transpose(1, 2)
    qf = q[:nseq].float().transpose(1, 2)  # [n, Hq, Sq, D]
    group = qf.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    S, Sq = k.shape[2], qf.shape[2]
    mask = None
    if causal:
        qpos = S - Sq + torch.arange(Sq, device=q.device)
        mask = torch.arange(S, device=q.device)[None, :] <= qpos[:, None]
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def check(q, caches: Caches, causal: bool, what: str) -> None:
    out = O.int4_kv_attention(q, *caches.k, *caches.v, caches.lens, causal=causal)
    n = min(2, q.shape[0])
    want = sdpa_reference(q, caches, n, causal)
    got = out[:n].float()
    err = float((got - want).abs().max())
    scale = max(1.0, float(want.abs().max()))
    if not bool(torch.isfinite(got).all()) or err > 2e-2 * scale:
        raise AssertionError(f"{what}: int4 attention differs from float32 SDPA over the "
                             f"dequantized cache (max abs err {err:.3g})")


def _sdpa_bf16(q, kb, vb, causal):
    # q [B, Sq, Hq, D], kb/vb [B, S, Hkv, D] -> SDPA layout (views, no copies)
    return F.scaled_dot_product_attention(q.transpose(1, 2), kb.transpose(1, 2),
                                          vb.transpose(1, 2), is_causal=causal, enable_gqa=True)


def _time_attention(phase, model, heads, B, ctx, device, dry_run, rows):
    hq, hkv, d = heads
    sq = 1 if phase == "decode" else ctx
    caches = Caches(B, ctx, hkv, d, device, with_bf16=not dry_run)
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(B, sq, hq, d, generator=g, device=device).to(torch.bfloat16)
    what = f"{phase} {model} batch={B} context={ctx}"
    check(q, caches, True, what)
    if dry_run:
        print(f"[dry-run] {what}: matches float32 SDPA over the dequantized cache")
        return
    ours = common.time_ms(
        lambda qq: O.int4_kv_attention(qq, *caches.k, *caches.v, caches.lens, causal=True),
        [(q,)])
    base = {}
    try:
        base["sdpa_bf16"] = common.time_ms(lambda qq: _sdpa_bf16(qq, caches.kb, caches.vb, sq > 1),
                                           [(q,)])
    except RuntimeError as e:  # a torch without enable_gqa support for this shape
        print(f"warning: bf16 SDPA baseline failed for {what}: {e}", file=sys.stderr)
    fa = _flash_attn()
    if fa is not None:
        base["flash_attn_bf16"] = common.time_ms(
            lambda qq: fa(qq, caches.kb, caches.vb, cache_seqlens=caches.lens, causal=True),
            [(q,)])
    kv_bytes = int4_bytes_per_token(hkv, d) * B * ctx
    for name, bms in base.items():
        rows.append({"phase": phase, "model": model, "batch": B, "context": ctx,
                     "heads_q": hq, "heads_kv": hkv, "head_dim": d, "ours_ms": ours,
                     "baseline": name, "baseline_ms": bms, "speedup": bms / ours,
                     "ours_bytes_per_token": int4_bytes_per_token(hkv, d),
                     "baseline_bytes_per_token": bf16_bytes_per_token(hkv, d),
                     "memory_ratio": bf16_bytes_per_token(hkv, d) / int4_bytes_per_token(hkv, d),
                     "ours_gbps": kv_bytes / ours / 1e6})
    if not base:
        rows.append({"phase": phase, "model": model, "batch": B, "context": ctx, "ours_ms": ours,
                     "baseline": "none", "baseline_ms": None, "speedup": None})
    del caches
    if device == "cuda":
        torch.cuda.empty_cache()


def _time_append(phase, model, heads, B, S, device, dry_run, rows):
    hq, hkv, d = heads
    cap = S + 1
    g = torch.Generator(device=device).manual_seed(2)
    kc = list(O.int4_kv_tensors(B, cap, hkv, d, device))
    vc = list(O.int4_kv_tensors(B, cap, hkv, d, device))
    k = torch.randn(B, S, hkv, d, generator=g, device=device).to(torch.bfloat16)
    v = torch.randn(B, S, hkv, d, generator=g, device=device).to(torch.bfloat16)
    lens = torch.ones(B, dtype=torch.int32, device=device)
    O.kv_cache_append(k, v, *kc, *vc, lens)
    kq, ks, kz = ref.quantize_kv(k)
    if not (torch.equal(kc[0][:, 1:], kq) and torch.equal(kc[1][:, 1:], ks)
            and torch.equal(kc[2][:, 1:], kz)):
        raise AssertionError(f"{phase} {model}: cache contents differ from reference.quantize_kv")
    what = f"{phase} {model} batch={B} tokens={S}"
    if dry_run:
        print(f"[dry-run] {what}: cache bit-exact vs the reference quantizer")
        return
    ours = common.time_ms(lambda: O.kv_cache_append(k, v, *kc, *vc, lens), [()])
    kb = torch.zeros(B, cap, hkv, d, dtype=torch.bfloat16, device=device)
    vb = torch.zeros_like(kb)

    def bf16_append():
        kb[:, 1:1 + S] = k
        vb[:, 1:1 + S] = v
    base = common.time_ms(bf16_append, [()])
    tokens = B * S
    rows.append({"phase": phase, "model": model, "batch": B, "context": S, "heads_kv": hkv,
                 "head_dim": d, "ours_ms": ours, "baseline": "bf16_cache_write",
                 "baseline_ms": base, "speedup": base / ours,
                 "tokens_per_s": tokens / (ours / 1e3),
                 "ours_gbps": (tokens * (2 * hkv * d * 2) + tokens * int4_bytes_per_token(hkv, d))
                 / ours / 1e6})


def run(models, batches, contexts, prefill_contexts, device, dry_run,
        rows=None) -> List[dict]:
    rows = rows if rows is not None else common.Rows(BENCH)
    for model, heads in models.items():
        for B in batches:
            for ctx in contexts:
                rows.guard(f"decode {model} batch={B} context={ctx}", _time_attention,
                           "decode", model, heads, B, ctx, device, dry_run, rows)
        for ctx in prefill_contexts:
            rows.guard(f"prefill {model} context={ctx}", _time_attention,
                       "prefill", model, heads, 1, ctx, device, dry_run, rows)
        rows.guard(f"append_decode {model} batch={max(batches)}", _time_append,
                   "append_decode", model, heads, max(batches), 1, device, dry_run, rows)
        rows.guard(f"append_prefill {model} tokens={max(prefill_contexts)}", _time_append,
                   "append_prefill", model, heads, 1, max(prefill_contexts), device, dry_run,
                   rows)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = common.base_parser(__doc__.splitlines()[0])
    args = ap.parse_args(argv)
    if args.dry_run:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        run(DRY_MODELS, DRY_BATCHES, DRY_CONTEXTS, (16,), device, True)
        for model, (hq, hkv, d) in MODELS.items():
            print(f"[dry-run] {model}: cache bytes per token and layer: int4 "
                  f"{int4_bytes_per_token(hkv, d)}, bf16 {bf16_bytes_per_token(hkv, d)} "
                  f"({bf16_bytes_per_token(hkv, d) / int4_bytes_per_token(hkv, d):.2f}x)")
        print("[dry-run] attention: ok (no timings, no JSON)")
        return 0
    common.require_cuda(BENCH)
    missing = {"kv_cache_append", "int4_kv_attention"} - set(O.cuda_ops())
    if missing:
        print(f"warning: no CUDA kernel for {sorted(missing)} (ostquant._C not built?); timing "
              f"the reference", file=sys.stderr)
    batches, contexts = (QUICK_BATCHES, QUICK_CONTEXTS) if args.quick else (BATCHES, CONTEXTS)
    prefill = PREFILL_CONTEXTS[:1] if args.quick else PREFILL_CONTEXTS
    rows, rc = common.collect(
        BENCH, args, lambda r: run(MODELS, batches, contexts, prefill, "cuda", False, r))
    common.print_table(common.measured(rows), ["phase", "model", "batch", "context", "ours_ms",
                                               "baseline", "baseline_ms", "speedup"])
    return rc


if __name__ == "__main__":
    sys.exit(main())
