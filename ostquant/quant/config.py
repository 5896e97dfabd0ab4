"""Bit-width presets (W4A16KV16, W4A4KV16, W4A4KV4) and their quantizer settings."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class QuantConfig:
    """What gets quantized and how. A width of 16 means "leave in floating point".

    Weights: per output channel, symmetric by default, with a clipping-ratio search.
    Activations (inputs of every decoder Linear): per token, asymmetric by default.
    KV cache: K (after RoPE) and V per token per head, asymmetric.
    """

    wbits: int = 16
    abits: int = 16
    kvbits: int = 16
    w_sym: bool = True
    w_clip_search: bool = True
    act_sym: bool = False
    act_clip_ratio: float = 1.0
    kv_sym: bool = False
    kv_clip_ratio: float = 1.0

    def __post_init__(self):
        for name in ("wbits", "abits", "kvbits"):
            v = getattr(self, name)
            if v not in (2, 3, 4, 8, 16):
                raise ValueError(f"QuantConfig.{name} must be one of 2, 3, 4, 8, 16; got {v}")
        for name in ("act_clip_ratio", "kv_clip_ratio"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"QuantConfig.{name} must be in (0, 1], got {v}")

    @property
    def name(self) -> str:
        """Preset-style name, e.g. ``w4a4kv4``."""
        return f"w{self.wbits}a{self.abits}kv{self.kvbits}"

    def replace(self, **kw) -> "QuantConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    "w16a16kv16": QuantConfig(),
    "w4a16kv16": QuantConfig(wbits=4),
    "w4a4kv16": QuantConfig(wbits=4, abits=4),
    "w4a4kv4": QuantConfig(wbits=4, abits=4, kvbits=4),
}


def get_preset(name: str) -> QuantConfig:
    """The :class:`QuantConfig` of a named preset (case-insensitive, '-' and '_' ignored)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key in ("w4a16",):
        key = "w4a16kv16"
    if key in ("w4a4",):
        key = "w4a4kv16"
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[key]
