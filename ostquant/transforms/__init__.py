"""Equivalent transformation pairs (OSTQuant): parameters, WOMI init, training form, fusion.

* :class:`TransformConfig` — which pairs are on (R_res, S_res, R_ov, S_ov, S_qk, Q/K Hadamard,
  S_up|down, down_proj Hadamard) and how R_res is initialised.
* :class:`OSTParams` — the learnable tensors (Stiefel orthogonal matrices, log-scales).
* :func:`apply_training_transforms` — make a model compute with transformed, fake-quantized
  weights so gradients reach the parameters.
* :func:`fuse_transforms` — fold everything into the weights (float64); only the norm scales
  and the online Hadamards remain.
"""
from .fuse import fuse_transforms, online_hadamards, prepare_model, quantize_fused
from .model import (TransformedModel, apply_training_transforms, remove_training_transforms,
                    set_training_quant)
from .pairs import OSTParams, TransformConfig

__all__ = ["TransformConfig", "OSTParams", "prepare_model", "fuse_transforms", "online_hadamards",
           "quantize_fused", "apply_training_transforms", "remove_training_transforms",
           "set_training_quant", "TransformedModel"]
