// W4A4 GEMM for small M (decode, M <= 16): packed int4 activations and weights, exact int32
// accumulation on int8 tensor cores (mma.sync m16n8k32 s8: int4 codes sign-extended to int8 in
// registers), then the fused dequantization epilogue (per-token scale and zero point, per-channel
// weight scale, bias, fp16/bf16/fp32 output), bit-identical to reference.int4_gemm.
// Structure and work split: see gemm/small_m.cuh.
//
// Per window, lane (g, t) holds the 16 packed bytes (32 codes, k0 = w·128 + 32t .. k0 + 31) of
// activation rows g and g+8 and of weight row n0 + 8i + g for each of its n-tiles. MMA k-step s
// (0..3) uses packed word s of each: its low nibbles (codes 8s + {0,2,4,6}) widened to int8 fill
// the A/B slots 4t..4t+3, its high nibbles (8s + {1,3,5,7}) the slots 16+4t..16+4t+3.
#include <algorithm>

#include "gemm/small_m.cuh"

namespace ostquant {
namespace {

using namespace gemm;

__global__ void __launch_bounds__(kThreads)
    w4a4_small_m_kernel(const uint8_t* __restrict__ x, const uint8_t* __restrict__ w, int M,
                        int64_t N, int64_t K, int64_t windows_per_split, const GemmEpilogue epi,
                        int32_t* __restrict__ partial) {
  __shared__ int32_t red[kRedElems<kNT, kWarpsN>];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wn = warp % kWarpsN;
  const int wk = warp / kWarpsN;
  const int g = lane >> 2, t = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + wn * (8 * kNT);
  const int64_t split = blockIdx.y;
  const int64_t num_windows = ceil_div<int64_t>(K, kWin);
  const int64_t w_begin = split * windows_per_split;
  const int64_t w_end = min(num_windows, w_begin + windows_per_split);
  const int64_t row_bytes = K / 2;

  const uint8_t* wrow[kNT];
  bool wvalid[kNT];
#pragma unroll
  for (int i = 0; i < kNT; ++i) {
    const int64_t n = n0 + 8 * i + g;
    wvalid[i] = n < N;
    wrow[i] = w + (wvalid[i] ? n : 0) * row_bytes;
  }
  const bool xvalid[2] = {g < M, g + 8 < M};
  const uint8_t* xrow[2] = {x + static_cast<int64_t>(xvalid[0] ? g : 0) * row_bytes,
                            x + static_cast<int64_t>(xvalid[1] ? g + 8 : 0) * row_bytes};

  int32_t acc[kNT][4];
#pragma unroll
  for (int i = 0; i < kNT; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[i][c] = 0;

  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  for (int64_t win = w_begin + wk; win < w_end; win += kWarpsK * kUnroll) {
    uint4 wq[kUnroll][kNT];
    uint4 xa[kUnroll][2];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t wi = win + u * kWarpsK;
      const int64_t k = wi * kWin + 32 * t;
      const bool ok = wi < w_end && k < K;
#pragma unroll
      for (int i = 0; i < kNT; ++i) wq[u][i] = (ok && wvalid[i]) ? ldg16(wrow[i] + k / 2) : zero;
#pragma unroll
      for (int r = 0; r < 2; ++r) xa[u][r] = (ok && xvalid[r]) ? ldg16(xrow[r] + k / 2) : zero;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (win + u * kWarpsK >= w_end) break;  // warp-uniform
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const uint32_t x0 = u4_word(xa[u][0], s), x1 = u4_word(xa[u][1], s);
        const uint32_t a[4] = {int4_lo8(x0), int4_lo8(x1), int4_hi8(x0), int4_hi8(x1)};
#pragma unroll
        for (int i = 0; i < kNT; ++i) {
          const uint32_t ww = u4_word(wq[u][i], s);
          mma_16832_s8(acc[i], a, int4_lo8(ww), int4_hi8(ww));
        }
      }
    }
  }

  reduce_and_store<kNT, kWarpsN>(acc, red, wn, wk, lane, [&](int m, int col, int32_t v) {
    const int64_t n = n0 + col;
    if (m >= M || n >= N) return;
    if (partial != nullptr) {
      partial[(split * M + m) * N + n] = v;
    } else {
      store_float(epi.out, epi.out_type, m * N + n, w4a4_epilogue_value(v, m, n, epi));
    }
  });
}

// Adds the split-K partial slices (exact int32, any order gives the same sum), then the epilogue.
__global__ void w4a4_split_reduce_kernel(const int32_t* __restrict__ partial, int splits,
                                         int64_t MN, int64_t N, const GemmEpilogue epi) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < MN;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int32_t s = partial[i];
    for (int p = 1; p < splits; ++p) s += partial[p * MN + i];
    store_float(epi.out, epi.out_type, i, w4a4_epilogue_value(s, i / N, i % N, epi));
  }
}

}  // namespace

cudaError_t launch_w4a4_small_m(const uint8_t* x, const uint8_t* w, int64_t M, int64_t N,
                                int64_t K, const GemmEpilogue& epi, const SmallMPlan& plan,
                                int32_t* partial, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (M > kSmallMMax || plan.splits < 1 || (plan.splits > 1 && partial == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(N, kRowsPerCta)),
                  static_cast<unsigned>(plan.splits));
  w4a4_small_m_kernel<<<grid, kThreads, 0, stream>>>(x, w, static_cast<int>(M), N, K,
                                                     plan.windows_per_split, epi,
                                                     plan.splits > 1 ? partial : nullptr);
  if (plan.splits > 1) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    const int64_t MN = M * N;
    const unsigned blocks = static_cast<unsigned>(
        std::max<int64_t>(1, std::min<int64_t>(ceil_div<int64_t>(MN, 256), sm_count() * 4)));
    w4a4_split_reduce_kernel<<<blocks, 256, 0, stream>>>(partial, plan.splits, MN, N, epi);
  }
  return cudaGetLastError();
}

}  // namespace ostquant
