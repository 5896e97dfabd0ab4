// Device helpers shared by the int4 GEMM kernels (csrc/gemm/*.cu): warp-level tensor-core MMAs
// (mma.sync, sm_80+), int4 -> int8 / fp16 / bf16 widening in registers, 128-bit loads and the
// fused dequantization epilogue.
//
// The epilogue mirrors reference.int4_gemm operation by operation in float32 with explicitly
// rounded arithmetic (no FMA contraction), so for exact integer sums the W4A4 output is
// bit-identical to the reference:
//   a = float(acc); if (x_zero) a = a - (x_zero[m] * w_sum[n]);
//   y = (a * x_scale[m]) * w_scale[n]; if (bias) y = y + float(bias[n]); out = cast(y)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/mma.cuh"

namespace ostquant {
namespace gemm {

// ------------------------------------------------------------------------------ loads

// 16-byte load through the read-only (non-coherent) path; p must be 16-byte aligned.
__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ uint32_t u4_word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// ------------------------------------------------------------------------------ int4 widening

// Packed word: 8 int4 codes, element 2j in the low nibble of byte j (canonical layout).
// int4_lo8: the four low nibbles (elements 0, 2, 4, 6), each sign-extended to an int8 byte.
// int4_hi8: the four high nibbles (elements 1, 3, 5, 7).
// Sign extension without per-byte shifts: t = nibble in [0, 15]; (t & 8) * 30 = 0xF0 when the
// sign bit is set and 0 otherwise; 0xF0 < 0x100, so the multiply never carries between bytes.
__device__ __forceinline__ uint32_t int4_lo8(uint32_t w) {
  const uint32_t t = w & 0x0F0F0F0Fu;
  return t | ((t & 0x08080808u) * 30u);
}
__device__ __forceinline__ uint32_t int4_hi8(uint32_t w) {
  const uint32_t t = (w >> 4) & 0x0F0F0F0Fu;
  return t | ((t & 0x08080808u) * 30u);
}

// The two codes of byte `b` (0..3) of a packed word as a 16-bit float pair (element 2b in the
// low half, 2b+1 in the high half), exact. Magic-number conversion: with u = code + 8 in [0, 15],
// the fp16 bit pattern 0x6400 | u is 1024 + u and the bf16 pattern 0x4300 | u is 128 + u (both
// exact: u fits the mantissa), so subtracting 1032 / 136 gives the code exactly.
template <typename T>
struct Int4Pair;

template <>
struct Int4Pair<__half> {
  __device__ __forceinline__ static uint32_t get(uint32_t w, int b) {
    const uint32_t u = w ^ 0x88888888u;  // code + 8 in every nibble
    const uint32_t lo = (u >> (8 * b)) & 0xFu;
    const uint32_t hi = (u >> (8 * b + 4)) & 0xFu;
    const uint32_t bits = 0x64006400u | lo | (hi << 16);
    __half2 h = *reinterpret_cast<const __half2*>(&bits);
    h = __hsub2(h, __halves2half2(__ushort_as_half(0x6408), __ushort_as_half(0x6408)));  // 1032
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Int4Pair<__nv_bfloat16> {
  __device__ __forceinline__ static uint32_t get(uint32_t w, int b) {
    const uint32_t u = w ^ 0x88888888u;
    const uint32_t lo = (u >> (8 * b)) & 0xFu;
    const uint32_t hi = (u >> (8 * b + 4)) & 0xFu;
    const uint32_t bits = 0x43004300u | lo | (hi << 16);
    __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&bits);
    const __nv_bfloat16 c = __ushort_as_bfloat16(0x4308);  // 136
    h = __hsub2(h, __halves2bfloat162(c, c));
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// ------------------------------------------------------------------------------ MMAs
// mma_16816<T> (f16/bf16 -> f32) and mma_16832_s8 (s8 -> s32): common/mma.cuh.
using ::ostquant::mma_16816;
using ::ostquant::mma_16832_s8;

// ------------------------------------------------------------------------------ epilogue

__device__ __forceinline__ float load_float(const void* p, FloatType t, int64_t i) {
  switch (t) {
    case FloatType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case FloatType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// float -> T with round-to-nearest-even (torch's cast). Explicit: the extension is compiled with
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ void store_float(void* p, FloatType t, int64_t i, float v) {
  switch (t) {
    case FloatType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case FloatType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

}  // namespace gemm
}  // namespace ostquant
