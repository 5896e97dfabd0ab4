"""Input checks shared by the public op wrappers and the reference kernels.

Every check raises :class:`OpInputError` (a ``ValueError``) whose message names the op and the
argument, so a user sees *what* is wrong instead of a crash deep inside a kernel.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class OpInputError(ValueError):
    """Raised when an ostquant op receives an argument it cannot handle."""


def fail(op: str, msg: str) -> None:
    raise OpInputError(f"ostquant.{op}: {msg}")


def check_tensor(op: str, name: str, t, dtypes: Optional[Iterable[torch.dtype]] = None,
                 ndim: Optional[int] = None, min_ndim: Optional[int] = None,
                 contiguous: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            fail(op, f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        fail(op, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        fail(op, f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        fail(op, f"{name} must be contiguous (call .contiguous() first)")


def check_same_device(op: str, **tensors) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len({str(d) for d in devs.values()}) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        fail(op, f"all tensors must be on one device, got {desc}")


def check_shape(op: str, name: str, t: torch.Tensor, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        fail(op, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_bits(op: str, bits: int, allowed=(2, 3, 4, 8)) -> None:
    if bits not in allowed:
        fail(op, f"bits must be one of {allowed}, got {bits}")


def check_nonempty(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        fail(op, f"{name} is empty (shape {tuple(t.shape)}); nothing to compute")


def check_finite(op: str, name: str, t: torch.Tensor) -> None:
    """Raise if ``t`` has NaN/Inf. Synchronizes on CUDA: use on offline paths only."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        fail(op, f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")
