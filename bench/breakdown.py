"""Where the time goes: per-op breakdown of one quantized decoder layer (prefill and decode).

    python -m bench.breakdown              # H100/H200: writes bench/results/breakdown-<dev>.json
    python -m bench.breakdown --quick      # llama-2-7b only
    python -m bench.breakdown --dry-run    # any device: tiny shape, CPU profiler, no JSON

One decoder layer of the runtime with random weights
(:func:`ostquant.runtime.model.random_layers`, the layer ``bench/prefill.py`` times) at a named
shape (default LLaMA-2-7B and LLaMA-3-8B), ``--preset`` (default W4A4KV4), bf16, in three
cases:

* ``prefill``: batch 1, ``--seqlen`` (2048) new tokens from an empty KV cache;
* ``decode``: batch 1 and 16 (``--batches``), one new token per sequence against a cache
  holding ``--context`` (2048) random tokens per sequence (the layer writes slot ``context``
  and attends to ``context + 1`` tokens; it does not advance the lengths, so calls repeat).

For each case: the layer time (CUDA events around single calls, median of ``--reps`` after a
warm-up; no L2 flush between calls, the same conditions as the profiled calls) and a
``torch.profiler`` trace of ``--iters`` calls with CUDA activity. Every GPU kernel's time is
put in one category:

=============  ==============================================================================
``gemm``       the int4 GEMMs (fused QKV, o_proj, fused gate|up, down_proj; also split per
               projection: ``gemm_qkv_ms`` ...), including their unpack / epilogue kernels
``act_quant``  per-token activation quantization and packing (also the fused RMSNorm /
               Hadamard + quantize ops, when a layer uses them)
``hadamard``   stand-alone online Hadamard transforms (on Q; on the down_proj input)
``attention``  attention over the cache (``int4_kv_attention``; the fresh-prefill SDPA and the
               dequantization of the new K/V it reads)
``kv_append``  K/V append into the cache (with fused RoPE + Hadamard on K for int4)
``other``      everything else: RMSNorm, RoPE on Q, SiLU·mul, residual adds, copies
=============  ==============================================================================

How a kernel gets its category (:func:`categorize`, first match wins):

1. the op that launched it, or one of that op's callers, innermost first, in :data:`OP_TABLE`
   (``ostquant::int4_gemm`` -> gemm, ``aten::scaled_dot_product_attention`` -> attention, ...;
   during profiling the layer's ``cache.append`` / ``cache.attend`` run inside
   ``record_function`` scopes ``breakdown::kv_append`` / ``breakdown::attention``, which are
   in the table too);
2. the kernel's own name in :data:`KERNEL_TABLE` (the ostquant CUDA kernels by name, then
   library kernels: ``flash``/``fmha`` -> attention, ``gemm``/``xmma``/``cutlass`` -> gemm);
3. otherwise ``other`` (the row's ``other_top`` lists the biggest ones, to extend the tables).

Rows (``breakdown``): model, phase, batch, seqlen (new tokens per sequence), context (cached
tokens before the call), preset, layer_ms (CUDA events), profiled_ms (sum of the kernel times
of one call; ``busy_fraction`` = profiled_ms / layer_ms: below 1 the GPU idles between
kernels, e.g. waiting for Python and launches at batch-1 decode), ``<category>_ms`` and
``<category>_pct`` for every category (percent of profiled_ms; they sum to 100),
``gemm_<proj>_ms``, ``other_top``.

``--dry-run`` runs the same code on any device with a tiny shape; on a CPU the profiler records
CPU ops only, and every op's *self* CPU time is categorised from the op names (the same
tables); nothing is written.
"""
from __future__ import annotations

import contextlib
import gc
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from bench import common
from ostquant import ops as O

BENCH = "breakdown"
MODELS = ["llama-2-7b", "llama-3-8b"]
QUICK_MODELS = ["llama-2-7b"]
SEQLEN = 2048
CONTEXT = 2048
BATCHES = [1, 16]
ITERS = 20
REPS = 50
DRY_MODELS = ["tiny"]
DRY_SEQLEN = 16
DRY_CONTEXT = 12
DRY_BATCHES = [1, 2]
DRY_ITERS = 2
DRY_REPS = 3

CATEGORIES = ("gemm", "act_quant", "hadamard", "attention", "kv_append", "other")

