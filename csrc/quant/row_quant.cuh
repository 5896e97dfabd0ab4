// Row-wise (per-token) quantization kernel shared by quantize_per_token and quantize_kv.
//
// Layout: x is [rows, K] contiguous. A group of `tpr` threads (blockDim.x, a power of two)
// handles one row; blockDim.y rows share a block. Each thread keeps up to CACHE vectors of VEC
// elements in registers, so x is read from global memory once (rows longer than
// tpr*CACHE*VEC elements re-read the remainder). Row max/min are reduced with warp shuffles and,
// for tpr > 32, through shared memory; every thread then derives the same QParams.
#pragma once

#include "common/cuda_utils.cuh"
#include "common/int4.cuh"
#include "common/quant_math.cuh"
#include "quant/launch.h"

namespace ostquant {

enum class RowQuantMode {
  kPerToken,        // int8 codes [rows, K], float32 scale/zero [rows]
  kKV,              // packed int4 codes [rows, K/2], float16 scale/zero [rows]
  kPerTokenPacked,  // packed int4 codes [rows, K/2], float32 scale/zero [rows] (bits <= 4)
};

constexpr int kRowQuantCache = 4;     // vectors per thread held in registers
constexpr int kRowQuantMinBlock = 256;

// Reduce (max, min) over the tpr threads of a row. All threads of the block must call it.
__device__ __forceinline__ void row_reduce_max_min(float& mx, float& mn) {
  const int tpr = blockDim.x;
  const int width = tpr < 32 ? tpr : 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    if (off < width) {
      mx = nan_max(mx, __shfl_xor_sync(kFullMask, mx, off));
      mn = nan_min(mn, __shfl_xor_sync(kFullMask, mn, off));
    }
  }
  if (tpr > 32) {
    __shared__ float s_max[32];
    __shared__ float s_min[32];
    const int nwarps = tpr >> 5;
    const int base = threadIdx.y * nwarps;
    if ((threadIdx.x & 31) == 0) {
      s_max[base + (threadIdx.x >> 5)] = mx;
      s_min[base + (threadIdx.x >> 5)] = mn;
    }
    __syncthreads();
    mx = s_max[base];
    mn = s_min[base];
    for (int w = 1; w < nwarps; ++w) {
      mx = nan_max(mx, s_max[base + w]);
      mn = nan_min(mn, s_min[base + w]);
    }
    __syncthreads();  // the scratch may be written again by a later call in the same kernel
  }
}

// Sum of a double over the tpr threads of a row, the same value (bit for bit) in every thread:
// xor-butterfly within the warp (both partners add the same two numbers), then the warps'
// partial sums in warp order. All threads of the block must call it.
__device__ __forceinline__ double row_reduce_sum(double v) {
  const int tpr = blockDim.x;
  const int width = tpr < 32 ? tpr : 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    if (off < width) v += __shfl_xor_sync(kFullMask, v, off);
  }
  if (tpr > 32) {
    __shared__ double s_sum[32];
    const int nwarps = tpr >> 5;
    const int base = threadIdx.y * nwarps;
    if ((threadIdx.x & 31) == 0) s_sum[base + (threadIdx.x >> 5)] = v;
    __syncthreads();
    v = s_sum[base];
    for (int w = 1; w < nwarps; ++w) v += s_sum[base + w];
    __syncthreads();  // the scratch may be written again by a later call in the same kernel
  }
  return v;
}

template <typename T, int VEC>
__device__ __forceinline__ void update_max_min(const Vec<T, VEC>& v, float& mx, float& mn) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float f = to_float(v.v[j]);
    mx = nan_max(mx, f);
    mn = nan_min(mn, f);
  }
}

template <RowQuantMode MODE, typename T, int VEC>
__device__ __forceinline__ void quantize_store(const Vec<T, VEC>& v, const QParams& p,
                                               void* q_row, int64_t vec_idx) {
  if constexpr (MODE == RowQuantMode::kPerToken) {
    Vec<int8_t, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<int8_t>(quantize_value(to_float(v.v[j]), p));
    store_vec<int8_t, VEC>(static_cast<int8_t*>(q_row) + vec_idx * VEC, out);
  } else {
    static_assert(VEC % 2 == 0, "kKV / kPerTokenPacked pack pairs");
    Vec<uint8_t, VEC / 2> out;
#pragma unroll
    for (int j = 0; j < VEC / 2; ++j) {
      out.v[j] = pack_int4_pair(quantize_value(to_float(v.v[2 * j]), p),
                                quantize_value(to_float(v.v[2 * j + 1]), p));
    }
    store_vec<uint8_t, VEC / 2>(static_cast<uint8_t*>(q_row) + vec_idx * (VEC / 2), out);
  }
}

