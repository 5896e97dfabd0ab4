"""Named model shapes for random-weight runtime models (benchmarks) and the tiny test shape.

Each shape is a Hugging Face config (``LlamaConfig``) so the runtime reads it through the same
adapter and RoPE code as a real checkpoint; no weights are created here.
"""
from __future__ import annotations

from typing import Dict

__all__ = ["NAMED_SHAPES", "shape_config", "shape_names"]

#: LLaMA-family shapes of the paper's tables (Table 9 prefill, Table 10 decode), plus
#: ``tiny`` (a 2-layer model for CPU dry runs and tests).
NAMED_SHAPES: Dict[str, dict] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-30b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                      num_attention_heads=52, num_key_value_heads=52, vocab_size=32000,
                      max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0),
    # Table 10's largest: fits an 80 GB GPU in int4 (~38 GB), not in bf16 (~141 GB)
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=256,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
}


def shape_names():
    """The named shapes, largest last (``tiny`` first)."""
    return ["tiny"] + [n for n in NAMED_SHAPES if n != "tiny"]


def shape_config(name: str, num_layers: int = None, **overrides):
    """A ``transformers.LlamaConfig`` of a named shape; ``num_layers`` overrides the depth."""
    from transformers import LlamaConfig

    if name not in NAMED_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose from {', '.join(shape_names())}")
    kw = dict(NAMED_SHAPES[name])
    theta = kw.pop("rope_theta")
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        kw["num_hidden_layers"] = int(num_layers)
    kw.update(overrides)
    cfg = LlamaConfig(**kw)
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    params.update(rope_type=params.get("rope_type", "default"), rope_theta=theta)
    cfg.rope_parameters = params
    cfg.rope_theta = theta
    cfg.name_or_path = name
    return cfg
