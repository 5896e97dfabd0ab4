"""CUDA-graph decode: one decode step of a :class:`~ostquant.runtime.QuantizedCausalLM` captured
once and replayed for every token.

A decode step launches a few dozen small kernels per layer; at batch 1 the GPU spends much of
the step waiting for Python and kernel launches. Replaying a captured graph launches them all
at once. What makes the step capturable (:meth:`QuantizedCausalLM.decode_step`):

* fixed shapes: batch ``B`` (the cache's), one token per sequence, static input buffer
  ``input_ids`` [B, 1] and static output ``logits`` [B, vocab];
* the KV cache is preallocated and written in place at positions read from ``cache.seqlens``
  (a device tensor, updated in place), so each replay appends at the current lengths and
  advances them on the device; the host copy of the lengths is advanced by
  :meth:`CUDAGraphDecoder.step` after the replay (:meth:`KVCache.advance_host`);
* no host synchronisation inside the step: every op it uses must have its CUDA kernel (the
  reference kernels check lengths on the host); the CUDA KV kernels report bad lengths through
  a status word that :func:`ostquant.ops.kv_check_errors` reads after the step.

:func:`graph_unavailable_reason` says why a model / cache cannot be captured (CPU, missing CUDA
kernels, a cache that does not fit); :class:`CUDAGraphDecoder` raises
:class:`CUDAGraphUnavailable` with that reason (or when capture itself fails), and
:func:`~ostquant.runtime.generate` (``cuda_graph=True``) then warns with
:class:`CUDAGraphFallbackWarning` and decodes eagerly.
"""
from __future__ import annotations

import time
from typing import Optional, Set

import torch

from ostquant import ops
from ostquant.nn import QuantLinear

from .kv_cache import KVCache, PagedKVCache
from .layers import DecoderLayer

__all__ = ["CUDAGraphDecoder", "CUDAGraphUnavailable", "CUDAGraphFallbackWarning",
           "graph_unavailable_reason", "required_cuda_ops"]


class CUDAGraphUnavailable(RuntimeError):
    """The decode step cannot be captured in a CUDA graph here (the message says why)."""


class CUDAGraphFallbackWarning(UserWarning):
    """``cuda_graph=True`` was asked for but the decode runs eagerly (the message says why)."""


def required_cuda_ops(model) -> Set[str]:
    """The ``ostquant`` ops a decode step of ``model`` calls (they need CUDA kernels to be
    captured: the reference kernels synchronise with the host)."""
    need: Set[str] = set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if m.abits == 16:
                need.add("w4a16_gemm")
                if m.online_hadamard:
                    need.add("hadamard_transform")
            elif m.online_hadamard:  # on CUDA: one fused quantizer per input (QuantLinear)
                need |= {"int4_gemm", "hadamard_quantize_per_token"}
            else:  # packed codes, or int8 codes where the GEMM reads those (takes_codes)
                need |= {"int4_gemm", "quantize_per_token_packed", "quantize_per_token"}
        elif isinstance(m, DecoderLayer):
            if m.q_k_hadamard:
                need.add("hadamard_transform")
            if model.spec.kv_bits == 4:
                need.add("int4_kv_attention")
                need.add("kv_cache_append_fused" if m.fused_kv_append else "kv_cache_append")
            if m.fused_norm_quant is not False and any(
                    isinstance(p, QuantLinear) and p.abits == 4 and not p.online_hadamard
                    for p in (m.qkv, m.gate_up)):
                need.add("rmsnorm_quantize_per_token")
    return need


def graph_unavailable_reason(model, cache: Optional[KVCache] = None) -> Optional[str]:
    """Why a decode step of ``model`` (over ``cache``) cannot be captured, or None if it can."""
    dev = model.device
    if dev.type != "cuda":
        return (f"the model is on {dev}; CUDA graphs need the model and its KV cache on a "
                f"CUDA device")
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if cache is not None:
        if cache.is_view:
            return "the KV cache is a row view (KVCache.rows); capture over the cache itself"
        if cache.device != dev:
            return f"the KV cache is on {cache.device}, the model on {dev}"
        s = model.spec
        if (cache.num_layers, cache.kv_bits, cache.num_kv_heads, cache.head_dim) != \
                (s.num_layers, s.kv_bits, s.num_kv_heads, s.head_dim):
            return f"{cache!r} does not fit the model (use model.new_cache())"
    need = required_cuda_ops(model)
    if isinstance(cache, PagedKVCache):  # the paged forms of the KV ops
        need = (need - {"kv_cache_append", "kv_cache_append_fused", "int4_kv_attention"}) | \
            {"paged_kv_cache_append", "paged_int4_kv_attention"}
    missing = need - set(ops.cuda_ops())
    if missing:
        why = ops.extension_error()
        return (f"no CUDA kernel for {sorted(missing)} (their reference kernels synchronise "
                f"with the host, which a graph cannot capture; build the ostquant._C "
                f"extension" + (f": {why}" if why else "") + ")")
    return None


