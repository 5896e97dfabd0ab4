"""Calibration losses: KL-Top (OSTQuant eq. 12), full-vocabulary KL, next-token cross-entropy.

All losses take logits ``[..., V]`` (any leading shape, typically ``[B, S, V]``), compute in at
least float32 (bf16/fp16 logits are upcast; float64 stays float64) and return a scalar: the mean
over the positions that are kept. ``attention_mask`` (optional, shape ``logits.shape[:-1]``,
bool or 0/1) marks the positions to keep; if no position is kept the loss is an exact zero that
is still connected to the graph. The teacher (full-precision model) is always detached, so
gradients flow to the student (the quantized model) only.

KL-Top (paper eq. 12)::

    idxs = topk(z_teacher, k)                       # per position
    L    = Σ_{i ∈ idxs} p[i] · log(p[i] / p̂[i])

With ``renormalize=True`` (default) ``p`` and ``p̂`` are the teacher's and student's
distributions *renormalised over the k selected tokens* (a softmax over the gathered logits),
so the loss is a proper KL divergence: ≥ 0, zero iff the student's top-k logits equal the
teacher's up to a constant. ``renormalize=False`` evaluates eq. 12 literally with the
full-vocabulary softmax probabilities summed over the top-k tokens only; that partial sum is
not a divergence (it can be negative). Both equal the full KL when ``k ≥ V``. ``k`` is clipped
to the vocabulary size. The paper's best ``k`` is 1000.

``temperature`` divides both logit tensors before the softmax (no ``T²`` factor is applied).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ["kl_top_loss", "kl_top_from_topk", "teacher_topk", "kl_loss", "cross_entropy_loss",
           "get_loss", "Loss", "LOSSES"]


# ---------------------------------------------------------------------------------- helpers
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _check_logits(fn: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 1 or t.shape[-1] == 0:
        raise ValueError(f"{fn}: {name} must have shape [..., V] with V > 0, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{fn}: {name} must be floating point, got {t.dtype}")


def _check_pair(fn: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    _check_logits(fn, "student_logits", student)
    _check_logits(fn, "teacher_logits", teacher)
    if student.shape != teacher.shape:
        raise ValueError(f"{fn}: student_logits {tuple(student.shape)} and teacher_logits "
                         f"{tuple(teacher.shape)} must have the same shape")
    if student.device != teacher.device:
        raise ValueError(f"{fn}: student_logits on {student.device} but teacher_logits on "
                         f"{teacher.device}")


def _check_temperature(fn: str, temperature: float) -> None:
    if not float(temperature) > 0.0:
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature!r}")


def _keep_mask(fn: str, attention_mask: Optional[torch.Tensor], shape: torch.Size,
               device: torch.device) -> Optional[torch.Tensor]:
    """Bool mask of shape ``shape`` (positions to keep), or None for "keep all"."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"{fn}: attention_mask must be a tensor, got "
                         f"{type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"{fn}: attention_mask must have shape {tuple(shape)} (the logits' "
                         f"leading dims), got {tuple(attention_mask.shape)}")
    return attention_mask.to(device) != 0


def _masked_mean(per_pos: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    if keep is None:
        return per_pos.mean() if per_pos.numel() else per_pos.sum()
    kept = per_pos[keep]
    if kept.numel() == 0:
        return (per_pos * 0.0).sum()  # zero, still attached to the graph
    return kept.mean()


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p·(log p − log q) over the last dim; terms with p = 0 contribute 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


# ---------------------------------------------------------------------------------- losses
def kl_top_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 1000,
                temperature: float = 1.0, attention_mask: Optional[torch.Tensor] = None,
                renormalize: bool = True) -> torch.Tensor:
    """KL-Top loss (OSTQuant eq. 12): ``KL(teacher_topk ‖ student_topk)``, mean over positions.

    Args:
        student_logits: quantized model's logits [..., V] (receives the gradient).
        teacher_logits: full-precision logits [..., V] (detached).
        k: number of teacher top tokens per position; clipped to V.
        temperature: both logits are divided by it.
        attention_mask: optional [...] mask of positions to average over.
        renormalize: softmax over the k gathered logits (default) or literal eq. 12 with the
            full-vocabulary probabilities (see module docstring).
    """
    fn = "kl_top_loss"
    _check_pair(fn, student_logits, teacher_logits)
    _check_temperature(fn, temperature)
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"{fn}: k must be a positive integer, got {k!r}")
    keep = _keep_mask(fn, attention_mask, student_logits.shape[:-1], student_logits.device)
    dt = _compute_dtype(student_logits)
    k = min(int(k), student_logits.shape[-1])
    t = teacher_logits.detach().to(dt) / temperature
    s = student_logits.to(dt) / temperature
    idx = torch.topk(t, k, dim=-1, sorted=False).indices
    if renormalize:
        log_p = F.log_softmax(t.gather(-1, idx), dim=-1)
        log_q = F.log_softmax(s.gather(-1, idx), dim=-1)
    else:
        log_p = F.log_softmax(t, dim=-1).gather(-1, idx)
        log_q = F.log_softmax(s, dim=-1).gather(-1, idx)
    return _masked_mean(_kl_rows(log_p, log_q), keep)


