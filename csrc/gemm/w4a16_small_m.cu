// W4A16 GEMM for small M (decode, M <= 16): y = x · (q_w·s_w)ᵀ + b with fp16/bf16 activations,
// packed int4 weights, fp32 accumulation on tensor cores (mma.sync m16n8k16), output in x's type.
// Structure and work split: see gemm/small_m.cuh, with one W4A16 difference: a warp covers all
// kRowsPerCta rows of its CTA (kNT16 n-tiles, one warp per warp row), so each window of x is read
// once per CTA.
//
// Per window, lane (g, t) holds x[g][k0 .. k0+31] and x[g+8][k0 .. k0+31] (k0 = w·128 + 32t) as
// 16 packed pairs per row, and for each of its n-tiles the 16 weight bytes of row n0 + 8i + g
// covering the same 32 k. MMA k-step j (0..7) takes the 4 codes of weight bytes 2j, 2j+1
// (k0 + 4j .. k0 + 4j + 3) as B slots {2t, 2t+1} and {2t+8, 2t+9}, and activation pairs 2j, 2j+1
// of rows g / g+8 as the matching A slots. The weight codes are widened to fp16/bf16 exactly
// (gemm_common.cuh: Int4Pair); the per-channel scale is applied in the epilogue.
//
// x goes through shared memory: read straight into that layout, each lane's 64 bytes of a row
// would be four 16-byte loads 64 bytes apart across the lanes (half of every sector they touch,
// 16 cache lines per request at M = 16 — eight times the weights' L1 sectors, the memory profile
// of tests/simt). Instead the warp loads the M × 128 window coalesced (consecutive lanes,
// consecutive 16-byte chunks), stores it to its own buffer and reads its fragments back with
// 16-byte shared loads, swizzled (xchunk) so that neither side has bank conflicts.
#include <algorithm>

#include "gemm/small_m.cuh"

namespace ostquant {
namespace {

using namespace gemm;

constexpr int kNT16 = kRowsPerCta / 8;                   // n-tiles per warp: the CTA's rows
constexpr int kWarpsN16 = 1;
constexpr int kThreads16 = 32 * kWarpsN16 * kWarpsK;
constexpr int kXChunksPerRow = kWin / 8;                 // 16-byte chunks of a window row
constexpr int kXChunks = kSmallMMax * kXChunksPerRow / 32;  // per lane per window (M = 16)

// Buffer position of 16-byte chunk c (0..15) of window row r. Fragment reads: the 8 lanes of a
// quarter warp (g, t) read chunk 4t + q (q fixed) of rows g and g + 1 — eight distinct 16-byte
// bank groups with this XOR (rows are 256 bytes, so only the chunk index picks the group);
// coalesced writes: 8 consecutive chunks of one row, a permutation of the groups.
__device__ __forceinline__ int xchunk(int r, int c) { return c ^ ((c >> 3) << 1) ^ (r & 1); }

template <typename T>
__global__ void __launch_bounds__(kThreads16)
    w4a16_small_m_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, int M, int64_t N,
                         int64_t K, int64_t windows_per_split, const GemmEpilogue epi,
                         float* __restrict__ partial) {
  __shared__ float red[kRedElems<kNT16, kWarpsN16>];
  __shared__ uint4 xs[kWarpsK][kUnroll][kSmallMMax][kXChunksPerRow];
  const int lane = threadIdx.x & 31;
  const int wk = threadIdx.x >> 5;  // kWarpsN16 == 1
  const int g = lane >> 2, t = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRowsPerCta;
  const int64_t split = blockIdx.y;
  const int64_t num_windows = ceil_div<int64_t>(K, kWin);
  const int64_t w_begin = split * windows_per_split;
  const int64_t w_end = min(num_windows, w_begin + windows_per_split);
  const int64_t row_bytes = K / 2;
  uint4 (*const buf)[kSmallMMax][kXChunksPerRow] = xs[wk];

  const uint8_t* wrow[kNT16];
  bool wvalid[kNT16];
#pragma unroll
  for (int i = 0; i < kNT16; ++i) {
    const int64_t n = n0 + 8 * i + g;
    wvalid[i] = n < N;
    wrow[i] = w + (wvalid[i] ? n : 0) * row_bytes;
  }
  const bool xvalid[2] = {g < M, g + 8 < M};

  float acc[kNT16][4];
#pragma unroll
  for (int i = 0; i < kNT16; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[i][c] = 0.f;

  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  for (int64_t win = w_begin + wk; win < w_end; win += kWarpsK * kUnroll) {
    uint4 wq[kUnroll][kNT16];
    uint4 xc[kUnroll][kXChunks];  // chunk lane + 32p of the window: row 2p + lane/16
    // Issue every global load of kUnroll windows first.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t wi = win + u * kWarpsK;
      const int64_t k = wi * kWin + 32 * t;
      const bool ok = wi < w_end && k < K;
#pragma unroll
      for (int i = 0; i < kNT16; ++i) wq[u][i] = (ok && wvalid[i]) ? ldg16(wrow[i] + k / 2) : zero;
#pragma unroll
      for (int p = 0; p < kXChunks; ++p) {
        if (2 * p >= M) break;  // warp-uniform: rows 2p, 2p+1 and beyond are not there
        const int r = 2 * p + (lane >> 4);
        const int64_t kk = wi * kWin + 8 * (lane & 15);
        xc[u][p] = (wi < w_end && r < M && kk < K) ? ldg16(x + r * K + kk) : zero;
      }
    }
    __syncwarp();  // every lane is done reading the previous windows from buf
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int p = 0; p < kXChunks; ++p) {
        if (2 * p >= M) break;
        const int r = 2 * p + (lane >> 4);
        if (r < M) buf[u][r][xchunk(r, lane & 15)] = xc[u][p];  // rows >= M are never read
      }
    __syncwarp();
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t wi = win + u * kWarpsK;
      if (wi >= w_end) break;  // warp-uniform
      const bool ok = wi * kWin + 32 * t < K;
      uint4 xa[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int q = 0; q < 4; ++q)
          xa[h][q] = (ok && xvalid[h]) ? buf[u][g + 8 * h][xchunk(g + 8 * h, 4 * t + q)] : zero;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        uint32_t a[4];
        a[0] = u4_word(xa[0][j >> 1], 2 * (j & 1));      // x[g][4j, 4j+1]
        a[2] = u4_word(xa[0][j >> 1], 2 * (j & 1) + 1);  // x[g][4j+2, 4j+3]
        a[1] = u4_word(xa[1][j >> 1], 2 * (j & 1));      // row g+8
        a[3] = u4_word(xa[1][j >> 1], 2 * (j & 1) + 1);
#pragma unroll
        for (int i = 0; i < kNT16; ++i) {
          const uint32_t ww = u4_word(wq[u][i], j >> 1);  // bytes 4(j/2) .. 4(j/2)+3
          const int b = 2 * (j & 1);                     // byte 2j of the chunk
          mma_16816<T>(acc[i], a, Int4Pair<T>::get(ww, b), Int4Pair<T>::get(ww, b + 1));
        }
      }
    }
  }

  reduce_and_store<kNT16, kWarpsN16>(acc, red, 0, wk, lane, [&](int m, int col, float v) {
    const int64_t n = n0 + col;
    if (m >= M || n >= N) return;
    if (partial != nullptr) {
      partial[(split * M + m) * N + n] = v;
    } else {
      store_float(epi.out, epi.out_type, m * N + n, w4a16_epilogue_value(v, n, epi));
    }
  });
}

