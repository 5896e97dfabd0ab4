"""Decode throughput (paper Table 10): a quantized model vs the bf16 model of the same shape.

    python -m bench.decode              # H100/H200: writes bench/results/decode-<dev>.json
    python -m bench.decode --quick      # llama-3-8b, plus llama-3-70b at batch 1
    python -m bench.decode --dry-run    # any device: tiny shape, consistency checks, no JSON

For each shape (LLaMA-2-7B, LLaMA-3-8B, LLaMA-2-13B, LLaMA-30B, LLaMA-3-70B), batch 1 and 16,
context 2048:
a whole model with random weights (:meth:`ostquant.runtime.QuantizedCausalLM.random`:
embeddings, the decoder layers, final norm, lm_head) runs one decode step (one new token per
sequence, logits of that token) against a KV cache holding ``context`` tokens per sequence:

* ``ours``: ``--preset`` (default W4A4KV4: int4 weights and activations, int4 KV cache with
  ``int4_kv_attention``, online Hadamards);
* ``baseline``: the same runtime in bf16 (``nn.Linear``, bf16 KV cache, masked SDPA), in the
  same run.

Each side is timed twice: eager (one Python call per op, as ``generate()`` runs by default)
and replaying the step captured in a CUDA graph
(:class:`ostquant.runtime.CUDAGraphDecoder`, as ``generate(..., cuda_graph=True)``; skip with
``--no-graph``). Both include the cache rewind after the step (one tiny kernel).

Layers: as many as fit — the full depth when the bf16 model (weights + cache + a margin) fits
in free GPU memory, else the largest count that does, used for both (``layers`` vs
``full_layers``). When ours fits at full depth and bf16 does not, an extra row times ours
alone at full depth (``baseline_ms: null``: the largest model that fits where bf16 does not).
The cache is filled with random values (timing does not depend on them) and rewound after
every step, so each timed step runs at exactly ``context``.

Rows (RESULTS.md ``decode``): model, layers, batch, context, ours_tok_s, baseline_tok_s,
speedup, ours_bytes, baseline_bytes (CUDA ``max_memory_allocated`` during one step: weights +
cache + activations), plus ours_ms / baseline_ms per step and the weight / KV bytes; with
graphs also ours_graph_tok_s, baseline_graph_tok_s, ours_graph_ms, baseline_graph_ms,
graph_speedup (ours vs bf16, both replayed) and ours_graph_gain (graph vs eager, ours); a side
whose step cannot be captured gets ``<side>_graph_error`` instead.
Target (DESIGN.md): >= 2.5x tokens/s at batch 1. Eager, the batch-1 step includes the Python
and launch overhead of every op; the graph rows show how much of it a replay removes.

Before timing, each shape is checked on 2 layers at a short context: decode-step logits match
the logits of a one-shot prefill of the same tokens, and (CUDA) the replayed graph's logits
match the eager decode steps.
"""
from __future__ import annotations

import gc
import sys
from typing import Dict, List, Optional

import torch

from bench import common
from ostquant import ops as O

BENCH = "decode"
MODELS = ["llama-2-7b", "llama-3-8b", "llama-2-13b", "llama-30b", "llama-3-70b"]
BATCHES = [1, 16]
CONTEXT = 2048
QUICK_MODELS = ["llama-3-8b"]
#: --quick also times the largest shape at batch 1: int4 at full depth where bf16 does not fit
QUICK_LARGE = ("llama-3-70b", [1])
DRY_MODELS = ["tiny"]
DRY_BATCHES = [1, 2]
DRY_CONTEXT = 12
#: fraction of free GPU memory a model (weights + cache) may use; the rest is for activations
#: (the reference int4 attention dequantizes a layer's cache: ~1 GB at batch 16, 2K, 7B)
MEMORY_FRACTION = 0.85
#: relative error allowed between two float32 computations of the same logits (see
#: bench/prefill.py)
CHECK_TOL = {"a4": 1e-2, "other": 1e-3}


def preset_tol(preset: str) -> str:
    return "a4" if "a4" in preset else "other"