def teacher_topk(teacher_logits: torch.Tensor, k: int = 1000, with_lse: bool = False):
    """The teacher's top-``k`` logits per position: ``(values, indices)``, each ``[..., k']``
    with ``k' = min(k, V)``, computed without gradient. ``values`` keep the logits' dtype.

    This is all :func:`kl_top_from_topk` needs, so a trainer can run the teacher once per
    sample and keep ``k'`` values instead of the ``V`` logits. ``with_lse=True`` also returns
    the full-vocabulary ``logsumexp`` per position (float32, ``[...]``), which the literal
    eq. 12 (``renormalize=False``) needs: ``(values, indices, lse)``.
    """
    fn = "teacher_topk"
    _check_logits(fn, "teacher_logits", teacher_logits)
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"{fn}: k must be a positive integer, got {k!r}")
    k = min(int(k), teacher_logits.shape[-1])
    with torch.no_grad():
        top = torch.topk(teacher_logits.detach(), k, dim=-1, sorted=False)
        if with_lse:
            lse = torch.logsumexp(teacher_logits.detach().to(_compute_dtype(teacher_logits)),
                                  dim=-1)
            return top.values, top.indices, lse
    return top.values, top.indices


def kl_top_from_topk(student_logits: torch.Tensor, teacher_topk_values: torch.Tensor,
                     teacher_topk_indices: torch.Tensor, temperature: float = 1.0,
                     attention_mask: Optional[torch.Tensor] = None,
                     teacher_lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL-Top from precomputed teacher top-k logits (see :func:`teacher_topk`).

    Equals ``kl_top_loss(student_logits, teacher_logits, k, temperature, attention_mask,
    renormalize)`` when ``teacher_topk_values/indices`` are the teacher's top-``k`` logits and
    their vocabulary indices (any order): with ``teacher_lse=None`` the renormalised form
    (``renormalize=True``); with ``teacher_lse`` (the teacher's full-vocabulary logsumexp per
    position, of the logits divided by ``temperature``; :func:`teacher_topk` with
    ``with_lse=True`` at temperature 1) the literal eq. 12 (``renormalize=False``). ``values``
    and ``indices`` have shape ``[..., k]`` (the student's leading dims); indices may be any
    integer dtype and must lie in ``[0, V)``; ``teacher_lse`` has the leading shape.
    """
    fn = "kl_top_from_topk"
    _check_logits(fn, "student_logits", student_logits)
    _check_logits(fn, "teacher_topk_values", teacher_topk_values)
    _check_temperature(fn, temperature)
    idx = teacher_topk_indices
    if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.is_complex() or \
            idx.dtype == torch.bool:
        raise ValueError(f"{fn}: teacher_topk_indices must be an integer tensor")
    lead = tuple(student_logits.shape[:-1])
    if tuple(teacher_topk_values.shape[:-1]) != lead or \
            tuple(idx.shape) != tuple(teacher_topk_values.shape):
        raise ValueError(f"{fn}: teacher_topk_values {tuple(teacher_topk_values.shape)} and "
                         f"teacher_topk_indices {tuple(idx.shape)} must both have shape "
                         f"{lead + ('k',)} (the student's leading dims + k)")
    V = student_logits.shape[-1]
    if teacher_topk_values.shape[-1] > V:
        raise ValueError(f"{fn}: k={teacher_topk_values.shape[-1]} exceeds the vocabulary "
                         f"size V={V}")
    keep = _keep_mask(fn, attention_mask, student_logits.shape[:-1], student_logits.device)
    dt = _compute_dtype(student_logits)
    idx = idx.to(device=student_logits.device, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= V):
        raise ValueError(f"{fn}: teacher_topk_indices must lie in [0, {V})")
    t = teacher_topk_values.detach().to(device=student_logits.device, dtype=dt) / temperature
    if teacher_lse is None:
        log_p = F.log_softmax(t, dim=-1)
        log_q = F.log_softmax(student_logits.gather(-1, idx).to(dt) / temperature, dim=-1)
    else:
        if not isinstance(teacher_lse, torch.Tensor) or tuple(teacher_lse.shape) != lead:
            raise ValueError(f"{fn}: teacher_lse must be a tensor of shape {lead} (the "
                             f"student's leading dims), got "
                             f"{getattr(teacher_lse, 'shape', type(teacher_lse).__name__)}")
        lse = teacher_lse.detach().to(device=student_logits.device, dtype=dt)
        log_p = t - lse.unsqueeze(-1)
        log_q = F.log_softmax(student_logits.to(dt) / temperature, dim=-1).gather(-1, idx)
    return _masked_mean(_kl_rows(log_p, log_q), keep)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Full-vocabulary ``KL(teacher ‖ student)``, mean over (kept) positions."""
    fn = "kl_loss"
    _check_pair(fn, student_logits, teacher_logits)
    _check_temperature(fn, temperature)
    keep = _keep_mask(fn, attention_mask, student_logits.shape[:-1], student_logits.device)
    dt = _compute_dtype(student_logits)
    log_p = F.log_softmax(teacher_logits.detach().to(dt) / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.to(dt) / temperature, dim=-1)
    return _masked_mean(_kl_rows(log_p, log_q), keep)


def cross_entropy_loss(student_logits: torch.Tensor, labels: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None, ignore_index: int = -100
                       ) -> torch.Tensor:
    """Next-token cross-entropy: logits at position t predict ``labels`` at t + 1.

    ``student_logits`` [..., S, V], ``labels`` [..., S] (integer token ids). The sequence is
    the second-to-last logits dim. Targets equal to ``ignore_index``, and targets whose
    position has ``attention_mask == 0`` (mask shape [..., S], as in Hugging Face), are left
    out. Returns the mean over the remaining targets.
    """
    fn = "cross_entropy_loss"
    _check_logits(fn, "student_logits", student_logits)
    if student_logits.dim() < 2:
        raise ValueError(f"{fn}: student_logits must have shape [..., S, V], got "
                         f"{tuple(student_logits.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or \
            labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{fn}: labels must be an integer tensor of token ids")
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"{fn}: labels must have shape {tuple(student_logits.shape[:-1])} "
                         f"(the logits' leading dims), got {tuple(labels.shape)}")
    keep = _keep_mask(fn, attention_mask, labels.shape, student_logits.device)
    V = student_logits.shape[-1]
    labels = labels.to(student_logits.device).long()
    tgt = labels[..., 1:]
    valid = tgt != ignore_index
    if keep is not None:
        valid = valid & keep[..., 1:]
    bad = valid & ((tgt < 0) | (tgt >= V))
    if bool(bad.any()):
        raise ValueError(f"{fn}: labels contain token ids outside [0, {V}) "
                         f"(e.g. {int(tgt[bad][0])}) that are not ignore_index={ignore_index}")
    logits = student_logits[..., :-1, :].to(_compute_dtype(student_logits))
    per_tok = F.cross_entropy(logits.reshape(-1, V), torch.where(valid, tgt, 0).reshape(-1),
                              reduction="none").reshape(tgt.shape)
    return _masked_mean(per_tok, valid)


# ---------------------------------------------------------------------------------- registry
LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "kl_top": kl_top_loss,
    "kl": kl_loss,
    "ce": cross_entropy_loss,
}
_ALIASES = {"kltop": "kl_top", "kl_topk": "kl_top", "cross_entropy": "ce", "xent": "ce"}


