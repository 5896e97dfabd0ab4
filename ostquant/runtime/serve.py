"""Continuous batching: more prompts than batch slots, a finished sequence's slot (and its KV
pages) taken over by the next prompt at once.

:func:`generate_continuous` keeps ``batch_size`` slots in one KV cache (a
:class:`~ostquant.runtime.PagedKVCache` for an int4 KV cache, so sequences share one page
pool; the contiguous float cache for KV16 models). Each step gives every decoding slot one
token, and a slot that has just been given a new prompt its first token. A step is separate
forward passes through row views of the cache (:meth:`~ostquant.runtime.KVCache.rows`): the
admitted prompts' prefill (from an empty cache: one causal SDPA, exactly
:func:`~ostquant.runtime.generate`'s prefill), then one token for each decoding slot, so
nobody is padded to anybody else's length and idle slots cost nothing; ``prefill_chunk``
splits a long prompt's prefill over several steps (chunked prefill), the decoding slots
getting a token in each; a step's chunks share one forward, a short last chunk padded only
into positions its sequence has reserved anyway (else it gets a forward of its own), so no
sequence ever holds a page for padding. A slot whose sequence stops (EOS or ``max_new_tokens``) is released
(:meth:`KVCache.release`: length 0, pages back to the pool) and refilled from the queue in the
next step.

Admission waits when the page pool is short: a prompt enters only if the pool can hold every
sequence in flight at its longest (prompt + ``max_new_tokens``, or, for whole-prompt
prefill, the admitted prompts' common prefill length if that is more), so a run never runs out
of pages midway; the sequences already decoding go first. A prompt that does not fit even in
an otherwise idle cache raises :class:`~ostquant.runtime.CacheFullError`.

Greedy tokens equal :func:`~ostquant.runtime.generate` run on each prompt alone, up to float
rounding (batching changes the shapes the GEMMs see; a prompt prefilled in chunks attends
through the decode attention kernel rather than one causal SDPA call: the same math, another
summation order — with 4-bit activations such a difference can move a per-token quantization
code by one step, and on a near-tie a greedy token).
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence, Union

import torch

from .generate import (GenerationResult, SamplingConfig, Step, eos_set, prepare_prompts,
                       sample_next, sync)
from .kv_cache import CacheFullError, PagedKVCache

__all__ = ["generate_continuous"]


def generate_continuous(model, prompts, max_new_tokens: int = 32, *, batch_size: int = 8,
                        page_size: int = 64, num_pages: Optional[int] = None,
                        do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, seed: Optional[int] = None,
                        eos_token_id: Union[None, int, Sequence[int]] = None,
                        stop_at_eos: bool = True, callback: Optional[Callable[[Step], None]] = None,
                        tokenizer=None, add_special_tokens: bool = True,
                        pad_token_id: int = 0,
                        prefill_chunk: Optional[int] = None) -> GenerationResult:
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
        callback: called after every step with a :class:`Step` over the *prompts*
            (``tokens[i]`` the token prompt ``i`` got in this step, None if none).
        prefill_chunk: prefill at most this many prompt tokens of a sequence per step
            (chunked prefill), so a long prompt does not hold the decoding
            slots' next tokens back for its whole prefill; None (default): whole prompts
            (the prompts admitted in one step prefilled together, padded to the longest).
            A sequence reserves exactly prompt + ``max_new_tokens`` - 1 positions' pages:
            the chunks of one step share a forward, a shorter chunk padded only into
            positions its sequence has reserved anyway (else it runs in a forward of its
            own, see ``_prefill_groups``).

    Returns a :class:`GenerationResult` in prompt order; ``prefill_seconds`` is the first
    step, ``decode_seconds`` all later steps (which include the prefills of prompts admitted
    later); ``extra`` holds ``passes`` (steps), ``forwards`` (forward passes: in a step one
    for the decoding slots and one or more for prefills), ``admitted_late`` (prompts admitted
    while other slots were decoding) and ``max_pages_used`` (paged cache).

    Raises ``ValueError`` for an empty batch or prompt, token ids outside the vocabulary,
    ``batch_size < 1``, ``max_new_tokens < 1`` or a bad ``prefill_chunk``;
    :class:`CacheFullError` if a prompt does not fit the page pool even alone.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prefill_chunk is not None:
        if int(prefill_chunk) < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        prefill_chunk = int(prefill_chunk)
    cfg = SamplingConfig(do_sample, temperature, top_k, top_p, seed)
    tok, ids = prepare_prompts(model, prompts, max_new_tokens, tokenizer, add_special_tokens)
    n = len(ids)
    B = min(batch_size, n)
    longest = max(len(p) for p in ids)
    paged = model.spec.kv_bits == 4
    # Each pass serves only its sequences, through row views of the cache (the admitted
    # prompts' prefill, then the decoding slots' next tokens): a sequence never holds another's
    # padding, so prompt + max_new_tokens positions suffice (a whole-prompt prefill pads to at
    # most the longest prompt). Int4 KV: a paged cache (sequences share one page pool);
    # KV16: the contiguous float cache.
    max_len = longest + max_new_tokens
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
    passes = forwards = admitted_late = max_pages = 0
    reserved = [0] * B  # pages a slot's sequence may come to hold (paged; see _admit_paged)
    done_prefill = [0] * B  # prompt tokens of a slot's sequence already in the cache

    def forward(rows: List[List[int]], kv, sample: bool = True) -> List[Optional[int]]:
        """One forward of right-padded ``rows`` through ``kv``; the next token of each row
        (``sample=False``: no logits, e.g. a prefill chunk that completes no prompt)."""
        nonlocal forwards
        S = max(len(r) for r in rows)
        batch = torch.full((len(rows), S), pad_token_id, dtype=torch.long)
        for j, r in enumerate(rows):
            batch[j, :len(r)] = torch.tensor(r, dtype=torch.long)
        logits = model(batch.to(dev), kv, input_lengths=[len(r) for r in rows],
                       logits="last" if sample else "none")
        forwards += 1
        return sample_next(logits, cfg, gen).tolist() if sample else [None] * len(rows)

    while not all(done):
        busy = [b for b in range(B) if slot_of[b] is not None]
        decoding = [b for b in busy if done_prefill[b] == len(ids[slot_of[b]])]
        admit = _admit_paged(cache, queue, slot_of, reserved, ids, max_new_tokens,
                             prefill_chunk) if paged else _admit(queue, slot_of)
        if not busy and not admit:
            i = queue[0]
            need = _pages_needed(cache, len(ids[i]), len(ids[i]), max_new_tokens, prefill_chunk)
            raise CacheFullError(
                f"generate_continuous: prompt {i} ({len(ids[i])} tokens) + max_new_tokens "
                f"({max_new_tokens}) does not fit the KV cache's page pool even alone: it may "
                f"need {need} pages of {page_size} tokens; the pool has "
                f"{cache.num_pages}; use more num_pages or a smaller batch_size")
        if decoding and admit:
            admitted_late += len(admit)
        for b, i in admit.items():
            slot_of[b] = i
            done_prefill[b] = 0
        sync(dev)
        t0 = time.perf_counter()
        nxt = {}  # slot -> its next token
        prefilling = [b for b in range(B) if slot_of[b] is not None and b not in decoding]
        # the next chunk (or the whole rest) of each prompt being prefilled: whole prompts in
        # one padded forward; chunks padded to the step's longest only within what their
        # sequence has reserved anyway (else in a forward of their own length)
        C = prefill_chunk or longest
        room = [min(max_len, reserved[b] * cache.page_size) if paged else max_len
                for b in range(B)]
        for group in _prefill_groups(prefilling, slot_of, done_prefill, ids, prefill_chunk,
                                     room):
            rows = [ids[slot_of[b]][done_prefill[b]:done_prefill[b] + C] for b in group]
            completes = any(done_prefill[b] + len(r) == len(ids[slot_of[b]])
                            for b, r in zip(group, rows))
            for b, r, t in zip(group, rows, forward(rows, cache.rows(group), completes)):
                done_prefill[b] += len(r)
                if done_prefill[b] == len(ids[slot_of[b]]):
                    nxt[b] = t  # the prompt is in: its first generated token
        if decoding:
            nxt.update(zip(decoding, forward([[feed[b]] for b in decoding],
                                             cache.rows(decoding))))
        timing["prefill_seconds" if passes == 0 else "decode_seconds"] += \
            time.perf_counter() - t0
        passes += 1
        if paged:
            max_pages = max(max_pages, cache.pages_used)
        got: List[Optional[int]] = [None] * n
        for b in range(B):
            i = slot_of[b]
            if i is None:
                continue
            if b not in nxt:  # still prefilling (chunked)
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
    extra = {"passes": passes, "forwards": forwards, "admitted_late": admitted_late}
    if paged:
        extra["max_pages_used"] = max_pages
    return GenerationResult(tokens=outs, prompt_tokens=ids, finish_reasons=reasons, texts=texts,
                            prefill_seconds=timing["prefill_seconds"],
                            decode_seconds=timing["decode_seconds"],
                            decode_steps=max(0, passes - 1), extra=extra)


def _admit(queue: List[int], slot_of: List[Optional[int]]) -> dict:
    """Slot -> prompt index for the prompts that enter this pass (taken off ``queue``): one per
    idle slot, in queue order (contiguous cache: every slot has its full capacity)."""
    admit: dict = {}
    for b in [b for b, i in enumerate(slot_of) if i is None][:len(queue)]:
        admit[b] = queue.pop(0)
    return admit


def _prefill_groups(prefilling: List[int], slot_of: List[Optional[int]],
                    done_prefill: List[int], ids: List[List[int]], chunk: Optional[int],
                    room: Sequence[int]) -> List[List[int]]:
    """The forwards of one step's prefill, each a list of slots: whole prompts (``chunk``
    None) all in one (padded to the longest). Chunks: a forward is padded to its longest chunk
    L, and a slot joins it only if its padded end ``done + L`` stays within ``room[b]``, the
    positions its sequence may take anyway (its reserved pages, the capacity); the others form
    the next forward with the next longest chunk. So padding never takes a page the admission
    did not count (reservation: prompt + ``max_new_tokens`` - 1 positions), and usually one
    forward serves every chunk: a prompt's short last chunk pads into the positions its
    generated tokens will use."""
    if not prefilling:
        return []
    if chunk is None:
        return [prefilling]
    length = {b: min(chunk, len(ids[slot_of[b]]) - done_prefill[b]) for b in prefilling}
    left = sorted(prefilling, key=lambda b: -length[b])
    groups = []
    while left:
        longest = length[left[0]]  # fits its own slot: done + length <= prompt <= room
        group = [b for b in left if done_prefill[b] + longest <= room[b]]
        groups.append(group)
        left = [b for b in left if b not in group]
    return groups


def _prefill_end(n: int, common: int, chunk: Optional[int]) -> int:
    """The furthest position a prompt of ``n`` tokens writes during its prefill, padding
    included, as far as the reservation must count it: the admitted prompts' common length
    ``common`` (whole prompts prefilled together), or ``n`` with chunked prefill (its chunks
    pad only into positions already reserved, see :func:`_prefill_groups`)."""
    return common if chunk is None else n


def _pages_needed(cache: PagedKVCache, n: int, common: int, max_new_tokens: int,
                  chunk: Optional[int]) -> int:
    """Pages a sequence with an ``n``-token prompt may come to hold: its prefill's padding, or
    its prompt + ``max_new_tokens`` - 1 positions (the last sampled token is never stored),
    whichever reaches further."""
    return cache.pages_for(max(_prefill_end(n, common, chunk), n + max_new_tokens - 1))


def _admit_paged(cache: PagedKVCache, queue: List[int], slot_of: List[Optional[int]],
                 reserved: List[int], ids: List[List[int]], max_new_tokens: int,
                 chunk: Optional[int]) -> dict:
    """As :func:`_admit`, but a prompt enters only if the page pool still covers every
    sequence in flight at its longest afterwards: ``reserved[b]`` pages for slot ``b``, its
    prompt + ``max_new_tokens`` tokens, or the admitted prompts' common prefill length (the
    padding of a batched prefill takes pages too), whichever is more (the last token sampled is
    never stored, so prompt + ``max_new_tokens`` - 1 positions); with ``chunk`` (chunked
    prefill: padding stays within it) just the latter. Finished slots give their reservation back, so every
    later pass fits and a run never runs out of pages midway; the sequences already decoding
    go first."""
    admit: dict = {}
    for b in [b for b, i in enumerate(slot_of) if i is None]:
        if not queue:
            break
        trial = {**admit, b: queue[0]}
        S = max(len(ids[i]) for i in trial.values())  # the admitted prefill's length
        want = list(reserved)
        for a, i in trial.items():
            want[a] = _pages_needed(cache, len(ids[i]), S, max_new_tokens, chunk)
        if sum(want) > cache.num_pages:
            break
        admit = trial
        queue.pop(0)
        reserved[:] = want
    return admit
