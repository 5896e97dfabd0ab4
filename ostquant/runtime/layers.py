"""Building blocks of the runtime decoder: RMSNorm, RoPE, projection fusion, the decoder layer.

Every piece computes exactly what the Hugging Face LLaMA-family modules compute (same
operations in the same order and dtype), so a float32 runtime model reproduces the
fake-quantized HF model from :func:`ostquant.calibrate.pipeline.load_quantized`; the
quantized arithmetic itself goes through :class:`~ostquant.nn.QuantLinear` and the
``ostquant`` ops (reference kernels on CPU, CUDA kernels where they exist).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ostquant import ops
from ostquant.nn import QuantLinear

__all__ = ["RMSNorm", "Rotary", "ConcatLinear", "fuse_linears", "DecoderLayer", "rotate_half"]


class RMSNorm(nn.Module):
    """``weight · x / sqrt(mean(x²) + eps)``, normalised in float32 (transformers'
    ``LlamaRMSNorm``)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + self.eps)
        return self.weight * h.to(dtype)


class Rotary(nn.Module):
    """cos/sin tables of rotary position embeddings for given positions.

    ``inv_freq`` (float32, kept float32 under dtype casts) and ``attention_scaling`` come from
    the model's own transformers rotary module, so every static RoPE type transformers knows
    (default, linear, llama3, yarn, ...) gives the same frequencies; dynamic types (which
    change the frequencies with the sequence length) are rejected by the model builder.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0,
                 rope_type: str = "default"):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.detach().float().clone(), persistent=False)
        self.attention_scaling = float(attention_scaling)
        self.rope_type = rope_type

    def _apply(self, fn, recurse=True):
        keep = self.inv_freq
        super()._apply(fn, recurse)
        self._buffers["inv_freq"] = keep.to(self._buffers["inv_freq"].device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [B, S] (integer) -> ``(cos, sin)`` [B, S, head_dim] in ``dtype``."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` [B, S, H, D] with ``cos``/``sin`` [B, S, D] (rotate_half style)."""
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    return (x * cos) + (rotate_half(x) * sin)


# ------------------------------------------------------------------------- projections
class ConcatLinear(nn.Module):
    """Several projections of the same input whose outputs are concatenated (the fallback
    when :func:`fuse_linears` cannot merge them into one matrix)."""

    def __init__(self, mods: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(mods)
        self.out_features = sum(m.out_features for m in mods)

    def forward(self, x):
        return torch.cat([m(x) for m in self.parts], dim=-1)


def _quant_act_key(m: QuantLinear):
    return (m.in_features, m.wbits, m.abits, m.act_sym, m.act_clip_ratio, m.online_hadamard,
            m.qweight.device)


def fuse_linears(mods: Sequence[nn.Module]) -> nn.Module:
    """One projection computing ``cat([m(x) for m in mods], -1)``.

    * all :class:`QuantLinear` with the same input and activation settings: one QuantLinear
      whose packed weights, scales, row sums and biases are the concatenations (the input is
      quantized once; with int4 activations the result is bit-identical to the separate
      GEMMs, the integer sums being exact);
    * all ``nn.Linear`` of one dtype: one ``nn.Linear`` (concatenated weight and bias);
    * otherwise a :class:`ConcatLinear`.

    Only the concatenated tensors are kept afterwards if the caller drops ``mods``.
    """
    mods = list(mods)
    if len(mods) == 1:
        return mods[0]
    if all(isinstance(m, QuantLinear) for m in mods) and \
            len({_quant_act_key(m) for m in mods}) == 1:
        m0 = mods[0]
        has_bias = any(m.bias is not None for m in mods)
        bias_dtype = next((m.bias.dtype for m in mods if m.bias is not None), torch.float32)
        out = sum(m.out_features for m in mods)
        fused = QuantLinear(m0.in_features, out, has_bias, m0.wbits, m0.abits, m0.act_sym,
                            m0.act_clip_ratio, m0.online_hadamard, dtype=bias_dtype,
                            device="meta")
        fused.qweight = torch.cat([m.qweight for m in mods])
        fused.w_scale = torch.cat([m.w_scale for m in mods])
        fused.w_sum = torch.cat([m.w_sum for m in mods])
        if has_bias:
            fused.bias = torch.cat([
                m.bias.to(bias_dtype) if m.bias is not None else
                torch.zeros(m.out_features, dtype=bias_dtype, device=m.qweight.device)
                for m in mods])
        return fused
    if all(type(m) is nn.Linear for m in mods) and \
            len({(m.in_features, m.weight.dtype, m.weight.device) for m in mods}) == 1:
        m0 = mods[0]
        has_bias = any(m.bias is not None for m in mods)
        fused = nn.Linear(m0.in_features, sum(m.out_features for m in mods), bias=has_bias,
                          device="meta", dtype=m0.weight.dtype)
        fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in mods]),
                                    requires_grad=False)
        if has_bias:
            fused.bias = nn.Parameter(torch.cat([
                m.bias.detach() if m.bias is not None else
                torch.zeros(m.out_features, dtype=m0.weight.dtype, device=m0.weight.device)
                for m in mods]), requires_grad=False)
        return fused
    return ConcatLinear(mods)