#: record_function scopes put around parts of the layer while it is profiled
SCOPE_LAYER = "breakdown::layer"
SCOPE_ATTENTION = "breakdown::attention"
SCOPE_KV_APPEND = "breakdown::kv_append"
#: DecoderLayer attribute -> (scope, short name used in the ``gemm_<name>_ms`` fields)
PROJECTIONS = {"qkv": ("breakdown::qkv", "qkv"), "o_proj": ("breakdown::o_proj", "o_proj"),
               "gate_up": ("breakdown::gate_up", "gate_up"),
               "down_proj": ("breakdown::down_proj", "down")}

#: Op names (a kernel's launching op and its callers, innermost first) -> category. Patterns
#: are full matches. The ostquant ops cover both their CUDA kernels and, on a CPU or where an
#: op has no CUDA kernel, the reference kernel's aten ops.
OP_TABLE: List[Tuple[str, str]] = [
    (re.escape(SCOPE_ATTENTION), "attention"),
    (re.escape(SCOPE_KV_APPEND), "kv_append"),
    (r"ostquant::(int4_gemm|w4a16_gemm)", "gemm"),
    (r"ostquant::(quantize_per_token|quantize_per_token_packed|pack_int4"
     r"|hadamard_quantize_per_token|rmsnorm_quantize_per_token)", "act_quant"),
    (r"ostquant::hadamard_transform", "hadamard"),
    (r"ostquant::(kv_cache_append|kv_cache_append_fused|paged_kv_cache_append|quantize_kv)",
     "kv_append"),
    (r"ostquant::(int4_kv_attention|paged_int4_kv_attention)", "attention"),
    (r"aten::(scaled_dot_product_attention|_scaled_dot_product_\w+|_flash_attention_\w+"
     r"|_efficient_attention_\w+)", "attention"),
]

#: Kernel names -> category (``re.search``, case-insensitive, in order): the ostquant CUDA
#: kernels (csrc/), then common library kernels.
KERNEL_TABLE: List[Tuple[str, str]] = [
    # csrc/gemm: tensor-core small-M kernels, split-K reduce, epilogues, portable-path unpacks
    (r"w4a4_small_m|w4a16_small_m|split_reduce|w4a4_epilogue|w4a16_epilogue|int4_row_sum"
     r"|int4_to_float|unpack_int4", "gemm"),
    # csrc/quant: fused RMSNorm / Hadamard + quantize, per-token quantize, packing
    (r"rmsnorm_quant|hadamard_quant|row_quant|pack_int4", "act_quant"),
    (r"hadamard_kernel", "hadamard"),
    (r"kv_append", "kv_append"),
    (r"kv_attn", "attention"),
    # libraries: flash / memory-efficient / cuDNN attention before the generic GEMM names (the
    # memory-efficient kernels are CUTLASS kernels called fmha_cutlass...)
    (r"flash|fmha|attention|sdpa", "attention"),
    # cuBLAS (``nvjet_*`` on Hopper with recent CUDA, ``sm90_xmma_gemm_*``, ``ampere_*gemm*``),
    # CUTLASS; on a CPU the matmul ops themselves. Not in OP_TABLE: a matmul inside the
    # reference attention op is attention time
    (r"gemm|gemv|nvjet|xmma|wgmma|cutlass|cublas|_int_mm"
     r"|^aten::(mm|bmm|addmm|matmul|linear)$", "gemm"),
]

_OP_RES = [(re.compile(p), c) for p, c in OP_TABLE]
_KERNEL_RES = [(re.compile(p, re.IGNORECASE), c) for p, c in KERNEL_TABLE]
_PROJ_SCOPES = {scope: short for scope, short in PROJECTIONS.values()}


def categorize(name: str, stack: Sequence[str] = ()) -> str:
    """Category of a kernel (or, on a CPU, of an op) called ``name``, launched from within the
    ops / scopes ``stack`` (outermost first). See the module docstring for the rules."""
    for op in reversed(list(stack) + [name]):
        for rx, cat in _OP_RES:
            if rx.fullmatch(op):
                return cat
    for rx, cat in _KERNEL_RES:
        if rx.search(name):
            return cat
    return "other"


