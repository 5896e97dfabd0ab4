"""Perplexity of a causal LM over fixed-length token windows."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def nll_sum(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
            desc: Optional[str] = None):
    """Summed next-token negative log-likelihood over ``windows`` and the number of predicted
    tokens: ``(Σ −log p(x_t | x_<t), count)`` with ``count = n · (seqlen − 1)``.

    Each window is an independent sequence (no context carried across windows); its first
    token is only context. The sum is accumulated in float64.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise ValueError("windows must be a LongTensor [n, seqlen]")
    n, seqlen = windows.shape
    if n == 0 or seqlen < 2:
        raise ValueError(f"perplexity needs at least one window of >= 2 tokens, got shape "
                         f"{tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc or "perplexity", unit="batch",
                      total=math.ceil(n / batch_size), leave=False)
    try:
        for s in starts:
            ids = windows[s: s + batch_size].to(device=device, dtype=torch.long)
            logits = model(input_ids=ids, use_cache=False).logits
            logits = logits[:, :-1, :].float()
            targets = ids[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   reduction="sum")
            total += loss.double().cpu()
            count += targets.numel()
    finally:
        model.train(was_training)
    return float(total), count


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
               progress: bool = True, desc: Optional[str] = None) -> float:
    """``exp(mean NLL)`` of next-token prediction over all windows (see :func:`nll_sum`).

    Windows are moved to the model's device. A diverged model gives ``inf`` (or ``nan`` if
    its logits are NaN) rather than an exception.
    """
    total, count = nll_sum(model, windows, batch_size, progress, desc)
    mean = total / count
    if math.isnan(mean):
        return float("nan")
    if mean > 709.0:  # exp overflows float64
        return float("inf")
    return math.exp(mean)