def check_projection(name: str, m: nn.Module) -> None:
    """The runtime runs ``QuantLinear`` and plain ``nn.Linear`` projections only."""
    if not (isinstance(m, QuantLinear) or type(m) is nn.Linear):
        from ostquant.models.adapters import UnsupportedModelError

        raise UnsupportedModelError(
            f"{name} is a {type(m).__name__}; the runtime needs QuantLinear or nn.Linear "
            f"projections (fuse training transforms first: fuse_transforms + quantize_fused)")


# ------------------------------------------------------------------------- decoder layer
class DecoderLayer(nn.Module):
    """One pre-norm LLaMA decoder layer over a :class:`~ostquant.runtime.KVCache`.

    ``RMSNorm → qkv (one fused projection; per-token int4 activations inside QuantLinear for
    A4, or RMSNorm + quantization as one op: ``fused_norm_quant``) → RoPE → online Q/K
    Hadamard (if the checkpoint has it; for K of an int4 cache fused into the append) → KV
    append (int4 or float) → attention over the cache → o_proj → residual → RMSNorm → gate|up
    (fused; same norm fusion) → SiLU·mul → down_proj (online Hadamard inside QuantLinear when
    flagged; on CUDA one fused Hadamard + quantization kernel) → residual``.
    """

    def __init__(self, index: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 intermediate_size: int, input_norm: RMSNorm, qkv: nn.Module, o_proj: nn.Module,
                 post_norm: RMSNorm, gate_up: nn.Module, down_proj: nn.Module,
                 q_k_hadamard: bool = False):
        super().__init__()
        self.index = index
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.sm_scale = head_dim ** -0.5
        self.q_k_hadamard = bool(q_k_hadamard)
        #: int4 cache: RoPE + Hadamard on K fused into the append (ops.kv_cache_append_fused);
        #: False: RoPE / Hadamard first, then ops.kv_cache_append (same numbers)
        self.fused_kv_append = True
        #: RMSNorm + per-token int4 quantization in one op (ops.rmsnorm_quantize_per_token,
        #: codes in the layout the W4A4 GEMM reads straight into it) for the qkv and gate|up
        #: inputs when those are A4 QuantLinears without an online Hadamard. None (default): on CUDA only. Its
        #: mean square is summed in float64 where the RMSNorm module (= transformers') sums in
        #: float32, so once in a while a code differs from the unfused path by one step; the
        #: CPU default keeps the unfused path, bit-identical to the calibrated model.
        self.fused_norm_quant = None
        self.input_norm = input_norm
        self.qkv = qkv
        self.o_proj = o_proj
        self.post_norm = post_norm
        self.gate_up = gate_up
        self.down_proj = down_proj

    def _hadamard(self, x: torch.Tensor) -> torch.Tensor:
        return ops.hadamard_transform(x, self.head_dim ** -0.5).to(x.dtype)

    def _norm_proj(self, norm: RMSNorm, proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``proj(norm(x))``, through the fused RMSNorm + quantization op when it applies."""
        fused = self.fused_norm_quant if self.fused_norm_quant is not None else x.is_cuda
        if (fused and isinstance(proj, QuantLinear) and proj.abits == 4
                and not proj.online_hadamard and norm.weight.dtype == x.dtype):
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            xq, s, z = ops.rmsnorm_quantize_per_token(
                x2, norm.weight, norm.eps, proj.abits, proj.act_sym, proj.act_clip_ratio,
                packed=not proj.takes_codes(x2))
            return proj.forward_packed(xq, s, z, x.dtype).reshape(*lead, proj.out_features)
        return proj(norm(x))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache,
                fresh: bool) -> torch.Tensor:
        B, S, _ = x.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self._norm_proj(self.input_norm, self.qkv, x)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q = apply_rope(q.view(B, S, hq, d), cos, sin)
        if self.q_k_hadamard:
            q = self._hadamard(q)
        k = k.view(B, S, hkv, d)
        v = v.reshape(B, S, hkv, d)
        if self.fused_kv_append and cache.kv_bits == 4:
            # RoPE + Hadamard on K inside the int4 append (one pass; the attention reads K
            # back from the cache)
            cache.append(self.index, k, v, cos, sin, self.q_k_hadamard)
        else:
            k = apply_rope(k, cos, sin)
            if self.q_k_hadamard:
                k = self._hadamard(k)
            cache.append(self.index, k, v)
        a = cache.attend(self.index, q, self.sm_scale, fresh)
        x = x + self.o_proj(a.reshape(B, S, hq * d))
        gate, up = self._norm_proj(self.post_norm, self.gate_up, x).split(
            [self.intermediate_size] * 2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


def linear_modules(layer: DecoderLayer) -> List[Tuple[str, nn.Module]]:
    """The projections of a layer (for memory accounting)."""
    return [("qkv", layer.qkv), ("o_proj", layer.o_proj), ("gate_up", layer.gate_up),
            ("down_proj", layer.down_proj)]
