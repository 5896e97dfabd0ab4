"""Text generation on a :class:`~ostquant.runtime.QuantizedCausalLM`: prefill, then decode.

* :func:`generate` — batched prompts of different lengths (strings with a tokenizer, or token
  id lists), greedy or sampled (temperature, top-k, top-p, seeded), stopping at EOS or after
  ``max_new_tokens``; an optional ``callback`` sees every step (streaming).
* :func:`stream` — the same as an iterator of :class:`Step` objects.

The prompts are right-padded into one prefill forward (each sequence's real tokens never
attend to padding; the padding written to the cache is overwritten by the next step), then one
token per sequence per decode step. Sequences that finished keep running until all have (their
tokens are ignored), so the batch shape stays fixed.

With ``cuda_graph=True`` the decode step is captured once in a CUDA graph and replayed for every
token (:class:`~ostquant.runtime.cuda_graph.CUDAGraphDecoder`; the batch shape is fixed, so
one capture serves the whole generation). Where that is not possible (CPU, an op without its
CUDA kernel, a failed capture) a :class:`~ostquant.runtime.cuda_graph.CUDAGraphFallbackWarning`
says why and the decode runs eagerly; ``result.extra["cuda_graph"]`` says which ran.
"""
from __future__ import annotations

import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch

from ostquant import ops

from .cuda_graph import (CUDAGraphDecoder, CUDAGraphFallbackWarning, CUDAGraphUnavailable,
                         graph_unavailable_reason)
from .kv_cache import KVCache, PagedKVCache

