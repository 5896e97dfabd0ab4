"""The quantized LLaMA-family runtime model: :class:`QuantizedCausalLM`.

Three ways to build one:

* :meth:`QuantizedCausalLM.from_quantized` — a directory written by ``ostquant quantize`` /
  :func:`ostquant.calibrate.pipeline.quantize_model` (any method: rtn, quarot, spinquant,
  ostquant);
* :meth:`QuantizedCausalLM.from_hf` — a Hugging Face LLaMA / Mistral / Qwen2 model, either
  already quantized by ostquant (``QuantLinear`` projections, attention hook) or quantized on
  the fly with RTN (``preset=...``), or left in floating point;
* :meth:`QuantizedCausalLM.random` — random weights at a named shape (``llama-2-7b``,
  ``llama-3-8b``, ``llama-2-13b``, ``llama-30b``, ``llama-3-70b``, ``tiny``) with any number of layers, for
  benchmarks.

The model owns packed int4 weights only (no float copy of a quantized weight), the float
embedding / norms / ``lm_head`` (as in the checkpoints: they are not quantized), and a RoPE
table. Its :meth:`~QuantizedCausalLM.forward` runs ``S`` new tokens of ``B`` sequences against
a :class:`~ostquant.runtime.KVCache`; :meth:`~QuantizedCausalLM.generate` does prefill + decode.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ostquant.nn import QuantLinear

from .kv_cache import KVCache, PagedKVCache
from .layers import DecoderLayer, RMSNorm, Rotary, check_projection, fuse_linears

__all__ = ["RuntimeSpec", "QuantizedCausalLM", "random_layers"]

#: RoPE types whose frequencies change with the sequence length (not supported).
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


@dataclass(frozen=True)
class RuntimeSpec:
    """Shape and quantization settings of a :class:`QuantizedCausalLM`.

    ``wbits``/``abits`` describe the decoder projections (16 = floating point), ``kv_bits``
    the KV cache (4 = int4 cache, 16 = model dtype); ``q_k_hadamard`` / ``down_hadamard`` are
    the online Hadamards of the checkpoint. ``sliding_window``: the model's attention window
    (longer sequences are refused: the runtime attends to the whole cache).
    """

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    wbits: int = 16
    abits: int = 16
    kv_bits: int = 16
    q_k_hadamard: bool = False
    down_hadamard: bool = False
    sliding_window: Optional[int] = None
    name: str = ""

    @property
    def preset(self) -> str:
        return f"w{self.wbits}a{self.abits}kv{self.kv_bits}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sliding_window(config) -> Optional[int]:
    w = getattr(config, "sliding_window", None)
    if not w:
        return None
    if getattr(config, "model_type", "") == "qwen2" and not getattr(config, "use_sliding_window",
                                                                    False):
        return None
    return int(w)


def _rotary_from_hf(rotary_module, config) -> Rotary:
    rope_type = getattr(rotary_module, "rope_type", "default")
    if rope_type in DYNAMIC_ROPE_TYPES:
        raise NotImplementedError(f"RoPE type {rope_type!r} changes with the sequence length; "
                                  f"the runtime supports static RoPE types only")
    inv = getattr(rotary_module, "original_inv_freq", None)
    if inv is None:
        inv = rotary_module.inv_freq
    return Rotary(inv, getattr(rotary_module, "attention_scaling", 1.0), rope_type)


def _rotary_for_config(config) -> Rotary:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return _rotary_from_hf(LlamaRotaryEmbedding(config), config)


class QuantizedCausalLM(nn.Module):
    """A LLaMA-family causal LM running on the ``ostquant`` ops, with a KV cache.

    Build it with :meth:`from_quantized`, :meth:`from_hf` or :meth:`random`. Attributes:
    ``spec`` (:class:`RuntimeSpec`), ``layers`` (:class:`~ostquant.runtime.layers.DecoderLayer`),
    ``tokenizer`` (when known), ``info`` (the quantized directory's config, when loaded from
    one). Works on any device the ops run on (CPU: reference kernels; CUDA: the compiled
    kernels where they exist, the reference elsewhere); move it with ``.to(device)``.
    """

    def __init__(self, spec: RuntimeSpec, embed_weight: torch.Tensor,
                 layers: Sequence[DecoderLayer], final_norm: RMSNorm,
                 lm_head_weight: torch.Tensor, rotary: Rotary,
                 lm_head_bias: Optional[torch.Tensor] = None, tokenizer=None,
                 eos_token_id: Optional[Union[int, List[int]]] = None):
        super().__init__()
        self.spec = spec
        self.embed_weight = nn.Parameter(embed_weight.detach(), requires_grad=False)
        if lm_head_weight is embed_weight or (
                lm_head_weight.data_ptr() == embed_weight.data_ptr() and
                lm_head_weight.shape == embed_weight.shape):
            self.lm_head_weight = self.embed_weight  # tied: one tensor
        else:
            self.lm_head_weight = nn.Parameter(lm_head_weight.detach(), requires_grad=False)
        self.lm_head_bias = None if lm_head_bias is None else \
            nn.Parameter(lm_head_bias.detach(), requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = final_norm
        self.rotary = rotary
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.info: Optional[dict] = None

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (that of the embeddings)."""
        return self.embed_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_weight.device

    def new_cache(self, batch_size: int, max_len: int, paged: bool = False,
                  page_size: int = 64, num_pages: Optional[int] = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` sequences of up to ``max_len`` tokens;
        with ``paged=True`` a :class:`PagedKVCache` (int4 KV only) of ``num_pages`` pages of
        ``page_size`` tokens (default: enough for every sequence at ``max_len``)."""
        if paged:
            return PagedKVCache.for_model(self, batch_size, max_len, page_size=page_size,
                                          num_pages=num_pages)
        return KVCache.for_model(self, batch_size, max_len)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{s.name or s.model_type}: {s.num_layers} layers, hidden {s.hidden_size}, "
                f"heads {s.num_heads}/{s.num_kv_heads}x{s.head_dim}, {s.preset}, "
                f"q_k_hadamard={s.q_k_hadamard}, down_hadamard={s.down_hadamard}")

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache,
                input_lengths: Optional[Sequence[int]] = None, logits: str = "all"
                ) -> torch.Tensor:
        """Run ``input_ids`` [B, S] as the next tokens of the ``B`` sequences in ``cache``.

        Sequence ``b``'s tokens go to positions ``cache.lengths[b] ..``; ``input_lengths[b]``
        (default ``S``) of them are real, the rest right padding (written to the cache but
        overwritten later; real tokens never attend to them). Afterwards the cache holds
        ``cache.lengths[b] + input_lengths[b]`` tokens.

        ``logits``: ``"all"`` -> [B, S, vocab]; ``"last"`` -> [B, vocab] at each sequence's
        last real token; ``"none"`` -> the final hidden states [B, S, hidden] (no head).
        """
        self.check_inputs(input_ids, cache)
        B, S = input_ids.shape
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
        lens = [S] * B if input_lengths is None else [int(n) for n in input_lengths]
        if len(lens) != B or any(n < 1 or n > S for n in lens):
            raise ValueError(f"input_lengths must hold {B} values in [1, {S}], got {lens}")
        self.check_room(cache, S)
        input_ids = input_ids.to(self.device)
        fresh = all(n == 0 for n in cache.lengths)
        pos = cache.seqlens.long()[:, None] + torch.arange(S, device=self.device)[None, :]
        cos, sin = self.rotary(pos, self.dtype)
        x = F.embedding(input_ids, self.embed_weight)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, fresh)
        cache.advance(lens)
        if logits == "none":
            return x
        if logits == "last":
            idx = torch.tensor([n - 1 for n in lens], device=self.device)
            x = x[torch.arange(B, device=self.device), idx]
        return F.linear(self.norm(x), self.lm_head_weight, self.lm_head_bias)

    def check_inputs(self, input_ids: torch.Tensor, cache: KVCache) -> None:
        """Raise ``ValueError`` unless ``input_ids`` is a non-empty [B, S] batch for ``cache``
        (which must fit this model) with token ids in the vocabulary (checked for CPU ids
        only: on a GPU it would cost a sync)."""
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got shape "
                             f"{tuple(input_ids.shape)}")
        B = input_ids.shape[0]
        if B != cache.batch_size:
            raise ValueError(f"input_ids has {B} sequences but the cache holds "
                             f"{cache.batch_size}")
        if cache.num_layers != len(self.layers) or cache.kv_bits != self.spec.kv_bits or \
                cache.head_dim != self.spec.head_dim or \
                cache.num_kv_heads != self.spec.num_kv_heads:
            raise ValueError(f"{cache!r} does not fit this model ({self.spec.num_layers} layers, "
                             f"kv_bits {self.spec.kv_bits}, {self.spec.num_kv_heads} KV heads "
                             f"x {self.spec.head_dim}); use model.new_cache()")
        if input_ids.device.type == "cpu" and (
                int(input_ids.min()) < 0 or int(input_ids.max()) >= self.spec.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.spec.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")

    def check_room(self, cache: KVCache, new_tokens: int) -> None:
        """Raise :class:`~ostquant.runtime.CacheFullError` if ``new_tokens`` more tokens do not
        fit ``cache``, ``NotImplementedError`` if they would pass the sliding window."""
        cache.check_room(new_tokens)
        window = self.spec.sliding_window
        if window is not None and max(cache.lengths) + new_tokens > window:
            raise NotImplementedError(f"sequence longer than the model's sliding window "
                                      f"({window}); the runtime attends to the whole cache")

    @torch.no_grad()
    def decode_step(self, input_ids: torch.Tensor, cache: KVCache,
                    update_host: bool = True) -> torch.Tensor:
        """One new token per sequence (``input_ids`` [B, 1]) -> logits [B, vocab], with device
        work that does not depend on the cache lengths: the step
        :class:`~ostquant.runtime.cuda_graph.CUDAGraphDecoder` captures.

        The positions and KV slots come from ``cache.seqlens`` on the device, which the step
        advances by one on the device. The same computation as ``forward(input_ids, cache,
        logits="last")`` on a non-empty cache: bit-identical with an int4 cache; a float cache
        attends over its whole capacity with a length mask (:meth:`KVCache.graph_safe`), equal
        up to summation order.

        ``update_host=True`` (eager use): check the inputs and the room first and advance the
        cache's host lengths too. ``False``: the caller does both (a captured step runs no
        Python when replayed).
        """
        if cache.is_view:
            raise ValueError("decode_step needs the KV cache itself, not a row view "
                             "(KVCache.rows): a view's lengths are written back only by "
                             "forward()")
        if update_host:
            self.check_inputs(input_ids, cache)
            if input_ids.shape[1] != 1:
                raise ValueError(f"decode_step takes one token per sequence ([B, 1]), got "
                                 f"shape {tuple(input_ids.shape)}")
            self.check_room(cache, 1)
            cache.ensure_room(1)  # a paged cache takes the step's pages now
        pos = cache.seqlens.long()[:, None]
        cos, sin = self.rotary(pos, self.dtype)
        x = F.embedding(input_ids.to(self.device), self.embed_weight)
        with cache.graph_safe():
            for layer in self.layers:
                x = layer(x, cos, sin, cache, False)
        cache.seqlens += 1
        if update_host:
            cache.advance_host([1] * cache.batch_size)
        return F.linear(self.norm(x[:, -1]), self.lm_head_weight, self.lm_head_bias)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts, max_new_tokens: int = 32, **kw):
        """Prefill + decode; see :func:`ostquant.runtime.generate.generate`."""
        from .generate import generate

        return generate(self, prompts, max_new_tokens, **kw)

    def generate_continuous(self, prompts, max_new_tokens: int = 32, **kw):
        """Continuous batching over many prompts; see
        :func:`ostquant.runtime.serve.generate_continuous`."""
        from .serve import generate_continuous

        return generate_continuous(self, prompts, max_new_tokens, **kw)

    def stream(self, prompts, max_new_tokens: int = 32, **kw):
        """Iterator over decode steps; see :func:`ostquant.runtime.generate.stream`."""
        from .generate import stream

        return stream(self, prompts, max_new_tokens, **kw)

    def memory_report(self, cache: Optional[KVCache] = None, batch_size: int = 1,
                      seqlen: int = 1, context: Optional[int] = None, run=None):
        """Bytes of weights, KV cache and activations (estimated; measured on CUDA when
        ``run`` is given); see :func:`ostquant.runtime.memory.memory_report`."""
        from .memory import memory_report

        return memory_report(self, cache=cache, batch_size=batch_size, seqlen=seqlen,
                             context=context, run=run)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_hf(cls, model: nn.Module, preset=None, tokenizer=None, fuse: bool = True,
                progress: bool = False) -> "QuantizedCausalLM":
        """Build the runtime model from a Hugging Face LLaMA / Mistral / Qwen2 causal LM.

        * ``preset=None``: take the model as it is — the ``QuantLinear`` projections and the
          attention hook (KV bits, Q/K Hadamard) that ``apply_rtn``, ``quantize_model`` or
          ``load_quantized`` left on it, or plain ``nn.Linear`` (a float runtime model);
        * ``preset="w4a4kv4"`` (or any preset name / ``QuantConfig``) on a floating-point
          model: quantize it first with RTN (:func:`ostquant.baselines.apply_rtn`), **in
          place** (pass a copy to keep the original).

        The runtime shares the model's tensors (embeddings, norms, ``lm_head``, packed
        weights); with ``fuse`` q/k/v and gate/up become one projection each (new,
        concatenated tensors). Raises :class:`~ostquant.models.UnsupportedModelError` for an
        architecture the adapters do not know, ``NotImplementedError`` for a KV quantization
        the int4 cache cannot hold (only asymmetric int4 without clipping, i.e.
        :func:`ostquant.ops.quantize_kv`, and float are supported).
        """
        from ostquant.models.adapters import UnsupportedModelError, get_adapter
        from ostquant.models.attention import get_attention_hook

        adapter = get_adapter(model)
        layers = adapter.layers(model)
        first = adapter.proj(layers[0], "q_proj")
        if preset is not None:
            if isinstance(first, QuantLinear):
                raise ValueError("the model is already quantized; pass preset=None to use its "
                                 "quantization")
            from ostquant.baselines import apply_rtn

            apply_rtn(model, preset, progress=progress)
        hook = get_attention_hook(model)
        kv_bits = 16 if hook is None else int(hook.kv_bits)
        if kv_bits < 16 and (kv_bits != 4 or hook.kv_sym or hook.kv_clip_ratio != 1.0):
            raise NotImplementedError(
                f"KV quantization kv_bits={kv_bits}, sym={hook.kv_sym}, clip_ratio="
                f"{hook.kv_clip_ratio}: the runtime's int4 cache is asymmetric int4 without "
                f"clipping (ostquant.ops.quantize_kv)")
        kv_bits = 4 if kv_bits < 16 else 16
        q_k_had = bool(hook is not None and hook.q_k_hadamard)
        rope = adapter.rope
        if rope.rotary_dim != adapter.head_dim:
            raise UnsupportedModelError(f"partial RoPE (rotary_dim {rope.rotary_dim} of head_dim "
                                        f"{adapter.head_dim}) is not supported by the runtime")
        if kv_bits == 4 and adapter.head_dim not in (64, 128):
            raise UnsupportedModelError(f"the int4 KV cache needs head_dim 64 or 128, the model "
                                        f"has {adapter.head_dim}")
        built = []
        wbits = abits = 16
        down_had = False
        for i, layer in enumerate(layers):
            projs = {}
            for role in adapter.proj_paths:
                m = adapter.proj(layer, role)
                check_projection(f"layer {i} {role}", m)
                projs[role] = m
                if isinstance(m, QuantLinear):
                    wbits, abits = m.wbits, min(abits, m.abits)
            down_had = down_had or bool(getattr(projs["down_proj"], "online_hadamard", False))
            group = (lambda ms: fuse_linears(ms)) if fuse else (lambda ms: _concat(ms))
            qkv = group([projs["q_proj"], projs["k_proj"], projs["v_proj"]])
            gate_up = group([projs["gate_proj"], projs["up_proj"]])
            in_norm = adapter.input_norm(layer)
            post_norm = adapter.post_attn_norm(layer)
            built.append(DecoderLayer(
                i, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim,
                adapter.intermediate_size, RMSNorm(in_norm.weight, _eps(in_norm, adapter)),
                qkv, projs["o_proj"], RMSNorm(post_norm.weight, _eps(post_norm, adapter)),
                gate_up, projs["down_proj"], q_k_hadamard=q_k_had))
        dec = adapter.decoder(model)
        rotary = getattr(dec, "rotary_emb", None)
        rotary = _rotary_from_hf(rotary, model.config) if rotary is not None else \
            _rotary_for_config(model.config)
        head = adapter.lm_head(model)
        norm = adapter.final_norm(model)
        spec = RuntimeSpec(
            model_type=adapter.model_type, hidden_size=adapter.hidden_size,
            intermediate_size=adapter.intermediate_size, num_layers=len(layers),
            num_heads=adapter.num_heads, num_kv_heads=adapter.num_kv_heads,
            head_dim=adapter.head_dim, vocab_size=adapter.vocab_size,
            rms_norm_eps=adapter.rms_norm_eps, wbits=wbits, abits=abits, kv_bits=kv_bits,
            q_k_hadamard=q_k_had, down_hadamard=down_had,
            sliding_window=_sliding_window(model.config),
            name=str(getattr(model.config, "_name_or_path", "") or ""))
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        return cls(spec, adapter.embed_tokens(model).weight, built,
                   RMSNorm(norm.weight, _eps(norm, adapter)), head.weight, rotary,
                   lm_head_bias=head.bias, tokenizer=tokenizer, eos_token_id=eos)

    @classmethod
    def from_quantized(cls, path: str, device="cpu", model_source: Optional[str] = None,
                       fuse: bool = True) -> "QuantizedCausalLM":
        """Load a quantized-model directory (``config.json`` + ``model.safetensors``).

        Goes through :func:`ostquant.calibrate.pipeline.load_quantized` and keeps only what
        the runtime needs. A directory with ``hf_config.json`` (what ``ostquant quantize``
        writes) loads on its own with empty weights filled from the checkpoint (no float copy
        of a projection is made; the source model is not needed); an older directory rebuilds
        the architecture from its recorded model source (``model_source`` overrides it),
        materialising the float model once.
        """
        from ostquant.calibrate.pipeline import load_quantized

        hf, tok = load_quantized(path, device=device, model_source=model_source)
        rt = cls.from_hf(hf, tokenizer=tok, fuse=fuse)
        rt.info = dict(hf.ostquant_info)
        spec = dataclasses.replace(rt.spec, name=str(rt.info.get("model_source") or rt.spec.name))
        rt.spec = spec
        return rt

    @classmethod
    def random(cls, shape: str = "tiny", preset="w4a4kv4", num_layers: Optional[int] = None,
               dtype: torch.dtype = torch.bfloat16, device="cpu", seed: int = 0,
               online_hadamard: bool = True) -> "QuantizedCausalLM":
        """Random weights at a named shape (:data:`ostquant.runtime.shapes.NAMED_SHAPES`).

        Quantized projections get uniformly random int4 codes (weights of std ~0.02; nothing
        is quantized, so building is fast), float ones normal(0, 0.02) weights; embeddings and
        ``lm_head`` normal(0, 0.02), norms 1. ``online_hadamard`` puts the QuaRot/OSTQuant
        online Hadamards in (down_proj input when the weights are int4, Q/K when the KV cache
        is int4) so their cost is measured. ``num_layers`` builds fewer layers than the shape.
        """
        spec, layers, rotary, gen = random_layers(shape, preset, num_layers, dtype, device,
                                                  seed, online_hadamard)
        H, V = spec.hidden_size, spec.vocab_size
        device = torch.device(device)

        def normal(*shape_):
            return torch.empty(*shape_, device=device, dtype=dtype).normal_(0.0, 0.02,
                                                                            generator=gen)

        norm = RMSNorm(torch.ones(H, device=device, dtype=dtype), spec.rms_norm_eps)
        return cls(spec, normal(V, H), layers, norm, normal(V, H), rotary)


def random_layers(shape: str = "tiny", preset="w4a4kv4", num_layers: Optional[int] = None,
                  dtype: torch.dtype = torch.bfloat16, device="cpu", seed: int = 0,
                  online_hadamard: bool = True):
    """The decoder layers of :meth:`QuantizedCausalLM.random` alone (e.g. one layer for the
    prefill benchmark): ``(spec, layers, rotary, generator)``."""
    from ostquant import ops
    from ostquant.quant import QuantConfig, get_preset

    from .shapes import shape_config

    cfg = shape_config(shape, num_layers)
    qc = preset if isinstance(preset, QuantConfig) else get_preset(str(preset))
    if qc.wbits not in (4, 16) or qc.abits not in (4, 16) or qc.kvbits not in (4, 16):
        raise NotImplementedError(f"{qc.name}: the runtime supports 4 or 16 bits")
    if qc.wbits == 16 and qc.abits < 16:
        raise NotImplementedError(f"{qc.name}: activation quantization needs int4 weights")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    H, Fi = cfg.hidden_size, cfg.intermediate_size
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or H // nh
    down_had = online_hadamard and qc.wbits == 4
    qk_had = online_hadamard and qc.kvbits == 4

    def linear(n_in, n_out, had=False):
        if qc.wbits == 16:
            lin = nn.Linear(n_in, n_out, bias=False, device="meta", dtype=dtype)
            w = torch.empty(n_out, n_in, device=device, dtype=dtype)
            lin.weight = nn.Parameter(w.normal_(0.0, 0.02, generator=gen), requires_grad=False)
            return lin
        lin = QuantLinear(n_in, n_out, False, 4, qc.abits, qc.act_sym, qc.act_clip_ratio,
                          had, dtype=dtype, device="meta")
        lin.qweight = torch.randint(0, 256, (n_out, n_in // 2), generator=gen, device=device,
                                    dtype=torch.uint8)
        # uniform codes in [-8, 7] have std ~4.6: scale ~0.02/4.6 per channel
        lin.w_scale = (torch.rand(n_out, generator=gen, device=device) + 0.5) * 0.0043
        lin.w_sum = ops.unpack_int4(lin.qweight).float().sum(-1)
        return lin

    def norm():
        return RMSNorm(torch.ones(H, device=device, dtype=dtype), cfg.rms_norm_eps)

    layers = []
    for i in range(cfg.num_hidden_layers):
        layers.append(DecoderLayer(
            i, nh, nkv, hd, Fi, norm(), linear(H, (nh + 2 * nkv) * hd), linear(nh * hd, H),
            norm(), linear(H, 2 * Fi), linear(Fi, H, had=down_had), q_k_hadamard=qk_had))
    spec = RuntimeSpec(
        model_type="llama", hidden_size=H, intermediate_size=Fi,
        num_layers=cfg.num_hidden_layers, num_heads=nh, num_kv_heads=nkv, head_dim=hd,
        vocab_size=cfg.vocab_size, rms_norm_eps=cfg.rms_norm_eps, wbits=qc.wbits,
        abits=qc.abits if qc.wbits == 4 else 16, kv_bits=qc.kvbits,
        q_k_hadamard=qk_had, down_hadamard=down_had, name=shape)
    rotary = _rotary_for_config(cfg).to(device)
    return spec, layers, rotary, gen


def _eps(norm: nn.Module, adapter) -> float:
    for name in ("variance_epsilon", "eps"):
        v = getattr(norm, name, None)
        if isinstance(v, float):
            return v
    return adapter.rms_norm_eps


def _concat(mods):
    from .layers import ConcatLinear

    return ConcatLinear(mods)