def _empty_cache():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_bytes(shape: str, preset: str, layers: int, batch: int, context: int) -> int:
    """Weights + KV cache bytes of a random runtime model (computed, nothing allocated)."""
    from ostquant.quant import get_preset
    from ostquant.runtime import KVCache, shape_config

    c = shape_config(shape)
    qc = get_preset(preset)
    H, Fi, V = c.hidden_size, c.intermediate_size, c.vocab_size
    hd = getattr(c, "head_dim", None) or H // c.num_attention_heads
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    rows = (nh + 2 * nkv) * hd + H + 2 * Fi + H
    n = H * (nh + 2 * nkv) * hd + nh * hd * H + 3 * H * Fi
    per_layer = (n // 2 + 8 * rows if qc.wbits == 4 else 2 * n) + 4 * H
    kv = KVCache.bytes_for(layers, batch, context + 1, nkv, hd, qc.kvbits, torch.bfloat16)
    return 2 * V * H * 2 + 2 * H + layers * per_layer + kv


def fit_layers(shape: str, preset: str, batch: int, context: int, budget: int) -> int:
    """Most layers (<= the shape's depth) whose weights + cache fit in ``budget`` bytes."""
    from ostquant.runtime import shape_config

    full = shape_config(shape).num_hidden_layers
    best = 0
    for n in range(1, full + 1):
        if model_bytes(shape, preset, n, batch, context) <= budget:
            best = n
    return best


def fill_cache(cache, context: int, gen: torch.Generator) -> None:
    """Random cache contents for ``context`` tokens per sequence, lengths set to it."""
    for lay in cache.layers:
        if cache.kv_bits == 4:
            for codes, scale, zero in (lay[:3], lay[3:]):
                codes.random_(0, 256, generator=gen)
                scale.uniform_(0.01, 0.1, generator=gen)
                zero.random_(-8, 8, generator=gen)
        else:
            for t in lay:
                t.normal_(0.0, 1.0, generator=gen)
    cache.reset([context] * cache.batch_size)


def check(shape: str, preset: str, batch: int, device: str, context: int = 24,
          graph: bool = False) -> None:
    """2 layers of ``shape`` in float32: decode steps after a short prefill == one-shot
    prefill logits (the timed runs are bf16; float32 keeps the two attention paths within
    float rounding, see bench/prefill.py); with ``graph`` also CUDA-graph decode == eager
    decode (:func:`check_graph`)."""
    from ostquant.runtime import QuantizedCausalLM

    m = QuantizedCausalLM.random(shape, preset, num_layers=2, dtype=torch.float32,
                                 device=device, seed=1)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, m.spec.vocab_size, (batch, context), generator=g).to(device)
    full = m(ids, m.new_cache(batch, context), logits="all")[:, -4:].float()
    cache = m.new_cache(batch, context)
    m(ids[:, :-4], cache, logits="none")
    steps = torch.stack([m(ids[:, i:i + 1], cache, logits="last") for i in
                         range(context - 4, context)], 1).float()
    err = ((steps - full).norm() / full.norm()).item()
    tol = CHECK_TOL[preset_tol(preset)]
    if not (torch.isfinite(steps).all() and err <= tol):
        raise AssertionError(f"{shape} {preset}: decode logits differ from prefill logits "
                             f"(relative error {err:.3g} > {tol})")
    print(f"[check] {shape} {preset} batch {batch}: decode vs prefill logits rel. error "
          f"{err:.2e}")
    if graph:
        check_graph(m, ids, steps, tol, f"{shape} {preset} batch {batch}")
    del m, cache
    _empty_cache()


def check_graph(m, ids: torch.Tensor, steps: torch.Tensor, tol: float, what: str) -> None:
    """The last 4 tokens of ``ids`` decoded by a replayed CUDA graph give the eager decode
    steps' logits ``steps`` (within ``tol``; an int4 cache runs the very same kernels). Prints
    why when the step cannot be captured (the timed run then records the reason)."""
    from ostquant.runtime import CUDAGraphDecoder, CUDAGraphUnavailable

    cache = m.new_cache(ids.shape[0], ids.shape[1])
    m(ids[:, :-4], cache, logits="none")
    try:
        g = CUDAGraphDecoder(m, cache)
    except CUDAGraphUnavailable as e:
        print(f"[check] {what}: no CUDA graph ({e})")
        return
    got = torch.stack([g.step(ids[:, i]).clone() for i in range(ids.shape[1] - 4,
                                                                  ids.shape[1])], 1).float()
    err = ((got - steps).norm() / steps.norm()).item()
    if not (torch.isfinite(got).all() and err <= tol):
        raise AssertionError(f"{what}: CUDA-graph decode logits differ from eager decode "
                             f"(relative error {err:.3g} > {tol})")
    print(f"[check] {what}: CUDA-graph vs eager decode logits rel. error {err:.2e}")


def graph_step(m, cache):
    """A timed decode step replaying the CUDA graph of ``m`` over ``cache`` (then rewinding
    the cache, like the eager step). Raises ``CUDAGraphUnavailable`` when it cannot be
    captured."""
    from ostquant.runtime import CUDAGraphDecoder

    g = CUDAGraphDecoder(m, cache)

    def step(ids):
        out = g.step(ids)
        cache.rewind(1)
        return out

    return step


