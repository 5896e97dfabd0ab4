"""KV cache of the runtime: int4 (packed codes + fp16 scale/zero) or float, preallocated.

Layout (both kinds), per decoder layer: ``[B, Smax, Hkv, D]`` with sequence ``b`` holding
``seqlens[b]`` valid tokens at slots ``0 .. seqlens[b]-1`` (contiguous per sequence, no paging).

* ``kv_bits=4``: the layout of the ``ostquant`` KV ops (docs/ops.md): codes uint8
  ``[B, Smax, Hkv, D/2]``, scale and zero float16 ``[B, Smax, Hkv]``; written by
  :func:`ostquant.ops.kv_cache_append`, read by :func:`ostquant.ops.int4_kv_attention`.
  Asymmetric int4 per (token, head), exactly the numbers of the fake quantizer
  :func:`ostquant.quant.fake_quant_kv` used during calibration and evaluation.
* ``kv_bits=16``: K and V in the model dtype (the KV16 presets and the bf16 baseline).

A forward pass of ``S`` new tokens writes them at ``seqlens[b] .. seqlens[b]+S-1`` in every
layer (:meth:`KVCache.append`), attends (:meth:`KVCache.attend`), and finally advances the
lengths by the number of *valid* new tokens per sequence (:meth:`KVCache.advance`), so the
padding of a right-padded batch is overwritten by the next step.

The lengths are kept twice: ``seqlens`` (int32, on the cache's device, what the kernels read)
and a host copy (Python ints) for capacity checks and slicing without a device sync.

CUDA graphs (:class:`~ostquant.runtime.cuda_graph.CUDAGraphDecoder`): ``seqlens`` is one tensor
for the cache's lifetime (every update is in place), so a captured decode step reads the
current lengths at replay time; inside :meth:`KVCache.graph_safe` the device work of
:meth:`KVCache.attend` does not depend on the lengths, and :meth:`KVCache.advance_host` brings
the host copy up to date after a replay advanced ``seqlens`` on the device.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ostquant import ops
from ostquant.ops import reference as ref

__all__ = ["KVCache", "CacheFullError", "sdpa"]


class CacheFullError(ValueError):
    """A sequence would grow past the cache's capacity."""


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_causal: bool,
         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``scaled_dot_product_attention`` on ``[B, H, S, D]`` tensors, called the way
    transformers' ``sdpa`` attention calls it (``enable_gqa`` only for grouped KV heads), so a
    float32 prefill is bit-identical to the Hugging Face model's."""
    kw = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=scale,
                                          is_causal=is_causal, **kw)


