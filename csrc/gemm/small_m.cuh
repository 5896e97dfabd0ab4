// Shared structure of the small-M (decode, M <= 16) int4 GEMM kernels (w4a16_small_m.cu,
// w4a4_small_m.cu).
//
// Both are bandwidth-bound on the packed int4 weights: every weight byte is read exactly once,
// with 128-bit loads, and goes straight from registers into warp-level tensor-core MMAs
// (mma.sync m16n8k16 bf16/fp16 -> fp32 for W4A16, m16n8k32 s8 -> exact s32 for W4A4). The M <= 16
// activation rows form the MMA's A tile (rows >= M are zeros and never loaded); the weight rows
// are B's columns, 8 per n-tile.
//
// Work decomposition (one CTA = kWarpsN x kWarpsK warps):
//  * K is cut into 128-element windows; lane (g = lane/4, t = lane%4) of a warp owns the 32
//    consecutive k of window w starting at w·128 + 32t: one 16-byte load per weight row
//    (and, for W4A16, 64 bytes per activation row; for W4A4, 16 bytes).
//  * a warp owns kNT n-tiles (8·kNT weight rows), re-using its activation registers for all of
//    them; the kWarpsN warps of a CTA own consecutive n-tiles (kRowsPerCta rows per CTA). The
//    W4A16 kernel has one warp per warp row, with kRowsPerCta / 8 n-tiles, and stages its
//    activations through shared memory (w4a16_small_m.cu);
//  * the kWarpsK warps of a CTA stride over the windows of the CTA's K range (intra-CTA split-K)
//    and add their partial sums through shared memory in a fixed order;
//  * when N / kRowsPerCta CTAs would not fill the GPU, K is also split across CTAs
//    (grid.y = plan.splits): each split writes a partial [M, N] slice and a second kernel adds
//    the slices in split order and applies the epilogue. Both reductions are deterministic.
// K tails (K % 128 != 0, K % 32 == 0) are whole 32-element lane chunks, zero-filled.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "gemm/gemm_common.cuh"
#include "gemm/launch.h"

namespace ostquant {
namespace gemm {

constexpr int kWin = 128;     // K elements of one window (4 lanes x 32)
constexpr int kNT = 2;        // 8-row n-tiles per warp
constexpr int kWarpsN = 2;    // warps along N per CTA
constexpr int kWarpsK = 4;    // warps along K per CTA (intra-CTA split-K)
constexpr int kUnroll = 2;    // windows in flight per warp
constexpr int kThreads = 32 * kWarpsN * kWarpsK;
constexpr int kRowsPerCta = 8 * kNT * kWarpsN;

// Fused W4A4 epilogue value for one output element (mirrors reference.int4_gemm exactly).
__device__ __forceinline__ float w4a4_epilogue_value(int32_t acc, int64_t m, int64_t n,
                                                     const GemmEpilogue& e) {
  float a = __int2float_rn(acc);
  if (e.x_zero != nullptr) a = fsub_rn(a, fmul_rn(e.x_zero[m], e.w_sum[n]));
  float y = fmul_rn(fmul_rn(a, e.x_scale[m]), e.w_scale[n]);
  if (e.bias != nullptr) y = fadd_rn(y, load_float(e.bias, e.bias_type, n));
  return y;
}

// W4A16 epilogue value: acc·w_scale[n] + bias[n].
__device__ __forceinline__ float w4a16_epilogue_value(float acc, int64_t n,
                                                      const GemmEpilogue& e) {
  float y = fmul_rn(acc, e.w_scale[n]);
  if (e.bias != nullptr) y = fadd_rn(y, load_float(e.bias, e.bias_type, n));
  return y;
}

// Shared memory reduce_and_store needs for NT n-tiles per warp and WN warps along N.
template <int NT, int WN>
constexpr int kRedElems = (kWarpsK > 1 ? kWarpsK - 1 : 1) * WN * NT * 4 * 32;

// After the main loop: add the kWarpsK warps' accumulators (fixed order) through shared memory,
// then warp row wk == 0 writes either the final output (splits == 1) or its split's partial
// slice. Acc is float (W4A16) or int32_t (W4A4); a warp holds NT n-tiles, WN warps share a warp
// row (W4A4: kNT, kWarpsN; W4A16: see w4a16_small_m.cu). Must be reached by every thread.
template <int NT, int WN, typename Acc, typename Store>
__device__ __forceinline__ void reduce_and_store(Acc (&acc)[NT][4], Acc* red, int wn, int wk,
                                                 int lane, Store&& store) {
  if constexpr (kWarpsK > 1) {
    // red: [kWarpsK - 1][WN][NT * 4][32]
    if (wk > 0) {
#pragma unroll
      for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          red[(((wk - 1) * WN + wn) * NT * 4 + i * 4 + c) * 32 + lane] = acc[i][c];
    }
    __syncthreads();
    if (wk != 0) return;
#pragma unroll 1
    for (int s = 0; s < kWarpsK - 1; ++s) {
#pragma unroll
      for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          acc[i][c] += red[((s * WN + wn) * NT * 4 + i * 4 + c) * 32 + lane];
    }
  }
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) store(g + 8 * (c >> 1), 8 * i + 2 * t + (c & 1), acc[i][c]);
}

}  // namespace gemm
}  // namespace ostquant