def measure(shape: str, preset: str, layers: int, batch: int, context: int, device: str,
            dry_run: bool, graph: bool = False) -> Dict[str, float]:
    from ostquant.runtime import CUDAGraphUnavailable, QuantizedCausalLM
    from ostquant.runtime.memory import measure_peak, weight_bytes

    m = QuantizedCausalLM.random(shape, preset, num_layers=layers, dtype=torch.bfloat16,
                                 device=device)
    cache = m.new_cache(batch, context + 1)
    gen = torch.Generator(device=device).manual_seed(4)
    fill_cache(cache, context, gen)
    ids = torch.randint(0, m.spec.vocab_size, (batch, 1), generator=gen, device=device)

    def step(ids):
        out = m(ids, cache, logits="last")
        cache.rewind(1)
        return out

    out = step(ids)
    assert out.shape == (batch, m.spec.vocab_size) and cache.lengths == [context] * batch
    res = {"weights": sum(weight_bytes(m)), "kv": cache.nbytes}
    if dry_run:
        assert torch.isfinite(out).all()
    else:
        ms = common.time_ms(step, [(ids,)])
        _, peak = measure_peak(lambda: step(ids), torch.device(device))
        res.update(ms=ms, tok_s=batch / ms * 1e3, peak=peak)
    if graph:
        try:
            gstep = graph_step(m, cache)
        except CUDAGraphUnavailable as e:
            res["graph_error"] = str(e)
        else:
            gout = gstep(ids)
            assert gout.shape == out.shape and torch.isfinite(gout).all()
            if not dry_run:
                gms = common.time_ms(gstep, [(ids,)])
                res.update(graph_ms=gms, graph_tok_s=batch / gms * 1e3)
            del gstep, gout
    del m, cache
    _empty_cache()
    return res


def _row(model, layers, full, batch, context, preset, o, b) -> dict:
    return {"model": model, "layers": layers, "full_layers": full, "batch": batch,
            "context": context, "preset": preset,
            "ours_tok_s": o.get("tok_s"), "baseline": "bf16",
            "baseline_tok_s": None if b is None else b.get("tok_s"),
            "speedup": (o["tok_s"] / b["tok_s"]) if b and "tok_s" in b and "tok_s" in o
            else None,
            "ours_ms": o.get("ms"), "baseline_ms": None if b is None else b.get("ms"),
            "ours_bytes": o.get("peak"), "baseline_bytes": None if b is None else b.get("peak"),
            "ours_weight_bytes": o["weights"], "ours_kv_bytes": o["kv"],
            "baseline_weight_bytes": None if b is None else b["weights"],
            "baseline_kv_bytes": None if b is None else b["kv"],
            **_graph_fields(o, b)}


def _graph_fields(o: dict, b: Optional[dict]) -> dict:
    """The CUDA-graph columns of a row (only when graphs were timed or refused)."""
    if not any(k in d for d in (o, b or {}) for k in ("graph_ms", "graph_error")):
        return {}
    og, bg = o.get("graph_tok_s"), None if b is None else b.get("graph_tok_s")
    row = {"ours_graph_tok_s": og, "baseline_graph_tok_s": bg,
           "ours_graph_ms": o.get("graph_ms"),
           "baseline_graph_ms": None if b is None else b.get("graph_ms"),
           "graph_speedup": og / bg if og and bg else None,
           "ours_graph_gain": og / o["tok_s"] if og and o.get("tok_s") else None}
    for side, d in (("ours", o), ("baseline", b or {})):
        if "graph_error" in d:
            row[f"{side}_graph_error"] = d["graph_error"]
    return row