__all__ = ["SamplingConfig", "Step", "GenerationResult", "generate", "stream", "sample_next",
           "encode_prompts"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked. ``do_sample=False``: greedy (argmax, first index on ties).
    Otherwise: ``logits / temperature``, keep the ``top_k`` best (0 = all), keep the smallest
    set whose probability reaches ``top_p`` (1.0 = all), sample with a ``torch.Generator``
    seeded with ``seed`` (None = nondeterministic)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None

    def generator(self, device) -> Optional[torch.Generator]:
        """The ``torch.Generator`` that sampling draws from on ``device`` (seeded with
        :attr:`seed`, else nondeterministically); None for greedy decoding."""
        if not self.do_sample:
            return None
        gen = torch.Generator(device=device)
        if self.seed is not None:
            gen.manual_seed(int(self.seed))
        else:
            gen.seed()
        return gen

    def __post_init__(self):
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0, got {self.top_k}")
            if not 0.0 < self.top_p <= 1.0:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row of ``logits`` [B, vocab] -> LongTensor [B]."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    x = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the tokens before it already reach top_p (the best one stays)
        drop = (probs.cumsum(dim=-1) - probs) >= cfg.top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Step:
    """One generated token per sequence: ``tokens[b]`` is None for a sequence that had already
    finished; ``finished[b]`` says whether sequence ``b`` is done after this step."""

    index: int
    tokens: List[Optional[int]]
    finished: List[bool]


@dataclass
class GenerationResult:
    """What :func:`generate` returns.

    ``tokens[b]``: the new token ids of prompt ``b`` (EOS included when it stopped there);
    ``texts[b]``: their decoded text (when a tokenizer is known); ``finish_reasons[b]``:
    ``"eos"`` or ``"length"``; timings in seconds (CUDA synchronised). ``extra``:
    ``cuda_graph`` (whether the decode steps replayed a CUDA graph), with ``cuda_graph=True``
    also ``cuda_graph_capture_seconds`` (warm-up + capture, not in ``decode_seconds``; 0 when
    a graph captured for the same cache was reused) or ``cuda_graph_fallback`` (why not)."""

    tokens: List[List[int]]
    prompt_tokens: List[List[int]]
    finish_reasons: List[str]
    texts: Optional[List[str]] = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        """Generated tokens (all sequences) per second of decode, the first token (from the
        prefill) excluded."""
        n = sum(max(0, len(t) - 1) for t in self.tokens)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def encode_prompts(prompts, tokenizer=None, add_special_tokens: bool = True
                   ) -> List[List[int]]:
    """Token id lists from a batch of prompts (strings need a tokenizer)."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and
                                    isinstance(prompts[0], int)):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        _check_id_tensor(prompts, "the prompt batch")
        if prompts.dim() not in (1, 2):
            raise ValueError(f"generate: a tensor of prompts must be 1-D (one prompt) or 2-D "
                             f"([batch, tokens]), got shape {tuple(prompts.shape)}")
        if prompts.dim() == 1:
            prompts = prompts[None]
        prompts = prompts.tolist()
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate: the prompt batch is empty")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("generate: string prompts need a tokenizer (the model has "
                                 "none; pass tokenizer= or token ids)")
            ids = list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"])
        elif isinstance(p, torch.Tensor):
            _check_id_tensor(p, f"prompt {i}")
            if p.dim() > 1:
                raise ValueError(f"generate: prompt {i} must be a 1-D tensor of token ids, got "
                                 f"shape {tuple(p.shape)}")
            ids = p.reshape(-1).tolist()
        else:
            try:
                ids = list(p)
            except TypeError:
                raise ValueError(f"generate: prompt {i} must be a string or a sequence of token "
                                 f"ids, got {type(p).__name__}") from None
            bad = [t for t in ids if not _is_int_id(t)]
            if bad:
                raise ValueError(f"generate: prompt {i} holds non-integer token ids "
                                 f"(first: {bad[0]!r} of type {type(bad[0]).__name__})")
            ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"generate: prompt {i} is empty")
        out.append(ids)
    return out


def _int_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _is_int_id(t) -> bool:
    if isinstance(t, torch.Tensor):
        return t.dim() == 0 and _int_dtype(t.dtype)
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def _check_id_tensor(t: torch.Tensor, what: str) -> None:
    if not _int_dtype(t.dtype):
        raise ValueError(f"generate: {what} must hold integer token ids, got a {t.dtype} tensor")


def prepare_prompts(model, prompts, max_new_tokens: int, tokenizer=None,
                    add_special_tokens: bool = True):
    """``(tokenizer, token id lists)`` of a generation request, checked: ``max_new_tokens``
    >= 1, prompts non-empty, ids in the model's vocabulary (``tokenizer`` defaults to the
    model's)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    ids = encode_prompts(prompts, tok, add_special_tokens)
    check_vocab(ids, model.spec.vocab_size)
    return tok, ids


def check_vocab(ids: List[List[int]], vocab: int) -> None:
    """Raise ``ValueError`` naming the first prompt with a token id outside the vocabulary."""
    for i, p in enumerate(ids):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids outside [0, {vocab}): "
                             f"{bad[:5]}")


def eos_set(eos) -> set:
    if eos is None:
        return set()
    if isinstance(eos, int):
        return {eos}
    return {int(e) for e in eos}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fallback(timing: dict, why: str) -> None:
    warnings.warn(f"cuda_graph=True: {why}; decoding eagerly", CUDAGraphFallbackWarning,
                  stacklevel=3)
    timing["cuda_graph_fallback"] = why


def _graph_decoder(model, cache: KVCache, timing: dict, keep: bool):
    """The :class:`CUDAGraphDecoder` for ``model`` over ``cache``: the one captured earlier
    for this cache when the model's tensors are unchanged, else a new capture, kept on the
    cache for later calls if ``keep`` (a cache the caller passed in; a cache allocated for one
    call is not worth keeping a graph for). None (after a :class:`CUDAGraphFallbackWarning`)
    when the step cannot be captured."""
    g = getattr(cache, "_cuda_graph_decoder", None)
    if g is not None and g.matches(model, cache):
        timing["cuda_graph_capture_seconds"] = 0.0
        return g
    try:
        g = CUDAGraphDecoder(model, cache)
    except CUDAGraphUnavailable as e:
        _fallback(timing, str(e))
        return None
    if keep:
        cache._cuda_graph_decoder = g
    timing["cuda_graph_capture_seconds"] = g.capture_seconds
    return g


