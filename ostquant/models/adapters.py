"""Model adapters: how the rest of ostquant sees a LLaMA-family decoder.

Code outside this module never branches on model names. It asks the adapter returned by
:func:`get_adapter` for the pieces it needs (the decoder layers, the norms, the seven
projections of a layer, head counts, RoPE details) and stays family-agnostic.

Supported families (``model.config.model_type``):

* ``llama`` — LLaMA-1/2/3 and everything shaped like them (SmolLM2 included),
* ``mistral`` — same block as LLaMA (sliding-window attention is a mask detail),
* ``qwen2`` — LLaMA block with a bias on q/k/v.

To add a family, subclass :class:`ModelAdapter` (usually only class attributes change) and
decorate it with :func:`register_adapter`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple, Type

from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture is not one ostquant knows how to transform."""


@dataclass(frozen=True)
class RopeInfo:
    """What the equivalent transforms need to know about rotary position embeddings.

    ``rotary_dim`` channels of each head are rotated, in "rotate_half" style: channel ``i`` is
    rotated together with channel ``i + rotary_dim // 2`` (for ``i < rotary_dim // 2``), so a
    scaling of Q/K that must commute with RoPE has to give both channels of a pair the same
    factor (:meth:`pairs`).
    """

    rope_type: str
    theta: float
    head_dim: int
    rotary_dim: int
    parameters: Dict = field(default_factory=dict, compare=False)

    def pairs(self) -> List[Tuple[int, int]]:
        """The channel pairs ``(i, i + rotary_dim/2)`` that RoPE rotates together."""
        half = self.rotary_dim // 2
        return [(i, i + half) for i in range(half)]


