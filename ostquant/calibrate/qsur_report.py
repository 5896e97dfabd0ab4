"""Per-layer QSUR of the inputs that get quantized: the attention input (what q/k/v_proj read)
and the FFN input (what gate/up_proj read) of every decoder layer.

:func:`layer_input_qsur` hooks those projections, runs a few calibration samples through the
model (no gradients) and evaluates :class:`ostquant.metrics.QSURAccumulator` per layer and
input. :func:`quantize_model <ostquant.calibrate.pipeline.quantize_model>` calls it on the
original model (before any transform) and on the fused model (after the transforms, before
quantization), so a run summary shows what the transforms did to each layer.

Values are reported as ``log_qsur`` (natural log; QSUR itself underflows for d in the hundreds)
and as ``rel = exp((log_qsur − log_qsur_max(d)) / d)`` in ``(0, 1]``: the per-dimension
fraction of the best possible QSUR (1 = the data fill the quantization hypercube as well as a
ball can, paper eq. 28). Higher is better for both.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["layer_input_qsur", "compare_qsur", "format_qsur_table", "INPUTS"]

#: input name -> the projection whose input it is
INPUTS = {"attn": "q_proj", "ffn": "gate_proj"}


def _finite(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


@torch.no_grad()
def layer_input_qsur(model: nn.Module, calib_data: torch.Tensor, alpha: float = 0.99,
                     method: str = "exact") -> List[Dict[str, Optional[float]]]:
    """QSUR of each decoder layer's attention and FFN inputs over ``calib_data`` (LongTensor
    ``[n, seqlen]``, one forward per row): ``[{"layer": i, "attn_log": .., "attn_rel": ..,
    "ffn_log": .., "ffn_rel": ..}, ...]`` (None where the covariance is singular or there are
    fewer than d + 1 tokens)."""
    from ostquant.metrics.qsur import QSURAccumulator, log_qsur_max
    from ostquant.models.adapters import get_adapter

    if not isinstance(calib_data, torch.Tensor) or calib_data.dim() != 2 or \
            calib_data.numel() == 0:
        raise ValueError("layer_input_qsur: calib_data must be a non-empty [n, seqlen] tensor")
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    accs = [{k: QSURAccumulator() for k in INPUTS} for _ in layers]
    handles = []

    def make_hook(acc):
        def hook(module, args):
            acc.add(args[0].detach().float())
        return hook

    for i, layer in enumerate(layers):
        for k, role in INPUTS.items():
            handles.append(adapter.proj(layer, role).register_forward_pre_hook(
                make_hook(accs[i][k])))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for row in calib_data:
            model(input_ids=row[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = []
    for i, a in enumerate(accs):
        rec: Dict[str, Optional[float]] = {"layer": i}
        for k, acc in a.items():
            d = acc.dim
            if acc.n < d + 1:  # too few tokens for a d x d covariance: no value, no crash
                log.warning("QSUR of layer %d %s input skipped: %d tokens < d + 1 = %d", i, k,
                            acc.n, d + 1)
                rec[f"{k}_log"] = rec[f"{k}_rel"] = None
                continue
            lq = acc.log_qsur(alpha, method)
            rec[f"{k}_log"] = _finite(lq)
            rec[f"{k}_rel"] = _finite(math.exp((lq - log_qsur_max(d)) / d)) \
                if math.isfinite(lq) else None
        out.append(rec)
    return out


def compare_qsur(before: List[dict], after: Optional[List[dict]]) -> dict:
    """Combine two :func:`layer_input_qsur` results: per layer ``{k}_before``/``{k}_after``
    (the ``rel`` values) plus the means over layers."""
    after = after or [None] * len(before)
    layers = []
    for b, a in zip(before, after):
        rec = {"layer": b["layer"]}
        for k in INPUTS:
            rec[f"{k}_before"] = b[f"{k}_rel"]
            rec[f"{k}_after"] = None if a is None else a[f"{k}_rel"]
        layers.append(rec)

    def mean(key):
        vals = [r[key] for r in layers if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    return {"measure": "exp((log QSUR - log QSUR_max) / d), per layer input; higher is better",
            "layers": layers,
            "mean": {f"{k}_{w}": mean(f"{k}_{w}") for k in INPUTS for w in ("before", "after")}}


def format_qsur_table(report: dict) -> str:
    """The per-layer QSUR summary as text (one line per layer, then the means)."""
    def f(x):
        return "-" if x is None else f"{x:.4f}"

    head = "layer  attn before  attn after  ffn before  ffn after"
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        lines.append(f"{r['layer']:5d}  {f(r['attn_before']):>11}  {f(r['attn_after']):>10}  "
                     f"{f(r['ffn_before']):>10}  {f(r['ffn_after']):>9}")
    m = report["mean"]
    lines.append(f"{'mean':>5}  {f(m['attn_before']):>11}  {f(m['attn_after']):>10}  "
                 f"{f(m['ffn_before']):>10}  {f(m['ffn_after']):>9}")
    return "\n".join(lines)
