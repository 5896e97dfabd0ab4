// Helpers of the int4 GEMMs: the small-M split-K plan, weight row sums, int4 -> float widening
// and the elementwise epilogues of the portable large-M path (gemm_ops.cpp).
#include <algorithm>

#include "common/cuda_utils.cuh"
#include "gemm/gemm_common.cuh"
#include "gemm/launch.h"
#include "gemm/small_m.cuh"

namespace ostquant {
namespace {

using namespace gemm;

unsigned grid_1d(int64_t items, int threads) {
  const int64_t blocks = std::min<int64_t>(ceil_div<int64_t>(items, threads),
                                           static_cast<int64_t>(sm_count()) * 8);
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

// One warp per weight row: Σ of its int4 codes (int8 widening + dp4a with ones), exact.
__global__ void int4_row_sum_kernel(const uint8_t* __restrict__ w, int64_t N, int64_t row_bytes,
                                    float* __restrict__ w_sum) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
       n < N; n += warps) {
    const uint8_t* row = w + n * row_bytes;
    int s = 0;
    for (int64_t b = 16 * lane; b < row_bytes; b += 16 * 32) {  // row_bytes % 16 == 0
      const uint4 v = ldg16(row + b);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t word = u4_word(v, i);
        s = __dp4a(static_cast<int>(int4_lo8(word)), 0x01010101, s);
        s = __dp4a(static_cast<int>(int4_hi8(word)), 0x01010101, s);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFullMask, s, o);
    if (lane == 0) w_sum[n] = static_cast<float>(s);
  }
}

// Flat: 16 packed bytes (32 codes) per item -> 32 values of T, exact.
template <typename T>
__global__ void int4_to_float_kernel(const uint8_t* __restrict__ w, int64_t chunks,
                                     T* __restrict__ out) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 v = ldg16(w + 16 * c);
    T* o = out + 32 * c;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t word = u4_word(v, i);
      Vec<T, 8> r;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint8_t byte = static_cast<uint8_t>(word >> (8 * j));
        // element 2j in the low nibble, 2j+1 in the high nibble (values in [-8, 7]: exact)
        r.v[2 * j] = from_float<T>(static_cast<float>(static_cast<int8_t>(byte << 4) >> 4));
        r.v[2 * j + 1] = from_float<T>(static_cast<float>(static_cast<int8_t>(byte) >> 4));
      }
      store_vec<T, 8>(o + 8 * i, r);
    }
  }
}

__global__ void w4a4_epilogue_kernel(const int32_t* __restrict__ acc, int64_t ld, int64_t M,
                                     int64_t N, const GemmEpilogue epi) {
  const int64_t MN = M * N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < MN;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / N, n = i - m * N;
    store_float(epi.out, epi.out_type, i, w4a4_epilogue_value(acc[m * ld + n], m, n, epi));
  }
}

__global__ void w4a16_epilogue_kernel(const float* __restrict__ acc, int64_t MN, int64_t N,
                                      const GemmEpilogue epi) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < MN;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    store_float(epi.out, epi.out_type, i, w4a16_epilogue_value(acc[i], i % N, epi));
  }
}

}  // namespace

SmallMPlan plan_small_m(int64_t N, int64_t K) {
  SmallMPlan p;
  const int64_t windows = ceil_div<int64_t>(K, kWin);
  if (windows == 0) return p;  // K = 0: one split, no windows, the epilogue of zero sums
  const int64_t ctas = ceil_div<int64_t>(N, kRowsPerCta);
  const int64_t target = 2 * static_cast<int64_t>(sm_count());  // about two CTAs per SM
  int64_t splits = 1;
  if (ctas < target) {
    splits = ceil_div<int64_t>(target, ctas);
    // Keep at least kUnroll windows per warp in every split (long enough loads in flight).
    splits = std::min<int64_t>(splits, std::max<int64_t>(1, windows / (kWarpsK * kUnroll)));
    splits = std::min<int64_t>(splits, 65535);
  }
  p.windows_per_split = ceil_div<int64_t>(windows, splits);
  p.splits = static_cast<int>(ceil_div<int64_t>(windows, p.windows_per_split));  // none empty
  return p;
}

cudaError_t launch_int4_row_sum(const uint8_t* w, int64_t N, int64_t K, float* w_sum,
                                cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  constexpr int kThreadsRS = 256;
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>(ceil_div<int64_t>(N, kThreadsRS / 32), 65535)));
  int4_row_sum_kernel<<<blocks, kThreadsRS, 0, stream>>>(w, N, K / 2, w_sum);
  return cudaGetLastError();
}

cudaError_t launch_int4_to_float(FloatType type, const uint8_t* w, int64_t N, int64_t K,
                                 void* out, cudaStream_t stream) {
  const int64_t chunks = N * K / 32;  // K % 32 == 0
  if (chunks <= 0) return cudaSuccess;
  return OSTQ_DISPATCH_FLOAT(type, [&] {
    int4_to_float_kernel<scalar_t><<<grid_1d(chunks, 256), 256, 0, stream>>>(
        w, chunks, static_cast<scalar_t*>(out));
    return cudaGetLastError();
  });
}

cudaError_t launch_w4a4_epilogue(const int32_t* acc, int64_t ld, int64_t M, int64_t N,
                                 const GemmEpilogue& epi, cudaStream_t stream) {
  if (M * N <= 0) return cudaSuccess;
  w4a4_epilogue_kernel<<<grid_1d(M * N, 256), 256, 0, stream>>>(acc, ld, M, N, epi);
  return cudaGetLastError();
}

cudaError_t launch_w4a16_epilogue(const float* acc, int64_t M, int64_t N, const GemmEpilogue& epi,
                                  cudaStream_t stream) {
  if (M * N <= 0) return cudaSuccess;
  w4a16_epilogue_kernel<<<grid_1d(M * N, 256), 256, 0, stream>>>(acc, M * N, N, epi);
  return cudaGetLastError();
}

}  // namespace ostquant
