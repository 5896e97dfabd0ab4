"""KV cache of the runtime: int4 (packed codes + fp16 scale/zero) or float, preallocated.

Layout (both kinds), per decoder layer: ``[B, Smax, Hkv, D]`` with sequence ``b`` holding
``seqlens[b]`` valid tokens at slots ``0 .. seqlens[b]-1`` (contiguous per sequence).
:class:`PagedKVCache` is the int4 cache in pages of a shared pool instead (a block table per
sequence; pages are taken as sequences grow and given back by :meth:`PagedKVCache.release`).

* ``kv_bits=4``: the layout of the ``ostquant`` KV ops (docs/ops.md): codes uint8
  ``[B, Smax, Hkv, D/2]``, scale and zero float16 ``[B, Smax, Hkv]`` (stored head-major,
  :func:`ostquant.ops.int4_kv_tensors`); written by
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

__all__ = ["KVCache", "PagedKVCache", "CacheFullError", "sdpa"]


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


def _int4_storage(shape, head_dim: int, device) -> Tuple[torch.Tensor, ...]:
    """One layer of an int4 cache: K then V, each codes uint8 ``shape + (D/2,)`` and float16
    scale / zero ``shape``, stored head-major (:func:`ostquant.ops.int4_kv_tensors`)."""
    return ops.int4_kv_tensors(*shape, head_dim, device) + \
        ops.int4_kv_tensors(*shape, head_dim, device)


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
        self._setup(num_layers, batch_size, max_len, num_kv_heads, head_dim, kv_bits, dtype,
                    device)
        shape = (batch_size, max_len, num_kv_heads)
        self.layers: List[Tuple[torch.Tensor, ...]] = []
        for _ in range(num_layers):
            if kv_bits == 4:
                self.layers.append(_int4_storage(shape, head_dim, device))
            else:
                self.layers.append((torch.zeros(*shape, head_dim, dtype=dtype, device=device),
                                    torch.zeros(*shape, head_dim, dtype=dtype, device=device)))

    def _setup(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int,
               head_dim: int, kv_bits: int, dtype: torch.dtype, device) -> None:
        """Check the shape arguments and set what every cache kind has: the shape attributes
        and the (empty) lengths."""
        who = type(self).__name__
        if batch_size < 1 or max_len < 1 or num_layers < 1:
            raise ValueError(f"{who}: batch_size ({batch_size}), max_len ({max_len}) and "
                             f"num_layers ({num_layers}) must be >= 1")
        if kv_bits == 4 and head_dim not in ops.KV_HEAD_DIMS:
            raise ValueError(f"{who}: the int4 KV cache supports head_dim in "
                             f"{ops.KV_HEAD_DIMS}, got {head_dim}")
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.max_len = max_len
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kv_bits = kv_bits
        self.dtype = dtype
        self.device = torch.device(device)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._host_lens = [0] * batch_size
        self._graph_safe = False
        self._epoch = 0  # bumped by release / reset / rewind: row views made before go stale

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
        lengths = [0] * self.batch_size if lengths is None else self._checked_lengths(lengths)
        self._epoch += 1
        self._host_lens = lengths
        self.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))

    def release(self, b: int) -> None:
        """Sequence ``b`` is finished: set its length to 0 so the slot can take a new
        sequence (the other sequences are untouched; :class:`PagedKVCache` also gives its
        pages back)."""
        if not 0 <= b < self.batch_size:
            raise IndexError(f"{type(self).__name__}.release: sequence {b} not in "
                             f"[0, {self.batch_size})")
        self._host_lens[b] = 0
        self.seqlens[b] = 0
        self._epoch += 1

    def rows(self, slots: Sequence[int]) -> "KVCache":
        """A cache over sequences ``slots`` of this one (in that order), for a forward pass that
        serves only them: it writes into this cache's storage, and advancing its lengths
        advances theirs here. A view is for passes made before this cache changes otherwise:
        once any length moves other than through the view itself (:meth:`release`,
        :meth:`reset`, :meth:`rewind`, a forward through this cache or another view) it raises
        (make a new one). Not for :meth:`QuantizedCausalLM.decode_step` / CUDA graphs.
        Continuous batching runs a newly admitted prompt's prefill, and the decoding
        sequences' next tokens, as separate passes through such views, so no sequence is
        padded to another's length. Sequences are released (and lengths reset) on this cache,
        not on the view. The contiguous int4 cache has none (its kernels take whole cache
        tensors): use :class:`PagedKVCache`."""
        if self.kv_bits != 16:
            raise NotImplementedError("KVCache.rows: row views of the contiguous int4 cache "
                                      "are not supported; use PagedKVCache")
        return _ContiguousRows(self, slots)

    def _batch_index(self) -> Union[None, slice, torch.Tensor]:
        """The storage rows this cache's sequences live in: None (all, in order), a slice (a
        run of consecutive rows: read without a copy) or an index tensor."""
        return None

    def _checked_lengths(self, lengths: Sequence[int]) -> List[int]:
        lengths = [int(x) for x in lengths]
        if len(lengths) != self.batch_size or any(x < 0 or x > self.max_len for x in lengths):
            raise ValueError(f"KVCache.reset: need {self.batch_size} lengths in "
                             f"[0, {self.max_len}], got {lengths}")
        return lengths

    def check_room(self, new_tokens: int) -> None:
        """Raise :class:`CacheFullError` if ``new_tokens`` more tokens do not fit every
        sequence."""
        for b, n in enumerate(self._host_lens):
            if n + new_tokens > self.max_len:
                raise CacheFullError(f"KV cache full: sequence {b} holds {n} tokens, adding "
                                     f"{new_tokens} exceeds the capacity of {self.max_len}")

    def ensure_room(self, new_tokens: int) -> None:
        """Make sure ``new_tokens`` more tokens can be written for every sequence without any
        host work during the write (what a CUDA-graph step needs): raises
        :class:`CacheFullError` if they do not fit; :class:`PagedKVCache` also takes the pages
        now."""
        self.check_room(new_tokens)

    def rewind(self, n: int = 1) -> None:
        """Drop the last ``n`` tokens of every sequence (device op, no host sync): e.g. to
        time a decode step again at the same context length."""
        if any(x < n for x in self._host_lens):
            raise ValueError(f"KVCache.rewind({n}): a sequence holds fewer tokens "
                             f"({min(self._host_lens)})")
        self._host_lens = [x - n for x in self._host_lens]
        self.seqlens -= n
        self._epoch += 1

    def advance(self, counts: Sequence[int], counts_t: Optional[torch.Tensor] = None) -> None:
        """Add ``counts[b]`` valid tokens to sequence ``b`` after a forward pass.

        ``counts_t``: the same counts as an int32 tensor on the cache's device (saves a
        host-to-device copy when the caller already has one)."""
        self._host_lens = [n + int(c) for n, c in zip(self._host_lens, counts)]
        if counts_t is None:
            counts_t = torch.tensor([int(c) for c in counts], dtype=torch.int32)
        self.seqlens += counts_t.to(device=self.device, dtype=torch.int32)
        self._epoch += 1  # lengths moved: views made before would write at old positions

    def advance_host(self, counts: Sequence[int]) -> None:
        """Add ``counts[b]`` to the host copy of the lengths only: for when the device lengths
        were advanced by a step the host did not run (a CUDA-graph replay)."""
        if len(counts) != self.batch_size:
            raise ValueError(f"KVCache.advance_host: need {self.batch_size} counts, got "
                             f"{len(counts)}")
        self._host_lens = [n + int(c) for n, c in zip(self._host_lens, counts)]
        self._epoch += 1

    #: True for a row view (:meth:`rows`) of another cache.
    is_view = False

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
        idx = self._batch_index()
        if isinstance(idx, torch.Tensor):
            bidx = idx[:, None]
        else:  # all rows, or a run of them (kc[idx] is a view: the assignment writes through)
            if idx is not None:
                kc, vc = kc[idx], vc[idx]
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
        idx = self._batch_index()
        if idx is None:
            return kc[:, :length], vc[:, :length]
        return kc[idx, :length], vc[idx, :length]

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


class PagedKVCache(KVCache):
    """The int4 KV cache in fixed-size pages of one shared pool (the paged layout of the
    ``ostquant`` KV ops, docs/ops.md).

    Per decoder layer the pool holds codes uint8 ``[num_pages, P, Hkv, D/2]`` and fp16 scale /
    zero ``[num_pages, P, Hkv]``; one block table int32 ``[B, ceil(max_len / P)]`` (shared by
    all layers: page ``i`` is page ``i`` of every layer's pool) maps token ``t`` of sequence
    ``b`` to page ``block_table[b, t // P]``, slot ``t % P`` (``-1``: no page yet).

    Pages are taken from a free list on the host when a forward pass needs them (sequence
    ``b`` holds ``ceil(tokens_b / P)`` pages, where the tokens written include the right
    padding of a batched prefill) and given back by :meth:`release` (one finished sequence)
    or :meth:`reset`. With ``num_pages`` below ``batch_size * ceil(max_len / P)`` the pool is
    shared: sequences of different lengths fit in less memory than the contiguous cache's
    ``batch_size * max_len`` slots; running out of pages raises :class:`CacheFullError`.

    Same interface and the same numbers as :class:`KVCache` with ``kv_bits=4`` (prefill,
    decode and the fused RoPE + Hadamard append run the paged ops). A decode step is
    capturable in a CUDA graph: the pages for the next token are taken on the host before
    each replay (:meth:`ensure_room`); the block table is updated in place.

    Args:
        num_layers, batch_size, max_len, num_kv_heads, head_dim: as for :class:`KVCache`
            (``max_len``: capacity of one sequence).
        page_size: tokens per page, a power of two >= ``ops.KV_MIN_PAGE_SIZE`` (16).
        num_pages: pages in the pool (default: enough for every sequence at ``max_len``).
        dtype, device: as for :class:`KVCache`.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int,
                 head_dim: int, page_size: int = 64, num_pages: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
        P = int(page_size)
        if P < ops.KV_MIN_PAGE_SIZE or P & (P - 1):
            raise ValueError(f"PagedKVCache: page_size must be a power of two >= "
                             f"{ops.KV_MIN_PAGE_SIZE}, got {page_size}")
        self._setup(num_layers, batch_size, max_len, num_kv_heads, head_dim, 4, dtype, device)
        max_pages = -(-max_len // P)
        if num_pages is None:
            num_pages = batch_size * max_pages
        if num_pages < 1:
            raise ValueError(f"PagedKVCache: num_pages must be >= 1, got {num_pages}")
        self.page_size = P
        self.num_pages = int(num_pages)
        shape = (self.num_pages, P, num_kv_heads)
        self.layers = [_int4_storage(shape, head_dim, device) for _ in range(num_layers)]
        self.block_table = torch.full((batch_size, max_pages), -1, dtype=torch.int32,
                                      device=device)
        self._pages: List[List[int]] = [[] for _ in range(batch_size)]  # host copy of the table
        self._free: List[int] = list(range(self.num_pages - 1, -1, -1))  # pop() -> lowest id

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int,
                  device: Optional[Union[str, torch.device]] = None, page_size: int = 64,
                  num_pages: Optional[int] = None) -> "PagedKVCache":
        """A paged cache sized for ``model`` (which must have an int4 KV cache)."""
        s = model.spec
        if s.kv_bits != 4:
            raise ValueError(f"PagedKVCache: the paged cache is int4; this model's KV cache is "
                             f"{s.kv_bits}-bit (use model.new_cache(...) without paging)")
        return cls(s.num_layers, batch_size, max_len, s.num_kv_heads, s.head_dim, page_size,
                   num_pages, dtype=model.dtype, device=device or model.device)

    # ------------------------------------------------------------------ pages
    @property
    def pages_used(self) -> int:
        """Pages held by the sequences."""
        return self.num_pages - len(self._free)

    @property
    def pages_free(self) -> int:
        """Pages of the pool not held by any sequence."""
        return len(self._free)

    def pages_to_grow(self, new_tokens: int) -> int:
        """Pages the pool must give for ``new_tokens`` more positions in every sequence (what
        a forward pass of ``[B, new_tokens]`` takes, right padding included)."""
        return sum(max(0, self.pages_for(n + new_tokens) - len(p))
                   for n, p in zip(self._host_lens, self._pages))

    def pages_for(self, tokens: int) -> int:
        """Pages that hold ``tokens`` positions of one sequence."""
        return -(-tokens // self.page_size)

    def _grow(self, needs: Sequence[int]) -> None:
        """Give sequence ``b`` pages until it holds ``needs[b]`` tokens' worth (all or none)."""
        want = [max(0, self.pages_for(n) - len(p)) for n, p in zip(needs, self._pages)]
        if sum(want) == 0:
            return
        if sum(want) > len(self._free):
            raise CacheFullError(f"KV cache full: the page pool has {len(self._free)} free "
                                 f"pages of {self.page_size} tokens, {sum(want)} more are "
                                 f"needed ({self.num_pages} pages in all; release finished "
                                 f"sequences or make a larger pool)")
        for b, w in enumerate(want):
            for _ in range(w):
                self._pages[b].append(self._free.pop())
        self._sync_table()

    def _sync_table(self) -> None:
        table = torch.full(tuple(self.block_table.shape), -1, dtype=torch.int32)
        for b, pages in enumerate(self._pages):
            if pages:
                table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.block_table.copy_(table)

    def release(self, b: int) -> None:
        """Sequence ``b`` is finished: give its pages back to the pool and set its length
        to 0 (the other sequences are untouched)."""
        super().release(b)
        self._free.extend(reversed(self._pages[b]))
        self._pages[b].clear()  # in place: row views share the list objects
        self._sync_table()

    def rows(self, slots: Sequence[int]) -> "PagedKVCache":
        """As :meth:`KVCache.rows`: a view over sequences ``slots`` that shares this cache's
        page pool, so what a pass through it writes and the pages it takes are this cache's."""
        return _PagedRows(self, slots)

    # ------------------------------------------------------------------ lengths
    def reset(self, lengths: Optional[Sequence[int]] = None) -> None:
        """Forget the contents and give every page back (``lengths=None``), or set the lengths
        to ``lengths`` (pages are taken so that each sequence covers its length; the data in
        them is not cleared, as for :meth:`KVCache.reset`)."""
        if lengths is None:
            for b in range(self.batch_size):
                self._free.extend(reversed(self._pages[b]))
                self._pages[b].clear()
            self._free.sort(reverse=True)
            self._sync_table()
            super().reset(None)
            return
        lengths = self._checked_lengths(lengths)
        self._grow(lengths)
        super().reset(lengths)

    def check_room(self, new_tokens: int) -> None:
        """Raise :class:`CacheFullError` if ``new_tokens`` more tokens exceed a sequence's
        capacity or the pages left in the pool."""
        super().check_room(new_tokens)
        want = self.pages_to_grow(new_tokens)
        if want > len(self._free):
            raise CacheFullError(f"KV cache full: adding {new_tokens} tokens per sequence "
                                 f"needs {want} more pages of {self.page_size} tokens, the "
                                 f"pool has {len(self._free)} free of {self.num_pages}")

    def rewind(self, n: int = 1) -> None:
        """As :meth:`KVCache.rewind` (the pages stay held); row views made before go stale."""
        super().rewind(n)

    def ensure_room(self, new_tokens: int) -> None:
        """Take now the pages ``new_tokens`` more tokens of every sequence need (a CUDA-graph
        step writes through the block table and cannot take pages itself)."""
        self.check_room(new_tokens)
        self._grow([n + new_tokens for n in self._host_lens])

    # graph_safe (inherited): within it, append takes no pages -- the caller must call
    # ensure_room first (decode_step and CUDAGraphDecoder do) -- and attention splits the KV by
    # the capacity instead of a host-side maximum length, so the step's device work does not
    # depend on the lengths: capturable in a CUDA graph.

    # ------------------------------------------------------------------ per layer
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
               k_hadamard: bool = False) -> None:
        """As :meth:`KVCache.append`, into pages (taken from the pool as needed; within
        :meth:`graph_safe` they must be there already: :meth:`ensure_room`)."""
        S = k.shape[1]
        if not self._graph_safe:
            self.check_room(S)
            self._grow([n + S for n in self._host_lens])
        ops.paged_kv_cache_append(k, v, *self.layers[layer], self.block_table, self.seqlens,
                                  cos, sin, k_hadamard)

    def read(self, layer: int, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions ``0 .. length-1`` of every sequence, [B, length, Hkv, D],
        dequantized to :attr:`dtype` (positions without a page read page 0)."""
        kq, ks, kz, vq, vs, vz = self.layers[layer]
        k = ref.dequantize_kv(*ref.paged_kv_gather(kq, ks, kz, self.block_table, length))
        v = ref.dequantize_kv(*ref.paged_kv_gather(vq, vs, vz, self.block_table, length))
        return k.to(self.dtype), v.to(self.dtype)

    def attend(self, layer: int, q: torch.Tensor, sm_scale: float, fresh: bool) -> torch.Tensor:
        """As :meth:`KVCache.attend`; a non-fresh pass runs
        :func:`ostquant.ops.paged_int4_kv_attention`."""
        if fresh:
            return super().attend(layer, q, sm_scale, fresh)
        Sq = q.shape[1]
        return ops.paged_int4_kv_attention(q, *self.layers[layer], self.block_table,
                                           self.seqlens + Sq, sm_scale, causal=True,
                                           max_seqlen=-1 if self._graph_safe
                                           else max(self._host_lens) + Sq)

    # ------------------------------------------------------------------ sizes
    @property
    def nbytes(self) -> int:
        """Bytes held by the pool (all layers), the block table and the lengths."""
        return super().nbytes + self.block_table.numel() * self.block_table.element_size()

    def __repr__(self) -> str:
        return (f"PagedKVCache(int4, layers={self.num_layers}, batch={self.batch_size}, "
                f"max_len={self.max_len}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, pages {self.pages_used}/{self.num_pages} x "
                f"{self.page_size}, lengths={self._host_lens}, {self.nbytes / 2**20:.1f} MiB)")


class _RowView:
    """What the row views of a cache (:meth:`KVCache.rows`) share: sequences ``slots`` of a
    parent cache as a cache of their own, over the parent's storage, with lengths of their own
    that are written back to the parent's rows as they change; stale (raising) once the parent
    released, reset or rewound sequences."""

    def _init_view(self, parent: KVCache, slots: Sequence[int], names: Sequence[str]) -> None:
        slots = [int(b) for b in slots]
        who = type(parent).__name__
        if not slots or len(set(slots)) != len(slots) or \
                not all(0 <= b < parent.batch_size for b in slots):
            raise ValueError(f"{who}.rows: need distinct sequence indices in "
                             f"[0, {parent.batch_size}), got {slots}")
        if isinstance(parent, _RowView):
            slots = [parent.slots[b] for b in slots]
            parent = parent.parent
        self.parent = parent
        self.slots = slots
        for name in ("num_layers", "max_len", "num_kv_heads", "head_dim", "kv_bits", "dtype",
                     "device", "layers", *names):
            setattr(self, name, getattr(parent, name))
        self.batch_size = len(slots)
        self._idx = torch.tensor(slots, dtype=torch.long, device=parent.device)
        first = slots[0]
        self._rows = slice(first, first + len(slots)) \
            if slots == list(range(first, first + len(slots))) else self._idx
        self.seqlens = parent.seqlens.index_select(0, self._idx)
        self._host_lens = [parent._host_lens[b] for b in slots]
        self._graph_safe = False
        self._epoch = parent._epoch

    is_view = True

    def _batch_index(self) -> Union[None, slice, torch.Tensor]:
        return self._rows

    def _check_current(self) -> None:
        if self._epoch != self.parent._epoch:
            raise RuntimeError(f"{type(self.parent).__name__}.rows view is stale: the parent "
                               f"cache's lengths changed since it was made (release, reset, "
                               f"rewind or another forward); make a new view")

    def check_room(self, new_tokens: int) -> None:
        self._check_current()
        super().check_room(new_tokens)

    def attend(self, layer: int, q: torch.Tensor, sm_scale: float, fresh: bool) -> torch.Tensor:
        self._check_current()
        return super().attend(layer, q, sm_scale, fresh)

    def advance(self, counts: Sequence[int], counts_t: Optional[torch.Tensor] = None) -> None:
        self._check_current()
        super().advance(counts, counts_t)
        for b, n in zip(self.slots, self._host_lens):
            self.parent._host_lens[b] = n
        self.parent.seqlens.index_copy_(0, self._idx, self.seqlens)
        self.parent._epoch += 1  # other views of these rows are stale now; this one is not
        self._epoch = self.parent._epoch

    def _parent_only(self, what: str):
        raise RuntimeError(f"{type(self.parent).__name__}.rows view: {what} the parent cache")

    def rows(self, slots: Sequence[int]) -> "KVCache":
        self._check_current()
        return type(self)(self, slots)  # a view of the parent's rows (see _init_view)

    def release(self, b: int) -> None:
        self._parent_only("release sequences on")

    def reset(self, lengths: Optional[Sequence[int]] = None) -> None:
        self._parent_only("reset")

    def rewind(self, n: int = 1) -> None:
        self._parent_only("rewind")

    def advance_host(self, counts: Sequence[int]) -> None:
        self._parent_only("advance_host on")

    @property
    def nbytes(self) -> int:
        """Bytes of the parent cache (the view holds no storage of its own)."""
        return self.parent.nbytes


class _ContiguousRows(_RowView, KVCache):
    """Sequences ``slots`` of a float :class:`KVCache` (:meth:`KVCache.rows`): appends write
    the parent's storage rows ``slots``, reads gather them."""

    def __init__(self, parent: KVCache, slots: Sequence[int]):
        self._init_view(parent, slots, ())


class _PagedRows(_RowView, PagedKVCache):
    """Sequences ``slots`` of a :class:`PagedKVCache` (:meth:`PagedKVCache.rows`): the same
    pool tensors, free list and per-sequence page lists (the list objects themselves, so pages
    taken here are the parent's), a block table of its own written back to the parent's."""

    def __init__(self, parent: PagedKVCache, slots: Sequence[int]):
        self._init_view(parent, slots, ("page_size", "num_pages", "_free"))
        self._pages = [self.parent._pages[b] for b in self.slots]
        self.block_table = self.parent.block_table.index_select(0, self._idx)

    def _sync_table(self) -> None:
        super()._sync_table()
        self.parent._sync_table()
