"""``QuantLinear``: a drop-in ``nn.Linear`` with packed int4 weights.

Weights are stored as packed int4 (canonical layout, see :mod:`ostquant.ops.reference`) with a
float32 scale per output channel (symmetric). Activations are either left in floating point
(``abits=16``: weight-only W4A16 GEMM) or quantized per token to 4 bits on the fly
(``abits=4``: W4A4 GEMM with the dequantization fused into the epilogue). An optional online
Hadamard transform rotates the input first; the same rotation is folded into the stored
weight, so the layer computes the same function as the original ``nn.Linear`` up to
quantization error.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ostquant import ops
from ostquant.ops.validate import OpInputError

SUPPORTED_WBITS = (4,)
SUPPORTED_ABITS = (4, 16)


def _hadamard_rows(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Hadamard transform of the last dim."""
    return ops.hadamard_transform(x, x.shape[-1] ** -0.5)


class QuantLinear(nn.Module):
    """Linear layer with int4 weights and optional 4-bit per-token activations.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        wbits: weight bits (4).
        abits: activation bits: 16 (weight-only) or 4.
        act_sym: symmetric activation quantization (default asymmetric, zero point corrected
            in the GEMM epilogue).
        act_clip_ratio: shrink factor in (0, 1] for the activation range.
        online_hadamard: apply an orthonormal Hadamard transform to the input first (the
            weight must have been stored rotated: :meth:`from_linear` does that).
        dtype: dtype of the bias and of the output when the input is float32 (the output
            otherwise follows the input dtype).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, wbits: int = 4,
                 abits: int = 16, act_sym: bool = False, act_clip_ratio: float = 1.0,
                 online_hadamard: bool = False, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        if wbits not in SUPPORTED_WBITS:
            raise ValueError(f"QuantLinear: wbits={wbits} not supported (supported: {SUPPORTED_WBITS})")
        if abits not in SUPPORTED_ABITS:
            raise ValueError(f"QuantLinear: abits={abits} not supported (supported: {SUPPORTED_ABITS})")
        if in_features % ops.GEMM_K_ALIGN:
            raise ValueError(f"QuantLinear: in_features={in_features} is not a multiple of "
                             f"{ops.GEMM_K_ALIGN} (the int4 GEMM's K granularity)")
        if not 0.0 < act_clip_ratio <= 1.0:
            raise ValueError(f"QuantLinear: act_clip_ratio must be in (0, 1], got {act_clip_ratio}")
        self.in_features = in_features
        self.out_features = out_features
        self.wbits = wbits
        self.abits = abits
        self.act_sym = act_sym
        self.act_clip_ratio = act_clip_ratio
        self.online_hadamard = online_hadamard
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2,
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("w_sum", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, wbits: int = 4, abits: int = 16,
                    act_sym: bool = False, act_clip_ratio: float = 1.0,
                    w_clip_search: bool = True, online_hadamard: bool = False) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (RTN, per output channel, symmetric, optional clip search).

        With ``online_hadamard`` the weight is rotated by the same orthonormal Hadamard
        transform the layer applies to its input, so the function is unchanged.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_linear expects nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        qlin = cls(linear.in_features, linear.out_features, linear.bias is not None, wbits, abits,
                   act_sym, act_clip_ratio, online_hadamard, dtype=w.dtype, device=w.device)
        qlin.set_weight(w, clip_search=w_clip_search)
        if linear.bias is not None:
            qlin.bias.copy_(linear.bias.detach())
        return qlin

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor, clip_search: bool = True) -> None:
        """Quantize and store a float weight [out_features, in_features] (rotated if needed)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"QuantLinear.set_weight: weight must have shape "
                             f"{(self.out_features, self.in_features)}, got {tuple(weight.shape)}")
        w = weight.float()
        if self.online_hadamard:
            w = _hadamard_rows(w)
        q, scale, _ = ops.quantize_per_channel(w, self.wbits, True, clip_search)
        self.qweight.copy_(ops.pack_int4(q))
        self.w_scale.copy_(scale)
        self.w_sum.copy_(q.float().sum(dim=-1))

    def _apply(self, fn, recurse=True):
        # Device moves apply to every buffer, but dtype casts (model.half(), .to(bf16)) must not
        # round the float32 scales the GEMMs expect: re-take them at full precision.
        keep = {name: self._buffers[name] for name in ("w_scale", "w_sum")}
        super()._apply(fn, recurse)
        for name, t in keep.items():
            self._buffers[name] = t.to(self._buffers[name].device)
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the layer multiplies by (in the rotated basis if online_hadamard)."""
        return ops.unpack_int4(self.qweight).float() * self.w_scale[:, None]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise OpInputError(f"QuantLinear: input last dim {x.shape[-1]} != in_features "
                               f"{self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        codes = self.takes_codes(x2)  # the GEMM reads int8 codes (Hopper), not packed ones
        if self.online_hadamard and self.abits == 4 and x2.is_cuda:
            # One fused kernel (Hadamard + per-token quantization [+ packing]), bit-identical on
            # CUDA to the unfused kernels below. CPU keeps the unfused reference sequence,
            # whose K×K Hadamard stage is the calibration's (BLAS order).
            xq, s, z = ops.hadamard_quantize_per_token(x2, self.in_features ** -0.5, self.abits,
                                                       self.act_sym, self.act_clip_ratio,
                                                       packed=not codes)
            y = self.forward_packed(xq, s, z, x.dtype)
            return y.reshape(*lead, self.out_features)
        if self.online_hadamard:
            x2 = _hadamard_rows(x2)
        if self.abits == 16:
            y = ops.w4a16_gemm(x2, self.qweight, self.w_scale, self.bias)
        else:  # per-token quantization straight to the GEMM's layout (one kernel on CUDA)
            quantize = ops.quantize_per_token if codes else ops.quantize_per_token_packed
            xq, s, z = quantize(x2, self.abits, self.act_sym, self.act_clip_ratio)
            y = self.forward_packed(xq, s, z, x.dtype)
        return y.reshape(*lead, self.out_features)

    def takes_codes(self, x2: torch.Tensor) -> bool:
        """Whether this A4 layer's GEMM on ``x2`` [M, in_features] (the dtype and device of its
        input) reads int8 activation codes rather than packed ones
        (:func:`ostquant.ops.int4_gemm_takes_codes`: the Hopper kernel), so that the quantizer in
        front of it writes what the GEMM reads. Always False for ``abits != 4`` and off CUDA."""
        return self.abits == 4 and ops.int4_gemm_takes_codes(
            x2.device, x2.shape[0], self.out_features, self.in_features, x2.dtype)

    def forward_packed(self, x_packed: torch.Tensor, x_scale: torch.Tensor,
                       x_zero: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        """The W4A4 GEMM on activations already quantized per token (``abits=4`` layers).

        ``x_packed`` uint8 ``[M, in_features/2]`` (packed int4 codes, in the rotated basis if
        ``online_hadamard``) or int8 ``[M, in_features]`` (the codes one per byte, what
        :meth:`takes_codes` asks for), ``x_scale`` / ``x_zero`` float32 ``[M]`` as
        :func:`ostquant.ops.quantize_per_token` (or a fused quantizer such as
        ``rmsnorm_quantize_per_token``) returns them with this layer's ``act_sym`` /
        ``act_clip_ratio``; ``x_zero`` is ignored for symmetric activations. Returns
        ``[M, out_features]`` in ``out_dtype``.
        """
        if self.abits != 4:
            raise OpInputError(f"QuantLinear.forward_packed: the layer has abits={self.abits}; "
                               f"pre-quantized activations need abits=4")
        return ops.int4_gemm(x_packed, x_scale, None if self.act_sym else x_zero, self.qweight,
                             self.w_scale, self.w_sum, self.bias, out_dtype=out_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, wbits={self.wbits}, abits={self.abits}, "
                f"act_sym={self.act_sym}, act_clip_ratio={self.act_clip_ratio}, "
                f"online_hadamard={self.online_hadamard}")

    def config(self) -> dict:
        """Constructor arguments (for checkpoints)."""
        return dict(in_features=self.in_features, out_features=self.out_features,
                    bias=self.bias is not None, wbits=self.wbits, abits=self.abits,
                    act_sym=self.act_sym, act_clip_ratio=self.act_clip_ratio,
                    online_hadamard=self.online_hadamard)


def default_filter(name: str, module: nn.Module) -> bool:
    """Quantize every Linear except the output head (``lm_head``)."""
    return not name.split(".")[-1] == "lm_head"


def replace_linear(model: nn.Module, filter: Optional[Callable[[str, nn.Module], bool]] = None,
                   progress: bool = False, **from_linear_kwargs) -> nn.Module:
    """Replace (in place) every ``nn.Linear`` accepted by ``filter(name, module)`` with a
    :class:`QuantLinear` built by :meth:`QuantLinear.from_linear` and return the model.

    ``filter`` defaults to :func:`default_filter` (all but ``lm_head``).
    """
    filt = filter or default_filter
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and filt(n, m)]
    it = targets
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(targets, desc="quantizing linears", unit="layer")
    for name, lin in it:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(lin, **from_linear_kwargs))
    return model
