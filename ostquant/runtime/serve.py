"""Continuous batching: more prompts than batch slots, a finished sequence's slot (and its KV
pages) taken over by the next prompt at once.

:func:`generate_continuous` keeps ``batch_size`` slots in one KV cache (a
:class:`~ostquant.runtime.PagedKVCache` for an int4 KV cache, so sequences share one page
pool; the contiguous float cache for KV16 models). Every forward pass runs one token for each
decoding slot; a slot that has just been given a new prompt runs the whole prompt in the same
pass (its prefill: the other slots' single tokens are right-padded to the prompt's length,
and real tokens never attend to padding, see :meth:`QuantizedCausalLM.forward`). A slot whose
sequence stops (EOS or ``max_new_tokens``) is released (:meth:`KVCache.release`: length 0,
pages back to the pool) and refilled from the queue in the next pass.

Admission waits when the page pool is short: a prompt enters only if the pool can hold every
sequence in flight at its longest (prompt + ``max_new_tokens``, or further where a pass's
padding reaches), so a run never runs out of pages midway; the sequences already decoding go
first. A prompt that does not fit even in an otherwise idle cache raises
:class:`~ostquant.runtime.CacheFullError`.

Greedy tokens equal :func:`~ostquant.runtime.generate` run on each prompt alone, up to float
rounding (a prompt admitted mid-stream is prefilled through the decode attention kernel
rather than one causal SDPA call: the same math, another summation order).
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence, Union

import torch

from .generate import (GenerationResult, SamplingConfig, Step, eos_set, prepare_prompts,
                       sample_next, sync)
from .kv_cache import CacheFullError, KVCache, PagedKVCache

__all__ = ["generate_continuous"]


def generate_continuous(model, prompts, max_new_tokens: int = 32, *, batch_size: int = 8,
                        page_size: int = 64, num_pages: Optional[int] = None,
                        do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, seed: Optional[int] = None,
                        eos_token_id: Union[None, int, Sequence[int]] = None,
                        stop_at_eos: bool = True, callback: Optional[Callable[[Step], None]] = None,
                        tokenizer=None, add_special_tokens: bool = True,
                        pad_token_id: int = 0) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens for every prompt, ``batch_size`` at a time,
    refilling a slot as soon as its sequence finishes (continuous batching).

    Args:
        model: a :class:`~ostquant.runtime.QuantizedCausalLM`.
        prompts: as for :func:`~ostquant.runtime.generate` (any number of them).
        batch_size: slots run together (sequences in flight at most).
        page_size, num_pages: the page pool of the int4 cache (default: enough pages for
            every slot at full length; fewer make slots share a smaller pool, admission then
            waits for pages). Ignored for a KV16 model (contiguous float cache).
        do_sample, temperature, top_k, top_p, seed, eos_token_id, stop_at_eos, tokenizer,
            add_special_tokens, pad_token_id: as for :func:`~ostquant.runtime.generate`.
        callback: called after every forward pass with a :class:`Step` over the *prompts*
            (``tokens[i]`` the token prompt ``i`` got in this pass, None if none).

    Returns a :class:`GenerationResult` in prompt order; ``prefill_seconds`` is the first
    pass, ``decode_seconds`` all later passes (which include the prefills of prompts admitted
    later); ``extra`` holds ``passes`` (forward passes), ``admitted_late`` (prompts prefilled
    in a pass with other slots decoding) and ``max_pages_used`` (paged cache).

    Raises ``ValueError`` for an empty batch or prompt, token ids outside the vocabulary,
    ``batch_size < 1`` or ``max_new_tokens < 1``; :class:`CacheFullError` if a prompt does
    not fit the page pool even alone.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = SamplingConfig(do_sample, temperature, top_k, top_p, seed)
    tok, ids = prepare_prompts(model, prompts, max_new_tokens, tokenizer, add_special_tokens)
    n = len(ids)
    B = min(batch_size, n)
    longest = max(len(p) for p in ids)
    # a decoding slot (up to longest + max_new_tokens - 1 tokens) may carry the padding of
    # another slot's prompt (up to `longest` tokens) in the pass that admits it
    max_len = 2 * longest + max_new_tokens
    paged = model.spec.kv_bits == 4
    cache = model.new_cache(B, max_len, paged=paged, page_size=page_size, num_pages=num_pages) \
        if paged else model.new_cache(B, max_len)
    eos = eos_set(model.eos_token_id if eos_token_id is None else eos_token_id) \
        if stop_at_eos else set()
    dev = model.device
    gen = cfg.generator(dev)

    outs: List[List[int]] = [[] for _ in ids]
    reasons = ["length"] * n
    done = [False] * n
    slot_of: List[Optional[int]] = [None] * B      # prompt index held by each slot
    feed: List[Optional[int]] = [None] * B         # next token of a decoding slot
    queue = list(range(n))
    timing = {"prefill_seconds": 0.0, "decode_seconds": 0.0}
    passes = admitted_late = max_pages = 0
    reserved = [0] * B  # pages a slot's sequence may come to hold (see _admit)

    def reserve(prompt_len: int) -> int:  # paged cache only
        return cache.pages_for(prompt_len + max_new_tokens)

    while not all(done):
        decoding = [b for b in range(B) if slot_of[b] is not None]
        admit = _admit(cache, queue, slot_of, reserved, ids, reserve, paged)
        if not decoding and not admit:
            i = queue[0]
            pad = cache.pages_for(len(ids[i]))
            raise CacheFullError(
                f"generate_continuous: prompt {i} ({len(ids[i])} tokens) + max_new_tokens "
                f"({max_new_tokens}) does not fit the KV cache's page pool even alone: it may "
                f"need {reserve(len(ids[i]))} pages of {page_size} tokens (+{pad} per other "
                f"slot), the pool has {cache.num_pages}; use more num_pages or a smaller "
                f"batch_size")
        if decoding and admit:
            admitted_late += len(admit)
        rows, lens = [], []
        for b in range(B):
            if b in admit:
                p = ids[admit[b]]
                rows.append(p)
            elif slot_of[b] is not None:
                rows.append([feed[b]])
            else:  # idle slot: one padding token, released again after the pass
                rows.append([pad_token_id])
            lens.append(len(rows[-1]))
        S = max(lens)
        batch = torch.full((B, S), pad_token_id, dtype=torch.long)
        for b, r in enumerate(rows):
            batch[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        for b, i in admit.items():
            slot_of[b] = i
        sync(dev)
        t0 = time.perf_counter()
        logits = model(batch.to(dev), cache, input_lengths=lens, logits="last")
        nxt = sample_next(logits, cfg, gen).tolist()
        timing["prefill_seconds" if passes == 0 else "decode_seconds"] += \
            time.perf_counter() - t0
        passes += 1
        if paged:
            max_pages = max(max_pages, cache.pages_used)
        got: List[Optional[int]] = [None] * n
        for b in range(B):
            i = slot_of[b]
            if i is None:
                cache.release(b)
                continue
            t = int(nxt[b])
            outs[i].append(t)
            got[i] = t
            if t in eos or len(outs[i]) >= max_new_tokens:
                done[i] = True
                reasons[i] = "eos" if t in eos else "length"
                slot_of[b] = None
                reserved[b] = 0
                cache.release(b)
            else:
                feed[b] = t
        if callback is not None:
            callback(Step(passes - 1, got, list(done)))
    texts = [tok.decode(t, skip_special_tokens=True) for t in outs] if tok is not None else None
    extra = {"passes": passes, "admitted_late": admitted_late}
    if paged:
        extra["max_pages_used"] = max_pages
    return GenerationResult(tokens=outs, prompt_tokens=ids, finish_reasons=reasons, texts=texts,
                            prefill_seconds=timing["prefill_seconds"],
                            decode_seconds=timing["decode_seconds"],
                            decode_steps=max(0, passes - 1), extra=extra)


def _admit(cache: KVCache, queue: List[int], slot_of: List[Optional[int]],
           reserved: List[int], ids: List[List[int]], reserve: Callable[[int], int],
           paged: bool) -> dict:
    """Slot -> prompt index for the prompts that enter this pass (taken off ``queue``): one per
    idle slot, in queue order.

    With a page pool a prompt enters only if, after it, the pool still covers every sequence
    in flight at its longest (``reserved[b]`` pages: ``reserve(prompt length)``, raised when a
    pass's padding reaches further) plus this pass's padding of each slot left idle (idle slots
    are released after every pass). Finished slots give their reservation back, so every later
    pass fits too and a run never runs out of pages midway."""
    idle = [b for b, i in enumerate(slot_of) if i is None]
    admit: dict = {}
    if not paged:
        for b in idle[:len(queue)]:
            admit[b] = queue.pop(0)
        return admit
    lens = cache.lengths
    for b in idle:
        if not queue:
            break
        trial = {**admit, b: queue[0]}
        S = max(len(ids[i]) for i in trial.values())  # the pass's input length
        want = list(reserved)
        for d, i in enumerate(slot_of):
            if i is not None:  # decoding: its padding in this pass reaches lens[d] + S
                want[d] = max(want[d], cache.pages_for(lens[d] + S))
        for a, i in trial.items():
            want[a] = reserve(len(ids[i]))
        idle_after = len(idle) - len(trial)
        if sum(want) + idle_after * cache.pages_for(S) > cache.num_pages:
            break
        admit = trial
        queue.pop(0)
        reserved[:] = want
    return admit