class ModelAdapter:
    """Describes one LLaMA-style decoder family.

    An adapter is built from a model's config (:func:`get_adapter`); its shape properties
    (``num_heads``, ``head_dim`` ...) come from that config, and its accessors take the model
    (or one decoder layer) they should look into, so one adapter serves deep copies too.

    Layer layout assumed (pre-norm): ``h = h + o_proj(attn(input_norm(h)))``,
    ``h = h + down_proj(act(gate_proj(x)) * up_proj(x))`` with ``x = post_attn_norm(h)``.
    """

    #: ``config.model_type`` values this adapter handles.
    model_types: Tuple[str, ...] = ()
    #: whether q/k/v (resp. o) projections carry a bias.
    qkv_bias: bool = False
    o_bias: bool = False
    # attribute paths
    decoder_attr = "model"            # CausalLM -> base model
    layers_attr = "layers"            # base model -> ModuleList of decoder layers
    embed_attr = "embed_tokens"
    final_norm_attr = "norm"
    lm_head_attr = "lm_head"
    attn_attr = "self_attn"
    mlp_attr = "mlp"
    input_norm_attr = "input_layernorm"
    post_attn_norm_attr = "post_attention_layernorm"
    #: projection role -> attribute path inside a decoder layer
    proj_paths: Dict[str, str] = {
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj",
        "gate_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj",
    }

    def __init__(self, config):
        self.config = config
        self._check_config(config)

    # ------------------------------------------------------------------ shapes
    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        n = getattr(self.config, "num_key_value_heads", None)
        return int(n) if n is not None else self.num_heads

    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @property
    def head_dim(self) -> int:
        hd = getattr(self.config, "head_dim", None)
        return int(hd) if hd else self.hidden_size // self.num_heads

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    @property
    def rms_norm_eps(self) -> float:
        return float(self.config.rms_norm_eps)

    @property
    def rope(self) -> RopeInfo:
        params = dict(getattr(self.config, "rope_parameters", None) or {})
        theta = params.get("rope_theta", getattr(self.config, "rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        factor = params.get("partial_rotary_factor",
                            getattr(self.config, "partial_rotary_factor", 1.0)) or 1.0
        rotary_dim = int(self.head_dim * factor)
        return RopeInfo(rope_type=str(rope_type), theta=float(theta), head_dim=self.head_dim,
                        rotary_dim=rotary_dim, parameters=params)

    # ------------------------------------------------------------------ model-level modules
    def decoder(self, model: nn.Module) -> nn.Module:
        """The base (headless) model holding embeddings, layers and the final norm."""
        return getattr(model, self.decoder_attr) if hasattr(model, self.decoder_attr) else model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.decoder(model), self.layers_attr)

    def embed_tokens(self, model: nn.Module) -> nn.Embedding:
        return getattr(self.decoder(model), self.embed_attr)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return getattr(self.decoder(model), self.final_norm_attr)

    def lm_head(self, model: nn.Module) -> nn.Linear:
        head = getattr(model, self.lm_head_attr, None)
        if head is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no {self.lm_head_attr!r}; "
                                        f"pass the *ForCausalLM model")
        return head

    def layers_prefix(self, model: nn.Module) -> str:
        """Qualified name of the layer list inside ``model`` (e.g. ``"model.layers"``)."""
        lst = self.layers(model)
        for name, mod in model.named_modules():
            if mod is lst:
                return name
        raise UnsupportedModelError("decoder layers not found among the model's modules")

    # ------------------------------------------------------------------ layer-level modules
    def attn(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn_attr)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_attr)

    def input_norm(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.input_norm_attr)

    def post_attn_norm(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.post_attn_norm_attr)

    def proj(self, layer: nn.Module, role: str) -> nn.Module:
        """The projection ``role`` (one of :attr:`proj_paths`) of a decoder layer."""
        if role not in self.proj_paths:
            raise KeyError(f"unknown projection {role!r}; choose from {list(self.proj_paths)}")
        return layer.get_submodule(self.proj_paths[role])

    def q_proj(self, layer):
        return self.proj(layer, "q_proj")

    def k_proj(self, layer):
        return self.proj(layer, "k_proj")

    def v_proj(self, layer):
        return self.proj(layer, "v_proj")

    def o_proj(self, layer):
        return self.proj(layer, "o_proj")

    def gate_proj(self, layer):
        return self.proj(layer, "gate_proj")

    def up_proj(self, layer):
        return self.proj(layer, "up_proj")

    def down_proj(self, layer):
        return self.proj(layer, "down_proj")

    def residual_readers(self, layer: nn.Module) -> List[nn.Module]:
        """Projections that read the (normed) residual stream: q, k, v, gate, up."""
        return [self.proj(layer, r) for r in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]

    def residual_writers(self, layer: nn.Module) -> List[nn.Module]:
        """Projections that write into the residual stream: o, down."""
        return [self.proj(layer, r) for r in ("o_proj", "down_proj")]

    # ------------------------------------------------------------------ names / filters
    def decoder_linear_names(self, model: nn.Module) -> List[str]:
        """Qualified names of the seven projections of every decoder layer."""
        prefix = self.layers_prefix(model)
        return [f"{prefix}.{i}.{path}" for i in range(len(self.layers(model)))
                for path in self.proj_paths.values()]

    def decoder_linear_filter(self, model: nn.Module) -> Callable[[str, nn.Module], bool]:
        """A ``filter(name, module)`` accepting exactly the decoder-layer projections
        (not the embeddings, not ``lm_head``)."""
        names = frozenset(self.decoder_linear_names(model))
        return lambda name, module: name in names

    # ------------------------------------------------------------------ checks
    def _check_config(self, config) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"{config.model_type}: hidden_act={act!r} is not "
                                        f"supported (expected a SwiGLU MLP with silu)")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(f"{config.model_type}: {self.num_heads} attention heads "
                                        f"are not a multiple of {self.num_kv_heads} KV heads")

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` if ``model`` lacks the expected modules."""
        try:
            layers = self.layers(model)
            self.embed_tokens(model)
            self.final_norm(model)
            self.lm_head(model)
            if len(layers) == 0:
                raise UnsupportedModelError("model has no decoder layers")
            layer = layers[0]
            for role in self.proj_paths:
                self.proj(layer, role)
            self.input_norm(layer)
            self.post_attn_norm(layer)
        except AttributeError as e:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not have the layout of a {self.model_type} model "
                f"({e})") from None

    def describe(self) -> str:
        return (f"{self.model_type}: {self.num_layers} layers, hidden {self.hidden_size}, "
                f"ffn {self.intermediate_size}, heads {self.num_heads}/{self.num_kv_heads} "
                f"(q/kv), head_dim {self.head_dim}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


_REGISTRY: Dict[str, Type[ModelAdapter]] = {}


def register_adapter(cls: Type[ModelAdapter]) -> Type[ModelAdapter]:
    """Class decorator adding an adapter to the registry under each of its ``model_types``."""
    for t in cls.model_types:
        _REGISTRY[t] = cls
    return cls


def supported_model_types() -> List[str]:
    return sorted(_REGISTRY)


@register_adapter
class LlamaAdapter(ModelAdapter):
    """LLaMA-1/2/3, SmolLM, and other ``model_type == "llama"`` checkpoints."""

    model_types = ("llama",)

    def __init__(self, config):
        super().__init__(config)
        self.qkv_bias = bool(getattr(config, "attention_bias", False))
        self.o_bias = self.qkv_bias


@register_adapter
class MistralAdapter(ModelAdapter):
    """Mistral: the LLaMA block; sliding-window attention only changes the mask."""

    model_types = ("mistral",)


@register_adapter
class Qwen2Adapter(ModelAdapter):
    """Qwen2 / Qwen2.5: the LLaMA block with a bias on q/k/v (not on o)."""

    model_types = ("qwen2",)
    qkv_bias = True


def get_adapter(model_or_config) -> ModelAdapter:
    """The adapter for a model (or its config), chosen by ``config.model_type``.

    Raises :class:`UnsupportedModelError` naming the supported families otherwise.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    cls = _REGISTRY.get(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by ostquant; supported: "
            f"{', '.join(supported_model_types())}")
    adapter = cls(config)
    if isinstance(model_or_config, nn.Module):
        adapter.check_model(model_or_config)
    return adapter
