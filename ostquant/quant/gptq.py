"""GPTQ weight quantization (Frantar et al., 2022, arXiv 2210.17323) on the ostquant grid.

For a Linear layer ``y = x Wᵀ`` with calibration inputs X, GPTQ quantizes W column by column
(input channel by input channel) and, after each column, spreads that column's rounding error
over the not-yet-quantized columns so that the layer-output error ``‖X Wᵀ − X Ŵᵀ‖²`` is
minimised (an OBS update with the Hessian ``H = 2·XᵀX``). Implementation notes:

* **Grid.** Scale and zero point are computed once, up front, per output channel from the
  full original row, exactly as :func:`ostquant.ops.quantize_per_channel` does (including
  the clipping-ratio search of :func:`ostquant.ops.reference.search_clip_ratio`), and codes
  are produced by :func:`ostquant.ops.reference.quantize_with`. The returned ``(q, scale,
  zero)`` therefore lie on exactly the RTN grid and can be packed with ``pack_int4`` and
  loaded into :class:`ostquant.nn.QuantLinear` (``qweight``/``w_scale``/``w_sum``). Only the
  codes differ from RTN.
* **Hessian.** :meth:`GPTQ.add_batch` keeps the running mean ``H = (2/n)·Σ xᵢᵀxᵢ`` in float64
  by default (``hessian_dtype``): accumulation over many batches and the Cholesky of an
  ill-conditioned H are where float32 loses accuracy, and the [K, K] matrix is small. The
  column loop itself runs in float32 (``W`` and the inverse-Hessian factor).
* **Dead inputs.** An input channel that was always zero (``H_ii = 0``) gets ``H_ii = 1``: its
  weights are rounded to nearest and, since H has no coupling to it, nothing is propagated.
  (The original GPTQ code also zeroes those weights; we keep them so the layer still behaves
  if the channel is non-zero at inference time.)
* **Damping.** ``percdamp · mean(diag H)`` is added to the diagonal. If the Cholesky
  factorisation still fails the damping is multiplied by 10 (up to 4 retries) before a
  ``RuntimeError`` is raised.
* **act_order.** Columns are processed in order of decreasing ``H_ii`` and the codes are
  permuted back, so the output is in the layer's original column order.
* **Lazy batch updates** over ``block_size`` columns, as in the paper's Algorithm 1.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from ostquant.ops import reference as ref

__all__ = ["GPTQ", "gptq_quantize"]

_MAX_DAMP_RETRIES = 4


class GPTQ:
    """Hessian accumulator and GPTQ quantizer for one Linear weight [out_features, in_features].

    Args:
        layer_weight_shape: ``(out_features, in_features)``, or an ``nn.Linear``/weight tensor
            whose shape is used.
        device: where H lives (default: CPU, or the weight's device when a module/tensor is
            given).
        hessian_dtype: float64 (default) or float32.
    """

    def __init__(self, layer_weight_shape: Union[Sequence[int], torch.Tensor, torch.nn.Module],
                 device: Optional[Union[str, torch.device]] = None,
                 hessian_dtype: torch.dtype = torch.float64):
        if isinstance(layer_weight_shape, torch.nn.Module):
            layer_weight_shape = layer_weight_shape.weight
        if isinstance(layer_weight_shape, torch.Tensor):
            if device is None:
                device = layer_weight_shape.device
            layer_weight_shape = tuple(layer_weight_shape.shape)
        shape = tuple(int(s) for s in layer_weight_shape)
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"GPTQ: layer_weight_shape must be (out_features, in_features) "
                             f"with both > 0, got {shape}")
        if hessian_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"GPTQ: hessian_dtype must be float32 or float64, got {hessian_dtype}")
        self.rows, self.columns = shape
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.H = torch.zeros(self.columns, self.columns, dtype=hessian_dtype, device=self.device)
        self.nsamples = 0

    # ------------------------------------------------------------------ Hessian
    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate calibration inputs ``x`` [..., in_features] (all leading dims are rows).

        Keeps ``H = (2/n)·Σ xᵀx`` over all n rows seen so far (a mean, so its scale does not
        grow with n; GPTQ's result is invariant to the scale of H).
        """
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.columns:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"GPTQ.add_batch: x must have shape [..., {self.columns}] "
                             f"(in_features), got {shape}")
        x = x.detach().reshape(-1, self.columns).to(device=self.device, dtype=self.H.dtype)
        n = x.shape[0]
        if n == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise ValueError("GPTQ.add_batch: x contains NaN or Inf values")
        total = self.nsamples + n
        self.H.mul_(self.nsamples / total)
        self.H.addmm_(x.T, x, alpha=2.0 / total)
        self.nsamples = total

    def free(self) -> None:
        """Drop the Hessian (frees [K, K] memory)."""
        self.H = None

    # ------------------------------------------------------------------ quantization
    def _inverse_hessian_factor(self, H: torch.Tensor, percdamp: float) -> torch.Tensor:
        """Upper Cholesky factor U of ``(H + damp·I)⁻¹`` (``(H+damp)⁻¹ = UᵀU``), float64."""
        K = H.shape[0]
        mean_diag = float(torch.diagonal(H).mean())
        damp = percdamp * mean_diag
        eye = torch.eye(K, dtype=H.dtype, device=H.device)
        last = None
        for _ in range(_MAX_DAMP_RETRIES + 1):
            try:
                L, info = torch.linalg.cholesky_ex(H + damp * eye)
                if int(info) == 0:
                    Hinv = torch.cholesky_inverse(L)
                    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                    if int(info) == 0 and bool(torch.isfinite(U).all()):
                        return U
                last = f"not positive definite (info={int(info)})"
            except RuntimeError as e:  # pragma: no cover - backend-specific failures
                last = str(e)
            damp = 10.0 * damp if damp > 0 else max(mean_diag, 1.0) * 1e-6
        raise RuntimeError(f"GPTQ: Cholesky factorisation of the damped Hessian failed even "
                           f"with damping {damp / 10.0:.3g} ({last}); check the calibration "
                           f"inputs or raise percdamp")

    @torch.no_grad()
    def quantize(self, w: torch.Tensor, bits: int = 4, sym: bool = True, clip_search: bool = True,
                 block_size: int = 128, percdamp: float = 0.01, act_order: bool = False,
                 max_shrink: float = 0.8, grid: int = 100, norm: float = 2.4
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """GPTQ-quantize ``w`` [out_features, in_features] with the accumulated Hessian.

        Returns ``(q, scale, zero)``: int8 codes [N, K] in ``[-2^(bits-1), 2^(bits-1)-1]`` and
        float32 ``scale``/``zero`` [N] with ``w ≈ scale[:, None]·(q − zero[:, None])`` — the same
        convention, and the same ``scale``/``zero``, as ``ops.quantize_per_channel(w, bits,
        sym, clip_search, max_shrink, grid, norm)``. Outputs are on ``w``'s device.
        """
        if self.H is None:
            raise RuntimeError("GPTQ.quantize: the Hessian was freed")
        if self.nsamples == 0:
            raise ValueError("GPTQ.quantize: no calibration data; call add_batch() first")
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (self.rows, self.columns):
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"GPTQ.quantize: w must have shape {(self.rows, self.columns)}, "
                             f"got {shape}")
        if not w.is_floating_point() or not bool(torch.isfinite(w).all()):
            raise ValueError("GPTQ.quantize: w must be a finite floating-point tensor")
        if int(bits) != bits or not 2 <= bits <= 8:
            raise ValueError(f"GPTQ.quantize: bits must be an integer in [2, 8], got {bits!r}")
        if int(block_size) != block_size or block_size < 1:
            raise ValueError(f"GPTQ.quantize: block_size must be a positive integer, got "
                             f"{block_size!r}")
        if not percdamp >= 0.0:
            raise ValueError(f"GPTQ.quantize: percdamp must be >= 0, got {percdamp!r}")

        out_device = w.device
        W = w.detach().to(device=self.device, dtype=torch.float32).clone()
        # Grid: per output channel, from the full original row (= RTN / quantize_per_channel).
        ratio = (ref.search_clip_ratio(W, bits, sym, max_shrink, grid, norm)
                 if clip_search else 1.0)
        scale, zero = ref.compute_qparams(W, bits, sym, ratio)  # [N, 1] each, float32

        H = self.H.to(torch.float64).clone()
        dead = torch.nonzero(torch.diagonal(H) == 0).squeeze(1)
        H[dead, dead] = 1.0

        perm = None
        if act_order:
            perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
            W = W[:, perm]
            H = H[perm][:, perm]

        U = self._inverse_hessian_factor(H, float(percdamp)).to(torch.float32)
        del H

        N, K = W.shape
        Q = torch.empty(N, K, dtype=torch.float32, device=W.device)
        for i1 in range(0, K, int(block_size)):
            i2 = min(i1 + int(block_size), K)
            W1 = W[:, i1:i2].clone()
            U1 = U[i1:i2, i1:i2]
            E1 = torch.empty_like(W1)
            for i in range(i2 - i1):
                col = W1[:, i:i + 1]
                q = ref.quantize_with(col, scale, zero, bits)
                Q[:, i1 + i:i1 + i + 1] = q
                err = (col - ref.dequantize(q, scale, zero)) / U1[i, i]
                W1[:, i:] -= err * U1[i:i + 1, i:]
                E1[:, i:i + 1] = err
            if i2 < K:
                W[:, i2:] -= E1 @ U[i1:i2, i2:]

        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        return (Q.to(torch.int8).to(out_device), scale.squeeze(-1).to(out_device),
                zero.squeeze(-1).to(out_device))


def gptq_quantize(w: torch.Tensor, x: torch.Tensor, **kwargs
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-shot helper: accumulate ``x`` [..., in_features] and GPTQ-quantize ``w``.

    ``kwargs`` go to :meth:`GPTQ.quantize`.
    """
    g = GPTQ(tuple(w.shape), device=w.device)
    g.add_batch(x)
    return g.quantize(w, **kwargs)