def stream(model, prompts, max_new_tokens: int = 32, *, do_sample: bool = False,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           seed: Optional[int] = None, eos_token_id: Union[None, int, Sequence[int]] = None,
           stop_at_eos: bool = True, cache: Optional[KVCache] = None,
           max_cache_len: Optional[int] = None, tokenizer=None,
           add_special_tokens: bool = True, pad_token_id: int = 0, cuda_graph: bool = False,
           _timing: Optional[dict] = None) -> Iterator[Step]:
    """Generate step by step: yields one :class:`Step` per generated position.

    Arguments as :func:`generate`. The first step comes from the prefill's logits, every
    later one from a decode forward of one token per sequence (with ``cuda_graph``: a replay
    of the captured decode step).
    """
    cfg = SamplingConfig(do_sample, temperature, top_k, top_p, seed)
    tok, ids = prepare_prompts(model, prompts, max_new_tokens, tokenizer, add_special_tokens)
    B = len(ids)
    lens = [len(p) for p in ids]
    user_cache = cache is not None
    need = max(lens) + max_new_tokens - 1  # the last token is sampled, never fed
    if cache is None:
        cap = max_cache_len if max_cache_len is not None else need
        if max(lens) > cap:
            raise ValueError(f"generate: a prompt of {max(lens)} tokens is longer than the "
                             f"KV cache ({cap} tokens)")
        cache = model.new_cache(B, cap)
    else:
        if cache.batch_size != B:
            raise ValueError(f"generate: the cache holds {cache.batch_size} sequences, "
                             f"{B} prompts given")
        cache.reset()
    if max(lens) > cache.max_len:
        raise ValueError(f"generate: a prompt of {max(lens)} tokens is longer than the KV "
                         f"cache ({cache.max_len} tokens)")
    if need > cache.max_len:
        raise ValueError(f"generate: prompt ({max(lens)} tokens) + max_new_tokens "
                         f"({max_new_tokens}) needs {need} cache slots, the cache has "
                         f"{cache.max_len}")
    eos = eos_set(model.eos_token_id if eos_token_id is None else eos_token_id)
    if not stop_at_eos:
        eos = set()
    dev = model.device
    gen = cfg.generator(dev)
    timing = _timing if _timing is not None else {}
    timing["cuda_graph"] = False
    use_graph = bool(cuda_graph)
    if use_graph:
        why = graph_unavailable_reason(model, cache)
        if why is not None:
            _fallback(timing, f"cannot capture the decode step in a CUDA graph: {why}")
            use_graph = False
    graph = None
    batch = torch.full((B, max(lens)), pad_token_id, dtype=torch.long)
    for b, p in enumerate(ids):
        batch[b, :len(p)] = torch.tensor(p, dtype=torch.long)
    sync(dev)
    t0 = time.perf_counter()
    logits = model(batch.to(dev), cache, input_lengths=lens, logits="last")
    nxt = sample_next(logits, cfg, gen)
    nxt_host = nxt.tolist()
    timing["prefill_seconds"] = time.perf_counter() - t0
    finished = [False] * B
    release = cache.release if isinstance(cache, PagedKVCache) else None
    timing["decode_seconds"] = 0.0
    timing["decode_steps"] = 0
    for step in range(max_new_tokens):
        out: List[Optional[int]] = []
        for b in range(B):
            if finished[b]:
                out.append(None)
                continue
            out.append(nxt_host[b])
            if nxt_host[b] in eos:
                finished[b] = True
        last = step == max_new_tokens - 1 or all(finished)
        yield Step(step, out, list(finished))
        if last:
            break
        if release is not None:  # a paged cache: finished sequences hold no pages
            for b in range(B):
                if finished[b]:
                    release(b)
        feed = torch.tensor([pad_token_id if t is None else t for t in out], dtype=torch.long)
        if use_graph and graph is None:
            graph = _graph_decoder(model, cache, timing, keep=user_cache)
            use_graph = graph is not None
            timing["cuda_graph"] = use_graph
        t0 = time.perf_counter()
        if graph is not None:
            logits = graph.step(feed)
        else:
            logits = model(feed[:, None].to(dev), cache, logits="last")
        nxt_host = sample_next(logits, cfg, gen).tolist()  # (synchronises)
        if graph is not None:
            ops.kv_check_errors()  # a replay runs no host-side KV checks
        timing["decode_seconds"] += time.perf_counter() - t0
        timing["decode_steps"] += 1


