// Quantization math, mirroring ostquant/ops/reference.py (compute_qparams, quantize_with,
// quantize_kv) operation by operation so results are bit-identical:
//
// * float32 throughout, every op explicitly rounded (fmul_rn/fdiv_rn/... in cuda_utils.cuh) so nvcc can never
//   contract a multiply and an add into an FMA, and division is the IEEE one (no reciprocal);
// * rintf = torch.round (round half to even);
// * max/min/clamp propagate NaN as torch.amax/amin/clamp do;
// * a group whose scale is 0 (zero range, or fp16 underflow for KV) gets scale = 1; a NaN in
//   the group makes its scale and zero NaN (and its codes 0), as in the reference.
//
// Any future fused kernel (quant + Hadamard, KV append) must use these functions, not its own
// copy, so that every path produces the same codes.
#pragma once

#include <cuda_fp16.h>

#include <cmath>

#include "common/cuda_utils.cuh"

namespace ostquant {

struct QParams {
  float scale;
  float zero;
  float qmin;
  float qmax;
};

__host__ __device__ __forceinline__ int qmin_of(int bits) { return -(1 << (bits - 1)); }
__host__ __device__ __forceinline__ int qmax_of(int bits) { return (1 << (bits - 1)) - 1; }

// reference.compute_qparams for one row, given the row's max(x) and min(x) (NaN-propagating).
// `clip` is the clip ratio already rounded to float32 (torch multiplies a float32 tensor by a
// Python float in float32).
__host__ __device__ __forceinline__ QParams compute_qparams(float row_max, float row_min, int bits,
                                                   bool sym, float clip) {
  QParams p;
  p.qmin = static_cast<float>(qmin_of(bits));
  p.qmax = static_cast<float>(qmax_of(bits));
  if (sym) {
    // absmax = amax(|x|) = max(|max x|, |min x|) exactly.
    float absmax = nan_max(fabsf(row_max), fabsf(row_min));
    absmax = fmul_rn(absmax, clip);
    p.scale = fdiv_rn(absmax, p.qmax);
    p.zero = 0.0f;
  } else {
    // hi = amax(x).clamp(min=0) * clip ; lo = amin(x).clamp(max=0) * clip
    const float hi = fmul_rn(row_max != row_max ? row_max : fmaxf(row_max, 0.0f), clip);
    const float lo = fmul_rn(row_min != row_min ? row_min : fminf(row_min, 0.0f), clip);
    p.scale = fdiv_rn(fsub_rn(hi, lo), fsub_rn(p.qmax, p.qmin));
    p.scale = p.scale == 0.0f ? 1.0f : p.scale;
    p.zero = fadd_rn(rintf(fdiv_rn(-lo, p.scale)), p.qmin);
  }
  // A zero range gets scale 1; NaN stays NaN so bad input never becomes valid codes.
  p.scale = p.scale == 0.0f ? 1.0f : p.scale;
  return p;
}

// reference.quantize_kv's parameters: asymmetric 4-bit, scale rounded to float16 before the
// codes (and the zero point) are computed, zero clamped to the code range.
__host__ __device__ __forceinline__ QParams compute_qparams_kv(float row_max, float row_min) {
  constexpr int kBits = 4;
  QParams p = compute_qparams(row_max, row_min, kBits, /*sym=*/false, /*clip=*/1.0f);
  // scale.clamp(max=finfo(float16).max).half().float()
  float s = p.scale != p.scale ? p.scale : fminf(p.scale, 65504.0f);
  s = __half2float(__float2half_rn(s));
  p.scale = s == 0.0f ? 1.0f : s;  // fp16 underflow
  // zero = round(-lo / scale) + qmin, clamped to [qmin, qmax]
  const float lo = row_min != row_min ? row_min : fminf(row_min, 0.0f);
  const float z = fadd_rn(rintf(fdiv_rn(-lo, p.scale)), p.qmin);
  p.zero = clamp_nan(z, p.qmin, p.qmax);
  return p;
}

// reference.quantize_with for one element: clamp(round(x / scale) + zero, qmin, qmax) as an
// int. NaN codes (NaN input or zero point) become 0, what torch's float->int8 cast gives on CUDA.
__host__ __device__ __forceinline__ int quantize_value(float x, const QParams& p) {
  const float c = clamp_nan(fadd_rn(rintf(fdiv_rn(x, p.scale)), p.zero), p.qmin, p.qmax);
  return c != c ? 0 : static_cast<int>(c);  // exact: c is integer-valued in [qmin, qmax]
}

}  // namespace ostquant
