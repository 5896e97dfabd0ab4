// ATen-free launchers of the int4 GEMM kernels (csrc/gemm/*.cu), called by gemm_ops.cpp.
//
// Pointers are device pointers of contiguous tensors. Every launcher enqueues on `stream` and
// returns cudaGetLastError() (cudaSuccess if there was nothing to do). Packed int4 operands
// (uint8, canonical layout: element 2j in the low nibble of byte j) and 16-bit activations must
// be 16-byte aligned; K is a multiple of 32 (checks.GEMM_K_ALIGN), so every row is too.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dispatch.h"

namespace ostquant {

// The fused dequantization epilogue, y[m, n] = cast(((acc − zx[m]·ws[n])·sx[m])·sw[n] + b[n]).
// W4A16 uses only w_scale, bias and out (y = acc·sw[n] + b[n]).
struct GemmEpilogue {
  const float* x_scale = nullptr;  // [M] (W4A4 only)
  const float* x_zero = nullptr;   // [M] or null (symmetric activations)
  const float* w_scale = nullptr;  // [N]
  const float* w_sum = nullptr;    // [N], Σ_k q_w[n, k]; required when x_zero is set
  const void* bias = nullptr;      // [N] or null
  FloatType bias_type = FloatType::kFloat32;
  void* out = nullptr;             // [M, N], row-major, contiguous
  FloatType out_type = FloatType::kBFloat16;
};

// One large-M GEMM call for the CUTLASS paths (sm90/, sm80/): out[M, N] = epi(x · wᵀ).
//   x: the activations as that path takes them (see its launch.h); w: packed int4 [N, K/2],
//   canonical layout. Row-major, contiguous, 16-byte aligned. epi.bias, if set, is float32;
//   x_zero and w_sum are both set or both null.
struct CutlassGemmProblem {
  const void* x = nullptr;
  const uint8_t* w = nullptr;
  int64_t M = 0, N = 0, K = 0;
  GemmEpilogue epi;
  int device = 0;
  int sm_count = 132;
  int tile = 0;  // Hopper path: tokens per CTA tile (64 or 128), chosen once per call; 0: by M
};

// ---------------------------------------------------------------- small M (decode) kernels

// Largest M the small-M kernels take (one 16-row MMA tile). Larger M goes to the portable
// large-M path in gemm_ops.cpp.
constexpr int64_t kSmallMMax = 16;

// How a small-M GEMM splits K across CTAs. splits > 1 needs a workspace of
// splits·M·N partial sums (float32 for W4A16, int32 for W4A4) and a second reduce kernel.
struct SmallMPlan {
  int splits = 1;
  int64_t windows_per_split = 0;  // 128-element K windows per split
};
SmallMPlan plan_small_m(int64_t N, int64_t K);

// W4A16, M <= 16: x [M, K] (fp16/bf16), w [N, K/2] packed int4 -> epi.out [M, N] in x's type.
// `partial` (float32 [plan.splits, M, N]) is required when plan.splits > 1.
cudaError_t launch_w4a16_small_m(FloatType type, const void* x, const uint8_t* w, int64_t M,
                                 int64_t N, int64_t K, const GemmEpilogue& epi,
                                 const SmallMPlan& plan, float* partial, cudaStream_t stream);

// W4A4, M <= 16: x [M, K/2], w [N, K/2] packed int4 -> epi.out [M, N] (exact int32 sums).
// `partial` (int32 [plan.splits, M, N]) is required when plan.splits > 1.
cudaError_t launch_w4a4_small_m(const uint8_t* x, const uint8_t* w, int64_t M, int64_t N,
                                int64_t K, const GemmEpilogue& epi, const SmallMPlan& plan,
                                int32_t* partial, cudaStream_t stream);

// ---------------------------------------------------------------- helpers of the large-M path

// w_sum[n] = Σ_k q_w[n, k] as float32 (exact): w [N, K/2] packed int4.
cudaError_t launch_int4_row_sum(const uint8_t* w, int64_t N, int64_t K, float* w_sum,
                                cudaStream_t stream);

// out[n, k] = q_w[n, k] as `type` (exact, no scale): w [N, K/2] -> out [N, K].
cudaError_t launch_int4_to_float(FloatType type, const uint8_t* w, int64_t N, int64_t K,
                                 void* out, cudaStream_t stream);

// W4A4 epilogue over an int32 accumulator acc [M, ld] (columns [0, N) used).
cudaError_t launch_w4a4_epilogue(const int32_t* acc, int64_t ld, int64_t M, int64_t N,
                                 const GemmEpilogue& epi, cudaStream_t stream);

// W4A16 epilogue over a float32 accumulator acc [M, N]: y = acc·w_scale[n] + bias[n].
cudaError_t launch_w4a16_epilogue(const float* acc, int64_t M, int64_t N,
                                  const GemmEpilogue& epi, cudaStream_t stream);

}  // namespace ostquant
