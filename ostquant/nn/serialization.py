"""Save and load models holding :class:`QuantLinear` layers as safetensors.

The file holds the model's whole state (packed int4 weights, scales, everything else) plus, in
the safetensors metadata, the format version and each QuantLinear's constructor config, so a
fresh floating-point model of the same architecture can be turned into the quantized one and
loaded without re-quantizing.
"""
from __future__ import annotations

import json
import os

from torch import nn

from .quant_linear import QuantLinear

FORMAT = "ostquant.quantized_state"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A quantized checkpoint is missing, corrupt, or does not match the model."""


def save_quantized_state(model: nn.Module, path: str) -> None:
    """Write ``model``'s state and its QuantLinear layout to ``path`` (safetensors)."""
    from safetensors.torch import save_model

    layout = {name: m.config() for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "quant_linears": json.dumps(layout)}
    tmp = path + ".tmp"
    save_model(model, tmp, metadata=meta)
    os.replace(tmp, path)  # never leave a half-written checkpoint under the real name


def read_layout(path: str) -> dict:
    """The QuantLinear layout stored in a checkpoint (``{module name: config}``)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"checkpoint {path!r} is not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not an ostquant quantized state "
                              f"(format={meta.get('format')!r})")
    if meta.get("version") != str(FORMAT_VERSION):
        raise CheckpointError(f"checkpoint {path!r} has format version {meta.get('version')}, "
                              f"this ostquant reads version {FORMAT_VERSION}")
    try:
        return json.loads(meta["quant_linears"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path!r} has a corrupt layout record: {e}") from e


def load_quantized_state(model: nn.Module, path: str, assign: bool = False,
                         device=None) -> nn.Module:
    """Turn the Linear layers named in the checkpoint into QuantLinear and load all weights.

    ``model`` must have the architecture the checkpoint was saved from (floating-point
    weights are overwritten). With ``assign=True`` the checkpoint's tensors (read onto
    ``device``) *replace* the model's instead of being copied into them: for a model whose
    parameters are on the ``meta`` device (built without memory), which then holds no
    floating-point copy of a quantized weight at any time; every parameter and buffer must
    then come from the checkpoint or already be real. Raises :class:`CheckpointError` on a
    corrupt or mismatched file.
    """
    from safetensors.torch import load_file, load_model

    layout = read_layout(path)
    for name, cfg in layout.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"checkpoint {path!r} quantizes {name!r}, which this model "
                                  f"does not have") from None
        if isinstance(old, nn.Linear):
            if (old.in_features, old.out_features) != (cfg["in_features"], cfg["out_features"]):
                raise CheckpointError(
                    f"checkpoint {path!r}: {name} is {cfg['in_features']}->{cfg['out_features']} "
                    f"but the model's is {old.in_features}->{old.out_features}")
            dtype, where = old.weight.dtype, old.weight.device
        elif isinstance(old, QuantLinear):
            dtype, where = old.qweight.dtype, old.qweight.device
            dtype = old.bias.dtype if old.bias is not None else dtype
        else:
            raise CheckpointError(f"checkpoint {path!r}: {name} is a {type(old).__name__}, "
                                  f"expected nn.Linear")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not dtype.is_floating_point:
            dtype = None
        new = QuantLinear(**cfg, device=where, **({"dtype": dtype} if dtype else {}))
        setattr(parent, child, new)
    try:
        if assign:
            sd = load_file(path, device=str(device or "cpu"))
            missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        else:
            missing, unexpected = load_model(model, path, strict=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r} could not be loaded into the model: {e}") from e
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path!r} does not match the model: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if assign:
        empty = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if t.is_meta]
        if empty:
            raise CheckpointError(f"checkpoint {path!r} leaves tensors of the model without "
                                  f"data: {empty[:5]}")
    return model