template <RowQuantMode MODE, typename T, int VEC, int CACHE>
__global__ void __launch_bounds__(1024) row_quant_kernel(const T* __restrict__ x,
                                                         RowQuantArgs a) {
  const int tpr = blockDim.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < a.rows;
  const int64_t nvec = a.K / VEC;
  const T* xr = x + (valid ? row : 0) * a.K;

  Vec<T, VEC> cache[CACHE];
  float mx = -INFINITY, mn = INFINITY;
  if (valid) {
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int64_t vi = threadIdx.x + static_cast<int64_t>(i) * tpr;
      if (vi < nvec) {
        cache[i] = load_vec<T, VEC>(xr + vi * VEC);
        update_max_min(cache[i], mx, mn);
      }
    }
    for (int64_t vi = threadIdx.x + static_cast<int64_t>(CACHE) * tpr; vi < nvec; vi += tpr) {
      update_max_min(load_vec<T, VEC>(xr + vi * VEC), mx, mn);
    }
  }
  row_reduce_max_min(mx, mn);
  if (!valid) return;  // no block-wide sync below this point

  QParams p;
  void* q_row;
  if constexpr (MODE == RowQuantMode::kPerToken || MODE == RowQuantMode::kPerTokenPacked) {
    p = compute_qparams(mx, mn, a.bits, a.sym, a.clip);
    if constexpr (MODE == RowQuantMode::kPerToken) {
      q_row = static_cast<int8_t*>(a.q) + row * a.K;
    } else {
      q_row = static_cast<uint8_t*>(a.q) + row * (a.K / 2);
    }
    if (threadIdx.x == 0) {
      static_cast<float*>(a.scale)[row] = p.scale;
      static_cast<float*>(a.zero)[row] = p.zero;
    }
  } else {
    p = compute_qparams_kv(mx, mn);
    q_row = static_cast<uint8_t*>(a.q) + row * (a.K / 2);
    if (threadIdx.x == 0) {
      static_cast<__half*>(a.scale)[row] = __float2half_rn(p.scale);
      static_cast<__half*>(a.zero)[row] = __float2half_rn(p.zero);
    }
  }

#pragma unroll
  for (int i = 0; i < CACHE; ++i) {
    const int64_t vi = threadIdx.x + static_cast<int64_t>(i) * tpr;
    if (vi < nvec) quantize_store<MODE, T, VEC>(cache[i], p, q_row, vi);
  }
  for (int64_t vi = threadIdx.x + static_cast<int64_t>(CACHE) * tpr; vi < nvec; vi += tpr) {
    quantize_store<MODE, T, VEC>(load_vec<T, VEC>(xr + vi * VEC), p, q_row, vi);
  }
}

// Launch on `stream`. Requires K % VEC == 0 and x aligned to VEC elements.
template <RowQuantMode MODE, typename T, int VEC>
cudaError_t launch_row_quant(const T* x, const RowQuantArgs& a, cudaStream_t stream) {
  constexpr int CACHE = kRowQuantCache;
  if (a.rows <= 0 || a.K <= 0) return cudaSuccess;
  const int64_t nvec = a.K / VEC;
  const int64_t want = ceil_div<int64_t>(nvec, CACHE);
  int tpr = 8;
  while (tpr < want && tpr < 1024) tpr *= 2;
  const int rows_per_block = tpr >= kRowQuantMinBlock ? 1 : kRowQuantMinBlock / tpr;
  const int64_t blocks = ceil_div<int64_t>(a.rows, rows_per_block);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 block(tpr, rows_per_block);
  row_quant_kernel<MODE, T, VEC, CACHE><<<static_cast<unsigned>(blocks), block, 0, stream>>>(x, a);
  return cudaGetLastError();
}

}  // namespace ostquant