// Adds the split-K partial slices in split order, then the epilogue.
__global__ void w4a16_split_reduce_kernel(const float* __restrict__ partial, int splits,
                                          int64_t MN, int64_t N, const GemmEpilogue epi) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < MN;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = partial[i];
    for (int p = 1; p < splits; ++p) s += partial[p * MN + i];
    store_float(epi.out, epi.out_type, i, w4a16_epilogue_value(s, i % N, epi));
  }
}

}  // namespace

cudaError_t launch_w4a16_small_m(FloatType type, const void* x, const uint8_t* w, int64_t M,
                                 int64_t N, int64_t K, const GemmEpilogue& epi,
                                 const SmallMPlan& plan, float* partial, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (M > kSmallMMax || plan.splits < 1 || (plan.splits > 1 && partial == nullptr) ||
      type == FloatType::kFloat32) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(N, kRowsPerCta)),
                  static_cast<unsigned>(plan.splits));
  float* part = plan.splits > 1 ? partial : nullptr;
  if (type == FloatType::kFloat16) {
    w4a16_small_m_kernel<__half><<<grid, kThreads16, 0, stream>>>(
        static_cast<const __half*>(x), w, static_cast<int>(M), N, K, plan.windows_per_split, epi,
        part);
  } else {
    w4a16_small_m_kernel<__nv_bfloat16><<<grid, kThreads16, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(x), w, static_cast<int>(M), N, K,
        plan.windows_per_split, epi, part);
  }
  if (plan.splits > 1) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    const int64_t MN = M * N;
    const unsigned blocks = static_cast<unsigned>(
        std::max<int64_t>(1, std::min<int64_t>(ceil_div<int64_t>(MN, 256), sm_count() * 4)));
    w4a16_split_reduce_kernel<<<blocks, 256, 0, stream>>>(partial, plan.splits, MN, N, epi);
  }
  return cudaGetLastError();
}

}  // namespace ostquant