def _fingerprint(model, cache: KVCache) -> tuple:
    """Addresses of every tensor a captured step reads or writes (model weights, cache)."""
    ts = list(model.parameters()) + list(model.buffers()) + \
        [t for lay in cache.layers for t in lay] + [cache.seqlens]
    if isinstance(cache, PagedKVCache):
        ts.append(cache.block_table)
    return tuple((t.data_ptr(), t.dtype) for t in ts)


class CUDAGraphDecoder:
    """One decode step of ``model`` over ``cache`` (batch fixed), captured in a CUDA graph.

    Construction runs ``warmup`` eager steps on a side stream (they write one slot past the
    current lengths, which the next real step overwrites; the device lengths are restored
    after each) and then captures :meth:`QuantizedCausalLM.decode_step`. Each :meth:`step`
    copies the new tokens into the static input, replays the graph (append at the current
    lengths, attention, logits; lengths + 1 on the device) and advances the host lengths.

    The graph stays valid for this ``cache`` object as long as its tensors live:
    :meth:`KVCache.reset`, :meth:`~KVCache.rewind` and :meth:`~KVCache.advance` update the
    lengths in place. Raises :class:`CUDAGraphUnavailable` when the step cannot be captured
    (see :func:`graph_unavailable_reason`) or capture fails.

    Example::

        cache = model.new_cache(1, 512)
        model(prompt_ids, cache, logits="last")          # eager prefill
        g = CUDAGraphDecoder(model, cache)
        logits = g.step(next_ids)                         # [B, vocab], replayed
    """

    def __init__(self, model, cache: KVCache, warmup: int = 2):
        why = graph_unavailable_reason(model, cache)
        if why is not None:
            raise CUDAGraphUnavailable(f"cannot capture the decode step in a CUDA graph: {why}")
        self.model = model
        self.cache = cache
        self.batch_size = cache.batch_size
        model.check_room(cache, 1)  # the warm-up steps write one slot past the lengths
        cache.ensure_room(1)  # a paged cache: their pages taken now, not inside the graph
        dev = model.device
        t0 = time.perf_counter()
        self.input_ids = torch.zeros(self.batch_size, 1, dtype=torch.long, device=dev)
        self.graph = torch.cuda.CUDAGraph()
        saved = cache.seqlens.clone()
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        try:
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(max(1, warmup)):
                    model.decode_step(self.input_ids, cache, update_host=False)
                    cache.seqlens.copy_(saved)
            torch.cuda.current_stream(dev).wait_stream(side)
            with torch.no_grad(), torch.cuda.graph(self.graph):
                self.logits = model.decode_step(self.input_ids, cache, update_host=False)
        except RuntimeError as e:
            torch.cuda.synchronize(dev)
            cache.seqlens.copy_(saved)
            raise CUDAGraphUnavailable(f"capturing the decode step in a CUDA graph failed: "
                                       f"{e}") from e
        torch.cuda.synchronize(dev)
        ops.kv_check_errors()
        self._fingerprint = _fingerprint(model, cache)
        #: seconds spent on warm-up and capture
        self.capture_seconds = time.perf_counter() - t0

    def matches(self, model, cache: KVCache) -> bool:
        """Whether this graph is valid for ``model`` over ``cache``: the same objects, and
        none of their tensors was replaced since the capture (e.g. by ``model.to(dtype)``)."""
        return model is self.model and cache is self.cache and \
            _fingerprint(model, cache) == self._fingerprint

    def step(self, input_ids) -> torch.Tensor:
        """Decode one token per sequence: ``input_ids`` [B] or [B, 1] (any device) -> logits
        [B, vocab].

        The logits are the graph's static output buffer: use (or copy) them before the next
        step. Raises :class:`~ostquant.runtime.CacheFullError` when a sequence has no room
        left, ``ValueError`` for a wrong batch size or (CPU ids) ids outside the vocabulary.
        """
        ids = torch.as_tensor(input_ids)
        if ids.numel() != self.batch_size or (ids.dim() == 2 and ids.shape[1] != 1) or \
                ids.dim() > 2:
            raise ValueError(f"CUDAGraphDecoder.step: need {self.batch_size} token ids ([B] or "
                             f"[B, 1]), got shape {tuple(ids.shape)}")
        ids = ids.reshape(self.batch_size, 1)
        if ids.device.type == "cpu":
            self.model.check_inputs(ids, self.cache)
        self.model.check_room(self.cache, 1)
        self.cache.ensure_room(1)  # a paged cache: the step's pages (block table in place)
        self.input_ids.copy_(ids)
        self.graph.replay()
        self.cache.advance_host([1] * self.batch_size)
        return self.logits

    def __repr__(self) -> str:
        return (f"CUDAGraphDecoder(batch={self.batch_size}, layers={self.model.spec.num_layers}, "
                f"capture {self.capture_seconds * 1e3:.1f} ms)")
