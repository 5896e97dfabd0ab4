"""The quantized LLaMA-family runtime: model, KV cache, generation, memory report.

* :class:`QuantizedCausalLM` — built from a quantized directory
  (:meth:`~QuantizedCausalLM.from_quantized`), from a Hugging Face model (as quantized by
  ostquant, or RTN on the fly: :meth:`~QuantizedCausalLM.from_hf`) or with random weights at a
  named shape (:meth:`~QuantizedCausalLM.random`); runs on the ``ostquant`` ops.
* :class:`KVCache` — int4 (packed codes + fp16 scale/zero) or float, preallocated;
  :class:`PagedKVCache` — the int4 cache in pages of a shared pool (block table per sequence).
* :func:`generate` / :func:`stream` — prefill + decode, greedy or sampled, batched prompts of
  different lengths, streaming.
* :func:`generate_continuous` — continuous batching: any number of prompts through
  ``batch_size`` slots, a finished sequence's slot (and KV pages) refilled at once.
* :func:`memory_report` — weights, KV cache, activations (measured on CUDA).
* :class:`CUDAGraphDecoder` — one decode step captured in a CUDA graph and replayed
  (``generate(..., cuda_graph=True)`` uses it, falling back to eager decoding where it cannot).

Example (CPU)::

    from ostquant.runtime import QuantizedCausalLM
    model = QuantizedCausalLM.from_quantized("smollm2-ost")
    out = model.generate(["def fibonacci(n):"], max_new_tokens=20)
    print(out.texts[0])
"""
from .cuda_graph import (CUDAGraphDecoder, CUDAGraphFallbackWarning, CUDAGraphUnavailable,
                         graph_unavailable_reason)
from .generate import GenerationResult, SamplingConfig, Step, generate, sample_next, stream
from .kv_cache import CacheFullError, KVCache, PagedKVCache
from .memory import MemoryReport, estimate_activation_bytes, memory_report
from .model import QuantizedCausalLM, RuntimeSpec
from .serve import generate_continuous
from .shapes import NAMED_SHAPES, shape_config

__all__ = ["QuantizedCausalLM", "RuntimeSpec", "KVCache", "PagedKVCache", "CacheFullError",
           "generate", "stream", "generate_continuous", "sample_next", "SamplingConfig", "Step",
           "GenerationResult",
           "MemoryReport", "memory_report", "estimate_activation_bytes", "NAMED_SHAPES",
           "shape_config", "CUDAGraphDecoder", "CUDAGraphUnavailable",
           "CUDAGraphFallbackWarning", "graph_unavailable_reason"]