def projection_of(stack: Sequence[str]) -> Optional[str]:
    """Short name of the innermost projection scope in ``stack`` (``qkv``, ``o_proj``,
    ``gate_up``, ``down``), or None."""
    for op in reversed(stack):
        if op in _PROJ_SCOPES:
            return _PROJ_SCOPES[op]
    return None


@dataclass(frozen=True)
class Item:
    """One profiled piece of time: a GPU kernel (or a CPU op's self time), its launch stack."""

    name: str
    stack: Tuple[str, ...]
    us: float


def _stack_of(evt) -> Tuple[str, ...]:
    names = []
    p = evt.cpu_parent
    while p is not None:
        names.append(p.name)
        p = p.cpu_parent
    return tuple(reversed(names))


def collect_items(events, device_kernels: bool) -> List[Item]:
    """Items of a ``prof.events()`` list.

    ``device_kernels``: every GPU kernel / memcpy / memset attached to the CPU op that launched
    it (its stack: that op and its callers). Entries named like the CPU event itself are
    skipped: they are not kernels but the GPU-side span of a ``record_function`` scope or the
    legacy per-op total. Otherwise (CPU): every CPU op's self time.
    """
    from torch.autograd import DeviceType

    out: List[Item] = []
    for e in events:
        if getattr(e, "is_async", False) or e.device_type != DeviceType.CPU:
            continue
        stack = _stack_of(e) + (e.name,)
        if device_kernels:
            for k in e.kernels:
                if k.name == e.name:
                    continue
                out.append(Item(k.name, stack, float(k.duration)))
        elif e.self_cpu_time_total > 0:
            out.append(Item(e.name, stack[:-1], float(e.self_cpu_time_total)))
    return out


def _short(name: str, n: int = 60) -> str:
    return name if len(name) <= n else name[:n - 3] + "..."