def _one(rows, model: str, batch: int, context: int, preset: str, check_first: bool,
         dry_run: bool, device: str, layers_override: Optional[int], graph: bool) -> bool:
    """Check (``check_first``) and time one decode step of ours and bf16 at (model, batch)."""
    from ostquant.runtime import shape_config

    full = shape_config(model).num_hidden_layers
    if check_first:
        check(model, preset, batch, device, graph=graph)
        check(model, "w16a16kv16", batch, device, graph=graph)
    if dry_run or layers_override:
        layers = ours_fit = layers_override or full
    else:
        _empty_cache()
        budget = int(torch.cuda.mem_get_info()[0] * MEMORY_FRACTION)
        layers = fit_layers(model, "w16a16kv16", batch, context, budget)
        ours_fit = fit_layers(model, preset, batch, context, budget)
        if layers == 0:
            print(f"{model} batch {batch}: not even one bf16 layer fits; skipped")
            return True
    res = {}
    for side, p in (("ours", preset), ("baseline", "w16a16kv16")):
        try:
            res[side] = measure(model, p, layers, batch, context, device, dry_run, graph)
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
            res[side] = {"error": f"out of memory: {str(e).splitlines()[0]}",
                         "weights": None, "kv": None}
            _empty_cache()
    if dry_run:
        how = "eager and CUDA-graph" if graph else "eager"
        print(f"[dry-run] {model} batch={batch} context={context} layers={layers}: "
              f"ours ({preset}) and bf16 decode steps ran ({how})")
        for side in ("ours", "baseline"):
            if "graph_error" in res[side]:
                print(f"[dry-run] {side}: {res[side]['graph_error']}")
        return True
    row = _row(model, layers, full, batch, context, preset, res["ours"], res["baseline"])
    for side in ("ours", "baseline"):
        if "error" in res[side]:
            row[f"{side}_error"] = res[side]["error"]
    rows.append(row)
    rows.flush()
    print(f"{model} layers={layers}/{full} batch={batch} context={context}: ours "
          f"{row['ours_tok_s']} tok/s, bf16 {row['baseline_tok_s']} tok/s, speedup "
          f"{row['speedup']}")
    if "ours_graph_tok_s" in row:
        print(f"  CUDA graph: ours {row['ours_graph_tok_s']} tok/s, bf16 "
              f"{row['baseline_graph_tok_s']} tok/s, speedup {row['graph_speedup']} "
              f"(ours graph vs eager {row['ours_graph_gain']})")
    if layers < full and ours_fit == full:
        try:
            o = measure(model, preset, full, batch, context, device, False, graph)
            row = _row(model, full, full, batch, context, preset, o, None)
            row["note"] = "fits where the bf16 model does not"
            rows.append(row)
            print(f"{model} layers={full} batch={batch}: ours {o['tok_s']} tok/s "
                  f"(bf16 does not fit)")
        except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
            _empty_cache()
    sys.stdout.flush()
    return True


def run(models, batches, context: int, preset: str, dry_run: bool, device: str,
        layers_override: Optional[int] = None, graph: bool = True, rows=None) -> List[dict]:
    rows = rows if rows is not None else common.Rows(BENCH)
    graph = graph and torch.device(device).type == "cuda"
    for model in models:
        checked = False  # the float32 checks run until they have passed once for the model
        for batch in batches:
            checked = bool(rows.guard(f"{model} batch={batch} context={context}", _one, rows,
                                      model, batch, context, preset, not checked, dry_run,
                                      device, layers_override, graph)) or checked
    return rows


def main(argv=None) -> int:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help=f"comma list from {', '.join(MODELS)}")
    ap.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,16)")
    ap.add_argument("--context", type=int, default=None, help=f"default {CONTEXT}")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: as many as fit, up to the full depth)")
    ap.add_argument("--preset", default="w4a4kv4",
                    help="our model's preset (w4a4kv4, w4a4kv16, w4a16kv16)")
    ap.add_argument("--no-graph", action="store_true",
                    help="time eager decode steps only (no CUDA-graph replay)")
    args = ap.parse_args(argv)
    models = args.models.split(",") if args.models else None
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    if args.dry_run:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and not args.no_graph:
            print("[dry-run] CUDA-graph decode: skipped (CPU)")
        run(models or DRY_MODELS, batches or DRY_BATCHES, args.context or DRY_CONTEXT,
            args.preset, True, device, args.layers, not args.no_graph)
        print("[dry-run] decode: ok (no timings, no JSON)")
        return 0
    common.require_cuda(BENCH)
    missing = {"int4_gemm", "quantize_per_token_packed", "rmsnorm_quantize_per_token",
               "hadamard_quantize_per_token", "hadamard_transform", "kv_cache_append_fused",
               "int4_kv_attention"} - set(O.cuda_ops())
    if missing:
        print(f"warning: no CUDA kernel for {sorted(missing)}: those run the reference",
              file=sys.stderr)
    plan = [(models or (QUICK_MODELS if args.quick else MODELS), batches or BATCHES)]
    if args.quick and models is None and batches is None:
        plan.append(([QUICK_LARGE[0]], QUICK_LARGE[1]))

    def measure_plan(r):
        for ms, bs in plan:
            run(ms, bs, args.context or CONTEXT, args.preset, False, "cuda", args.layers,
                not args.no_graph, r)
    rows, rc = common.collect(BENCH, args, measure_plan)
    ok = common.measured(rows)
    common.print_table(ok, ["model", "layers", "batch", "context", "ours_tok_s",
                            "baseline_tok_s", "speedup", "ours_bytes", "baseline_bytes"])
    if not args.no_graph:
        common.print_table(ok, ["model", "layers", "batch", "ours_graph_tok_s",
                                "baseline_graph_tok_s", "graph_speedup", "ours_graph_gain"])
    return rc


if __name__ == "__main__":
    sys.exit(main())