class KVCache:
    """Preallocated per-layer K/V storage for a batch of ``batch_size`` sequences.

    Args:
        num_layers, num_kv_heads, head_dim: the model's shape.
        batch_size: sequences held.
        max_len: capacity in tokens per sequence.
        kv_bits: 4 (int4 cache; head_dim must be 64 or 128) or 16 (float cache).
        dtype: dtype of the float cache (``kv_bits=16``) and of dequantized reads.
        device: where the cache lives.

    Use :meth:`for_model` to size one for a :class:`~ostquant.runtime.QuantizedCausalLM`.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int,
                 head_dim: int, kv_bits: int = 4, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device] = "cpu"):
        if kv_bits not in (4, 16):
            raise ValueError(f"KVCache: kv_bits must be 4 (int4 cache) or 16 (float cache), "
                             f"got {kv_bits}")
        if batch_size < 1 or max_len < 1 or num_layers < 1:
            raise ValueError(f"KVCache: batch_size ({batch_size}), max_len ({max_len}) and "
                             f"num_layers ({num_layers}) must be >= 1")
        if kv_bits == 4 and head_dim not in ops.KV_HEAD_DIMS:
            raise ValueError(f"KVCache: the int4 KV cache supports head_dim in "
                             f"{ops.KV_HEAD_DIMS}, got {head_dim}")
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.max_len = max_len
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kv_bits = kv_bits
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (batch_size, max_len, num_kv_heads)
        self.layers: List[Tuple[torch.Tensor, ...]] = []
        for _ in range(num_layers):
            if kv_bits == 4:
                t = []
                for _kv in range(2):  # k, then v: codes, scale, zero
                    t += [torch.zeros(*shape, head_dim // 2, dtype=torch.uint8, device=device),
                          torch.ones(*shape, dtype=torch.float16, device=device),
                          torch.zeros(*shape, dtype=torch.float16, device=device)]
                self.layers.append(tuple(t))
            else:
                self.layers.append((torch.zeros(*shape, head_dim, dtype=dtype, device=device),
                                    torch.zeros(*shape, head_dim, dtype=dtype, device=device)))
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._host_lens = [0] * batch_size
        self._graph_safe = False

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int,
                  device: Optional[Union[str, torch.device]] = None) -> "KVCache":
        """A cache sized for ``model`` (its layers, KV heads, head_dim, kv_bits and dtype)."""
        s = model.spec
        return cls(s.num_layers, batch_size, max_len, s.num_kv_heads, s.head_dim, s.kv_bits,
                   dtype=model.dtype, device=device or model.device)

    # ------------------------------------------------------------------ lengths
    @property
    def lengths(self) -> List[int]:
        """Valid tokens per sequence (host copy)."""
        return list(self._host_lens)

    def reset(self, lengths: Optional[Sequence[int]] = None) -> None:
        """Forget the contents (all lengths 0), or set the lengths to ``lengths`` (e.g. to
        re-time a decode step at a fixed context). Data is not cleared."""
        lengths = [0] * self.batch_size if lengths is None else [int(x) for x in lengths]
        if len(lengths) != self.batch_size or any(x < 0 or x > self.max_len for x in lengths):
            raise ValueError(f"KVCache.reset: need {self.batch_size} lengths in "
                             f"[0, {self.max_len}], got {lengths}")
        self._host_lens = lengths
        self.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))

    def check_room(self, new_tokens: int) -> None:
        """Raise :class:`CacheFullError` if ``new_tokens`` more tokens do not fit every
        sequence."""
        for b, n in enumerate(self._host_lens):
            if n + new_tokens > self.max_len:
                raise CacheFullError(f"KV cache full: sequence {b} holds {n} tokens, adding "
                                     f"{new_tokens} exceeds the capacity of {self.max_len}")

    def rewind(self, n: int = 1) -> None:
        """Drop the last ``n`` tokens of every sequence (device op, no host sync): e.g. to
        time a decode step again at the same context length."""
        if any(x < n for x in self._host_lens):
            raise ValueError(f"KVCache.rewind({n}): a sequence holds fewer tokens "
                             f"({min(self._host_lens)})")
        self._host_lens = [x - n for x in self._host_lens]
        self.seqlens -= n

    def advance(self, counts: Sequence[int], counts_t: Optional[torch.Tensor] = None) -> None:
        """Add ``counts[b]`` valid tokens to sequence ``b`` after a forward pass.

        ``counts_t``: the same counts as an int32 tensor on the cache's device (saves a
        host-to-device copy when the caller already has one)."""
        self._host_lens = [n + int(c) for n, c in zip(self._host_lens, counts)]
        if counts_t is None:
            counts_t = torch.tensor([int(c) for c in counts], dtype=torch.int32)
        self.seqlens += counts_t.to(device=self.device, dtype=torch.int32)

    def advance_host(self, counts: Sequence[int]) -> None:
        """Add ``counts[b]`` to the host copy of the lengths only: for when the device lengths
        were advanced by a step the host did not run (a CUDA-graph replay)."""
        if len(counts) != self.batch_size:
            raise ValueError(f"KVCache.advance_host: need {self.batch_size} counts, got "
                             f"{len(counts)}")
        self._host_lens = [n + int(c) for n, c in zip(self._host_lens, counts)]

    @contextlib.contextmanager
    def graph_safe(self) -> Iterator["KVCache"]:
        """Within the block, :meth:`attend` launches the same device work whatever the lengths
        are, as CUDA-graph capture needs: the int4 cache always does (``int4_kv_attention``
        reads the lengths on the device); the float cache attends over its whole capacity with
        a length mask instead of over the longest sequence (equal up to summation order)."""
        prev = self._graph_safe
        self._graph_safe = True
        try:
            yield self
        finally:
            self._graph_safe = prev

    # ------------------------------------------------------------------ per layer
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
               k_hadamard: bool = False) -> None:
        """Write ``k``, ``v`` [B, S, Hkv, D] at slots ``seqlens[b] ..`` of ``layer`` (the
        lengths are not advanced: every layer of one forward writes at the same slots).

        ``cos``/``sin`` [B, S, D] (k's dtype) and ``k_hadamard``: K still needs RoPE (and the
        online Hadamard); the int4 cache does both inside the fused append
        (:func:`ostquant.ops.kv_cache_append_fused`, bit-identical to doing them first), the
        float cache applies them here."""
        self.check_room(k.shape[1])
        if self.kv_bits == 4:
            if cos is not None or k_hadamard:
                ops.kv_cache_append_fused(k, v, *self.layers[layer], self.seqlens, cos, sin,
                                          k_hadamard)
            else:
                ops.kv_cache_append(k, v, *self.layers[layer], self.seqlens)
            return
        if cos is not None or k_hadamard:
            k = ref.rope_hadamard_k(k, cos, sin, k_hadamard)
        kc, vc = self.layers[layer]
        S = k.shape[1]
        pos = self.seqlens.long()[:, None] + torch.arange(S, device=self.device)[None, :]
        bidx = torch.arange(self.batch_size, device=self.device)[:, None]
        kc[bidx, pos] = k.to(kc.dtype)
        vc[bidx, pos] = v.to(vc.dtype)

    def read(self, layer: int, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """K and V of slots ``0 .. length-1`` of every sequence, [B, length, Hkv, D], in the
        cache dtype (int4: dequantized, float32 math rounded to :attr:`dtype`)."""
        if self.kv_bits == 4:
            kq, ks, kz, vq, vs, vz = self.layers[layer]
            k = ref.dequantize_kv(kq[:, :length], ks[:, :length], kz[:, :length])
            v = ref.dequantize_kv(vq[:, :length], vs[:, :length], vz[:, :length])
            return k.to(self.dtype), v.to(self.dtype)
        kc, vc = self.layers[layer]
        return kc[:, :length], vc[:, :length]

    def attend(self, layer: int, q: torch.Tensor, sm_scale: float, fresh: bool) -> torch.Tensor:
        """Causal attention of ``q`` [B, Sq, Hq, D] (the last ``Sq`` tokens of each sequence,
        already appended) over the cache of ``layer``; returns [B, Sq, Hq, D].

        ``fresh``: every sequence was empty before this forward (a prefill from scratch); then
        the new tokens are all there is, and attention runs as one causal SDPA call over the
        cached (for int4: dequantized) K/V — flash attention on a GPU — instead of the
        decode kernel. Otherwise the int4 cache goes through
        :func:`ostquant.ops.int4_kv_attention` and the float cache through a masked SDPA.
        """
        B, Sq = q.shape[:2]
        lens_after = [n + Sq for n in self._host_lens]
        if fresh:
            k, v = self.read(layer, Sq)
            out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), sm_scale,
                       is_causal=Sq > 1)
            return out.transpose(1, 2)
        if self.kv_bits == 4:
            return ops.int4_kv_attention(q, *self.layers[layer], self.seqlens + Sq, sm_scale,
                                         causal=True)
        L = self.max_len if self._graph_safe else max(lens_after)
        k, v = self.read(layer, L)
        mask = None
        if self._graph_safe or Sq > 1 or min(lens_after) != L:
            mask = self._causal_mask(L, Sq, q.device)
        out = sdpa(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype),
                   v.transpose(1, 2).to(q.dtype), sm_scale, is_causal=False, mask=mask)
        return out.transpose(1, 2)

    def _causal_mask(self, L: int, Sq: int, device) -> torch.Tensor:
        """[B, 1, Sq, L] bool: query ``i`` (position ``seqlens[b] + i``) sees cached keys at
        positions <= its own (built on the device from :attr:`seqlens`)."""
        kpos = torch.arange(L, device=device)
        lens = (self.seqlens + Sq).long()
        qpos = lens[:, None] - Sq + torch.arange(Sq, device=device)[None, :]  # [B, Sq]
        mask = (kpos[None, None, :] <= qpos[:, :, None]) & \
            (kpos[None, None, :] < lens[:, None, None])
        return mask[:, None]

    # ------------------------------------------------------------------ sizes
    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (all layers, codes + scales + zeros, or float K/V)."""
        return sum(t.numel() * t.element_size() for lay in self.layers for t in lay) + \
            self.seqlens.numel() * self.seqlens.element_size()

    @staticmethod
    def bytes_for(num_layers: int, batch_size: int, max_len: int, num_kv_heads: int,
                  head_dim: int, kv_bits: int, dtype: torch.dtype = torch.float16) -> int:
        """Bytes a cache of this shape holds (without allocating it)."""
        tokens = num_layers * batch_size * max_len * num_kv_heads
        if kv_bits == 4:
            per = 2 * (head_dim // 2 + 2 + 2)  # K and V: codes + fp16 scale + fp16 zero
        else:
            per = 2 * head_dim * torch.empty(0, dtype=dtype).element_size()
        return tokens * per + 4 * batch_size

    def __repr__(self) -> str:
        kind = "int4" if self.kv_bits == 4 else str(self.dtype).replace("torch.", "")
        return (f"KVCache({kind}, layers={self.num_layers}, batch={self.batch_size}, "
                f"max_len={self.max_len}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, lengths={self._host_lens}, "
                f"{self.nbytes / 2**20:.1f} MiB)")
