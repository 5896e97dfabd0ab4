"""Memory report of a runtime model: weights, KV cache, activations, peak.

On any device the weight and cache bytes are counted from the tensors (shared tensors, e.g.
tied embeddings, once). Activations are *estimated* from the shapes
(:func:`estimate_activation_bytes`: the live tensors of the largest stage of one forward) on
CPU; on CUDA :func:`measure_peak` measures them with ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ostquant.nn import QuantLinear

__all__ = ["MemoryReport", "memory_report", "estimate_activation_bytes", "measure_peak",
           "weight_bytes"]


def _nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class MemoryReport:
    """Bytes, by category. ``quantized_weights``: the decoder projections (packed int4 codes,
    float32 scales and row sums, biases; or float weights for a W16 model);
    ``embedding``/``lm_head``/``other`` (norms, RoPE table): float tensors; ``kv_cache``: the
    cache; ``activations``: peak transient bytes of one forward (estimated, or measured on
    CUDA when ``measured``); ``peak``: CUDA ``max_memory_allocated`` of the measured run
    (None on CPU)."""

    quantized_weights: int
    embedding: int
    lm_head: int
    other: int
    kv_cache: int
    activations: int
    measured: bool = False
    peak: Optional[int] = None
    tokens: int = 0
    context: int = 0

    @property
    def weights(self) -> int:
        return self.quantized_weights + self.embedding + self.lm_head + self.other

    @property
    def total(self) -> int:
        """Weights + KV cache + activations (the peak a run needs)."""
        return self.weights + self.kv_cache + self.activations

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(weights=self.weights, total=self.total)
        return d

    def format(self) -> str:
        mib = lambda n: f"{n / 2**20:10.2f} MiB"  # noqa: E731
        lines = [f"decoder projections {mib(self.quantized_weights)}",
                 f"embedding           {mib(self.embedding)}",
                 f"lm_head             {mib(self.lm_head)}",
                 f"norms, RoPE         {mib(self.other)}",
                 f"weights (all)       {mib(self.weights)}",
                 f"KV cache            {mib(self.kv_cache)}",
                 f"activations         {mib(self.activations)}  "
                 f"({'measured' if self.measured else 'estimated'}, {self.tokens} tokens, "
                 f"context {self.context})",
                 f"total               {mib(self.total)}"]
        if self.peak is not None:
            lines.append(f"CUDA peak allocated {mib(self.peak)}")
        return "\n".join(lines)


def weight_bytes(model) -> Tuple[int, int, int, int]:
    """``(decoder projections, embedding, lm_head, other)`` bytes of a runtime model."""
    seen = set()

    def count(t):
        if t is None:
            return 0
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen or t.device.type == "meta":
            return 0
        seen.add(key)
        return _nbytes(t)

    proj = 0
    for layer in model.layers:
        for mod in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj):
            for m in mod.modules():
                if isinstance(m, QuantLinear) or type(m) is nn.Linear:
                    for t in list(m.buffers(recurse=False)) + list(m.parameters(recurse=False)):
                        proj += count(t)
    emb = count(model.embed_weight)
    head = count(model.lm_head_weight) + count(model.lm_head_bias)
    other = 0
    for t in list(model.parameters()) + list(model.buffers()):
        other += count(t)
    return proj, emb, head, other


def estimate_activation_bytes(spec, batch_size: int, seqlen: int, context: int,
                              dtype: torch.dtype = torch.float16, logits: str = "last",
                              fresh: bool = True) -> int:
    """Estimated peak bytes of the transient tensors of one forward of ``batch_size`` x
    ``seqlen`` new tokens with ``context`` tokens per sequence in the cache afterwards.

    Counts the residual stream plus the largest of the attention stage (norm output, QKV,
    RoPE'd Q/K, activation codes, and the attention itself: a flash-style SDPA for a fresh
    prefill, the reference int4 attention's dequantized cache and scores otherwise) and the
    MLP stage (gate|up, SiLU·mul, codes, Hadamard), plus the logits. An estimate of what the
    reference ops allocate; kernels that fuse steps need less.
    """
    e = torch.empty(0, dtype=dtype).element_size()
    T = batch_size * seqlen
    H, Fi, D = spec.hidden_size, spec.intermediate_size, spec.head_dim
    hq, hkv = spec.num_heads, spec.num_kv_heads
    a4 = spec.abits == 4

    def act_codes(k):  # int8 codes + packed codes + scale/zero of a quantized GEMM input
        return T * (k + k // 2 + 8) if a4 else 0

    residual = T * H * e
    qkv = T * (hq + 2 * hkv) * D * e
    attn = T * H * e + act_codes(H) + qkv + 2 * T * (hq + hkv) * D * e
    if fresh:
        attn_core = T * hq * D * (e + 4)
    else:
        L = context
        attn_core = batch_size * L * hkv * D * 4 * 2 + batch_size * L * hq * D * 4 * 2 + \
            batch_size * hq * seqlen * L * 4 * 2
    attn += attn_core + T * hq * D * e + act_codes(hq * D)
    mlp = T * H * e + act_codes(H) + T * 2 * Fi * e + 2 * T * Fi * e + act_codes(Fi) + \
        (T * Fi * 4 if spec.down_hadamard else 0)
    n_logits = batch_size if logits == "last" else (T if logits == "all" else 0)
    return residual + max(attn, mlp) + n_logits * spec.vocab_size * 4


def measure_peak(fn: Callable[[], object], device: torch.device) -> Tuple[int, int]:
    """Run ``fn`` on CUDA and return ``(peak bytes above the memory allocated before it,
    absolute peak allocated)``."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak - before, peak


def memory_report(model, cache=None, batch_size: int = 1, seqlen: int = 1,
                  context: Optional[int] = None, run: Optional[Callable[[], object]] = None
                  ) -> MemoryReport:
    """Memory of ``model`` serving ``batch_size`` sequences: weights, the KV cache (``cache``'s
    bytes, or a cache of ``context`` tokens per sequence), activations of a forward of
    ``seqlen`` new tokens per sequence (estimated; measured on CUDA when ``run`` — a callable
    doing that forward — is given)."""
    from .kv_cache import KVCache

    for name, v in (("batch_size", batch_size), ("seqlen", seqlen), ("context", context)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
            raise ValueError(f"memory_report: {name} must be an integer >= 1, got {v!r}")
    s = model.spec
    proj, emb, head, other = weight_bytes(model)
    if cache is not None:
        kv = cache.nbytes
        batch_size = cache.batch_size
        context = context if context is not None else cache.max_len
    else:
        context = context if context is not None else seqlen
        kv = KVCache.bytes_for(s.num_layers, batch_size, context, s.num_kv_heads, s.head_dim,
                               s.kv_bits, model.dtype)
    act = estimate_activation_bytes(s, batch_size, seqlen, context, model.dtype,
                                    fresh=seqlen == context)
    measured, peak = False, None
    if run is not None and model.device.type == "cuda":
        act, peak = measure_peak(run, model.device)
        measured = True
    return MemoryReport(quantized_weights=proj, embedding=emb, lm_head=head, other=other,
                        kv_cache=kv, activations=act, measured=measured, peak=peak,
                        tokens=batch_size * seqlen, context=context)