def generate(model, prompts, max_new_tokens: int = 32, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: Optional[int] = None, eos_token_id: Union[None, int, Sequence[int]] = None,
             stop_at_eos: bool = True, callback: Optional[Callable[[Step], None]] = None,
             cache: Optional[KVCache] = None, max_cache_len: Optional[int] = None,
             tokenizer=None, add_special_tokens: bool = True,
             pad_token_id: int = 0, cuda_graph: bool = False) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens for each prompt.

    Args:
        model: a :class:`~ostquant.runtime.QuantizedCausalLM`.
        prompts: a string or list of token ids (one prompt), or a list of them (a batch; the
            lengths may differ), or a 2-D LongTensor. Strings need ``tokenizer`` or the
            model's own (``add_special_tokens`` as in transformers).
        max_new_tokens: tokens generated per prompt at most.
        do_sample, temperature, top_k, top_p, seed: see :class:`SamplingConfig` (greedy by
            default; with a ``seed`` sampling is reproducible).
        eos_token_id: stop a sequence after it generates one of these (default: the model's);
            ``stop_at_eos=False`` never stops early.
        callback: called with every :class:`Step` as it is produced (streaming).
        cache: a :class:`~ostquant.runtime.KVCache` to reuse (reset first); otherwise one is
            allocated with ``max_cache_len`` slots (default: exactly what is needed). With a
            :class:`~ostquant.runtime.PagedKVCache` a finished sequence gives its pages back
            to the pool at once (the others can grow into them; it keeps at most one page for
            the padding it is fed until the batch ends).
        pad_token_id: id used for right padding and for finished sequences (never attended).
        cuda_graph: capture the decode step in a CUDA graph once (after the prefill) and replay
            it for every token (:class:`~ostquant.runtime.cuda_graph.CUDAGraphDecoder`; the
            same tokens as eager decoding). CUDA only, with the compiled kernels of every op
            the step uses; otherwise a
            :class:`~ostquant.runtime.cuda_graph.CUDAGraphFallbackWarning` says why and
            decoding runs eagerly (``result.extra["cuda_graph"]`` is False). Pass the same
            ``cache`` to later calls to reuse the captured graph.

    Raises ``ValueError`` on an empty batch, an empty prompt, token ids outside the
    vocabulary, or prompts (plus ``max_new_tokens``) that do not fit the cache.
    """
    timing: dict = {}
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    prompt_ids = encode_prompts(prompts, tok, add_special_tokens)
    outs: List[List[int]] = [[] for _ in prompt_ids]
    reasons = ["length"] * len(prompt_ids)
    for st in stream(model, prompt_ids, max_new_tokens, do_sample=do_sample,
                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                     eos_token_id=eos_token_id, stop_at_eos=stop_at_eos, cache=cache,
                     max_cache_len=max_cache_len, tokenizer=tok, pad_token_id=pad_token_id,
                     cuda_graph=cuda_graph, _timing=timing):
        for b, t in enumerate(st.tokens):
            if t is not None:
                outs[b].append(t)
                if st.finished[b]:
                    reasons[b] = "eos"
        if callback is not None:
            callback(st)
    texts = None
    if tok is not None:
        texts = [tok.decode(t, skip_special_tokens=True) for t in outs]
    return GenerationResult(tokens=outs, prompt_tokens=prompt_ids, finish_reasons=reasons,
                            texts=texts, prefill_seconds=timing.get("prefill_seconds", 0.0),
                            decode_seconds=timing.get("decode_seconds", 0.0),
                            decode_steps=timing.get("decode_steps", 0),
                            extra={k: v for k, v in timing.items()
                                   if k.startswith("cuda_graph")})