def summarize(items: Sequence[Item], iters: int = 1, top: int = 3) -> Dict[str, object]:
    """Per-call milliseconds and percentages per category, GEMM time per projection, and the
    biggest ``other`` items, from profiled ``items`` covering ``iters`` calls.

    Returns a flat dict: ``profiled_ms``, ``<cat>_ms``, ``<cat>_pct`` (percent of
    profiled_ms: they sum to 100), ``gemm_<proj>_ms``, ``other_top``. Raises ``ValueError``
    when nothing was profiled.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    per_cat = {c: 0.0 for c in CATEGORIES}
    per_proj = {short: 0.0 for _, short in PROJECTIONS.values()}
    other: Dict[str, float] = {}
    for it in items:
        cat = categorize(it.name, it.stack)
        per_cat[cat] += it.us
        if cat == "gemm":
            proj = projection_of(it.stack)
            if proj is not None:
                per_proj[proj] += it.us
        elif cat == "other":
            other[it.name] = other.get(it.name, 0.0) + it.us
    total = sum(per_cat.values())
    if not total > 0:
        raise ValueError("summarize: no profiled time (did the profiler record any "
                         "kernels / ops?)")
    row: Dict[str, object] = {"profiled_ms": total / iters / 1e3}
    for c in CATEGORIES:
        row[f"{c}_ms"] = per_cat[c] / iters / 1e3
        row[f"{c}_pct"] = 100.0 * per_cat[c] / total
    for short, us in per_proj.items():
        row[f"gemm_{short}_ms"] = us / iters / 1e3
    worst = sorted(other.items(), key=lambda kv: -kv[1])[:top]
    row["other_top"] = "; ".join(f"{_short(n)}: {us / iters / 1e3:.4g} ms" for n, us in worst)
    return row


# ---------------------------------------------------------------------------- the layer
class _Scoped(nn.Module):
    """Runs ``inner`` inside a ``record_function(label)`` scope."""

    def __init__(self, label: str, inner: nn.Module):
        super().__init__()
        self.label = label
        self.inner = inner

    def forward(self, *args):
        with torch.profiler.record_function(self.label):
            return self.inner(*args)


def _scoped_fn(label: str, fn: Callable) -> Callable:
    def call(*args, **kw):
        with torch.profiler.record_function(label):
            return fn(*args, **kw)
    return call


@contextlib.contextmanager
def labelled(layer, cache):
    """Put the layer's projections and the cache's append / attend into ``record_function``
    scopes (:data:`PROJECTIONS`, :data:`SCOPE_KV_APPEND`, :data:`SCOPE_ATTENTION`) for the
    duration of the block; restores both afterwards."""
    mods = {attr: getattr(layer, attr) for attr in PROJECTIONS}
    saved = {name: cache.__dict__.get(name) for name in ("append", "attend")}
    try:
        for attr, (scope, _) in PROJECTIONS.items():
            setattr(layer, attr, _Scoped(scope, mods[attr]))
        cache.append = _scoped_fn(SCOPE_KV_APPEND, cache.append)
        cache.attend = _scoped_fn(SCOPE_ATTENTION, cache.attend)
        yield
    finally:
        for attr, mod in mods.items():
            setattr(layer, attr, mod)
        for name, fn in saved.items():
            if fn is None:
                cache.__dict__.pop(name, None)
            else:
                cache.__dict__[name] = fn


@dataclass(frozen=True)
class Case:
    """One measured configuration: ``batch`` sequences, ``seqlen`` new tokens each, against
    ``context`` cached tokens (0: a prefill from an empty cache)."""

    phase: str
    batch: int
    seqlen: int
    context: int


def cases(seqlen: int, batches: Sequence[int], context: int) -> List[Case]:
    """Prefill at batch 1, then decode at each batch size."""
    return [Case("prefill", 1, seqlen, 0)] + [Case("decode", b, 1, context) for b in batches]


class LayerCase:
    """One random layer of ``shape`` with a KV cache and the inputs of ``case``."""

    def __init__(self, shape: str, preset: str, case: Case, dtype, device, seed: int = 0):
        from bench.decode import fill_cache
        from ostquant.runtime import KVCache
        from ostquant.runtime.model import random_layers

        self.case = case
        self.spec, layers, rotary, _ = random_layers(shape, preset, 1, dtype, device, seed)
        self.layer = layers[0]
        self.device = torch.device(device)
        s = self.spec
        self.cache = KVCache(1, case.batch, case.context + case.seqlen, s.num_kv_heads,
                             s.head_dim, s.kv_bits, dtype=dtype, device=device)
        gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        if case.context:
            fill_cache(self.cache, case.context, gen)
        self.x = torch.randn(case.batch, case.seqlen, s.hidden_size, generator=gen,
                             device=self.device).to(dtype)
        pos = torch.arange(case.context, case.context + case.seqlen, device=self.device)
        self.cos, self.sin = rotary(pos[None].expand(case.batch, -1), dtype)
        self.fresh = case.context == 0

    def __call__(self) -> torch.Tensor:
        """One layer forward (writes the new K/V at the same slots every time; the cache
        lengths are not advanced, so calls repeat)."""
        return self.layer(self.x, self.cos, self.sin, self.cache, self.fresh)


# ---------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layer_ms(fn: Callable, device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of one ``fn()`` after ``warmup`` calls: CUDA events around each
    call on a GPU, ``time.perf_counter`` on a CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        evs = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            evs.append((s, e))
        torch.cuda.synchronize(device)
        return float(statistics.median(s.elapsed_time(e) for s, e in evs))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def profile_items(fn: Callable, device: torch.device, iters: int) -> List[Item]:
    """Profile ``iters`` calls of ``fn()`` (CPU + CUDA activity on a GPU, CPU only on a CPU)
    and return the :class:`Item` list (kernels on a GPU, CPU ops' self times on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with profile(activities=acts) as prof:
        for _ in range(iters):
            with torch.profiler.record_function(SCOPE_LAYER):
                fn()
        _sync(device)
    return collect_items(prof.events(), device_kernels=cuda)


def measure(lc: LayerCase, iters: int, reps: int) -> Dict[str, object]:
    """Layer time and the per-category breakdown of one :class:`LayerCase`."""
    with torch.no_grad():
        out = lc()
        if not torch.isfinite(out).all():
            raise AssertionError(f"{lc.spec.name} {lc.case}: non-finite layer output")
        layer_ms = time_layer_ms(lc, lc.device, warmup=max(2, reps // 5), reps=reps)
        with labelled(lc.layer, lc.cache):
            lc()  # warm the labelled path
            items = profile_items(lc, lc.device, iters)
    row = summarize(items, iters)
    row["layer_ms"] = layer_ms
    row["busy_fraction"] = row["profiled_ms"] / layer_ms if layer_ms > 0 else None
    return row


def run(models: Sequence[str], case_list: Sequence[Case], preset: str, device: str,
        iters: int, reps: int, dry_run: bool, rows=None) -> List[dict]:
    """Rows for every model x case (printed as they come)."""
    dev = torch.device(device)
    dtype = torch.bfloat16
    rows = rows if rows is not None else common.Rows(BENCH)

    def one(model: str, case: Case) -> None:
        lc = LayerCase(model, preset, case, dtype, dev)
        try:
            m = measure(lc, iters, reps)
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
            m = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        del lc
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        row = {"model": model, "phase": case.phase, "batch": case.batch,
               "seqlen": case.seqlen, "context": case.context, "preset": preset,
               "dtype": str(dtype).replace("torch.", ""), "iters": iters,
               "profiler": "cuda" if dev.type == "cuda" else "cpu"}
        row.update(m)
        rows.append(row)
        print_row(row)

    for model in models:
        for case in case_list:
            rows.guard(f"{model} {case.phase} batch={case.batch}", one, model, case)
    return rows


def print_row(row: dict) -> None:
    """One case as a readable block: total, then ms and % per category."""
    head = (f"{row['model']} {row['phase']} batch={row['batch']} seqlen={row['seqlen']} "
            f"context={row['context']} ({row['preset']}, {row['profiler']} profiler)")
    if "error" in row:
        print(f"{head}: {row['error']}")
        return
    print(f"{head}: layer {row['layer_ms']:.4g} ms, profiled {row['profiled_ms']:.4g} ms "
          f"(busy {row['busy_fraction']:.2f})")
    for c in CATEGORIES:
        extra = ""
        if c == "gemm":
            extra = "  (" + ", ".join(f"{short} {row[f'gemm_{short}_ms']:.4g}"
                                      for _, short in PROJECTIONS.values()) + ")"
        print(f"  {c:>10} {row[f'{c}_ms']:9.4g} ms {row[f'{c}_pct']:6.1f} %{extra}")
    if row.get("other_top"):
        print(f"  other, biggest: {row['other_top']}")
    sys.stdout.flush()


def main(argv=None) -> int:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help=f"comma list (default {','.join(MODELS)})")
    ap.add_argument("--preset", default="w4a4kv4",
                    help="the layer's preset (w4a4kv4, w4a4kv16, w4a16kv16, w16a16kv16)")
    ap.add_argument("--seqlen", type=int, default=None, help=f"prefill tokens (default {SEQLEN})")
    ap.add_argument("--context", type=int, default=None,
                    help=f"decode: cached tokens per sequence (default {CONTEXT})")
    ap.add_argument("--batches", default=None, help="decode batch sizes (default 1,16)")
    ap.add_argument("--iters", type=int, default=None, help=f"profiled calls (default {ITERS})")
    ap.add_argument("--reps", type=int, default=None,
                    help=f"timed calls for the layer time (default {REPS})")
    args = ap.parse_args(argv)
    models = args.models.split(",") if args.models else None
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    if args.dry_run:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        cl = cases(args.seqlen or DRY_SEQLEN, batches or DRY_BATCHES,
                   args.context or DRY_CONTEXT)
        run(models or DRY_MODELS, cl, args.preset, device, args.iters or DRY_ITERS,
            args.reps or DRY_REPS, True)
        print("[dry-run] breakdown: ok (no JSON)")
        return 0
    common.require_cuda(BENCH)
    missing = {"int4_gemm", "quantize_per_token_packed", "rmsnorm_quantize_per_token",
               "hadamard_quantize_per_token", "hadamard_transform", "kv_cache_append_fused",
               "int4_kv_attention"} - set(O.cuda_ops())
    if missing:
        print(f"warning: no CUDA kernel for {sorted(missing)}: those run the reference",
              file=sys.stderr)
    cl = cases(args.seqlen or SEQLEN, batches or BATCHES, args.context or CONTEXT)
    rows, rc = common.collect(BENCH, args, lambda r: run(
        models or (QUICK_MODELS if args.quick else MODELS), cl, args.preset, "cuda",
        args.iters or ITERS, args.reps or REPS, False, r))
    common.print_table(common.measured(rows), ["model", "phase", "batch", "layer_ms",
                                               "profiled_ms"] + [f"{c}_pct" for c in CATEGORIES])
    return rc


if __name__ == "__main__":
    sys.exit(main())