class Loss:
    """A named loss with a uniform call signature (returned by :func:`get_loss`).

    ``loss(student_logits, teacher_logits=None, labels=None, attention_mask=None)``: the KL
    losses use ``teacher_logits``, ``ce`` uses ``labels``; ``needs_teacher``/``needs_labels``
    say which. Extra keyword arguments given to :func:`get_loss` (e.g. ``k=1000``) are passed
    on to the underlying function.
    """

    def __init__(self, name: str, **kwargs):
        self.name = name
        self.fn = LOSSES[name]
        self.kwargs = kwargs
        self.needs_teacher = name in ("kl_top", "kl")
        self.needs_labels = name == "ce"

    def __call__(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
                 labels: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.needs_teacher:
            if teacher_logits is None:
                raise ValueError(f"loss {self.name!r} needs teacher_logits")
            return self.fn(student_logits, teacher_logits, attention_mask=attention_mask,
                           **self.kwargs)
        if labels is None:
            raise ValueError(f"loss {self.name!r} needs labels")
        return self.fn(student_logits, labels, attention_mask=attention_mask, **self.kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"Loss({self.name!r}{', ' + args if args else ''})"


def get_loss(name: str, **kwargs) -> Loss:
    """The loss called ``name`` ("kl_top", "kl" or "ce"; case and '-' insensitive).

    ``kwargs`` fix the function's options, e.g. ``get_loss("kl_top", k=1000)``.
    """
    key = str(name).lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return Loss(key, **kwargs)
