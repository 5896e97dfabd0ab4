// Hadamard transform y = scale * x @ kron(H_K, H_m)^T over the last dim, fp32 accumulation.
//
// One CTA transforms `rpc` whole rows (n = K*m elements each) held in shared memory as fp32:
//   1. load: each thread reads E = min(8, m) contiguous elements (16-byte vectors), does the
//      log2(E) lowest butterfly stages in registers, then up to 5 more stages across the warp
//      with shuffles (lanes hold consecutive vectors), and stores the vector to shared memory;
//   2. the remaining stages of the length-m transform (strides >= 256) as passes over shared
//      memory, each thread gathering up to 16 strided values and doing 4 stages in registers;
//   3. the K x K stage (K > 1): out[i*m + j] = sum_k H_K[i][k] * s[k*m + j], a small dense
//      matmul with the sign bits of H_K read from constant memory (hadamard_tables.h), each
//      thread accumulating a tile of up to 32 outputs i for one column j; times scale, store.
// Only three instantiations (one per dtype); K, m, E are run-time values.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "hadamard/hadamard_tables.h"
#include "hadamard/launch.h"

namespace ostquant {
namespace {

__constant__ uint32_t c_hadamard_bits[kHadamardBitsWords] = OSTQ_HADAMARD_BITS_INIT;

constexpr int kPassBits = 4;  // butterfly stages per shared-memory pass (16 values/thread)

struct HadamardParams {
  const void* x;
  void* out;
  int64_t rows;
  int64_t m;        // power of two
  int K;            // 1 or a base order
  int bits_offset;  // K's first word in c_hadamard_bits
  int bits_words;   // words per column of H_K
  int log_m;
  int E;            // elements per thread vector: min(8, m)
  int log_E;
  int lane_bits;    // butterfly stages done with warp shuffles
  int rpc;          // rows per CTA
  float scale;
};

__device__ __forceinline__ void store_float(float v, __half* p) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_float(float v, __nv_bfloat16* p) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_float(float v, float* p) { *p = v; }

// Load 8 contiguous elements (16-byte aligned for 2-byte types, 32-byte for fp32) as float.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  if constexpr (sizeof(T) == 2) {
    const Vec<T, 8> a = load_vec<T, 8>(p);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = to_float(a.v[e]);
  } else {
    const Vec<float, 4> a = load_vec<float, 4>(p);
    const Vec<float, 4> b = load_vec<float, 4>(p + 4);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      v[e] = a.v[e];
      v[e + 4] = b.v[e];
    }
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  if constexpr (sizeof(T) == 2) {
    Vec<T, 8> a;
#pragma unroll
    for (int e = 0; e < 8; ++e) store_float(v[e], &a.v[e]);
    store_vec<T, 8>(p, a);
  } else {
    Vec<float, 4> a, b;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      a.v[e] = v[e];
      b.v[e] = v[e + 4];
    }
    store_vec<float, 4>(p, a);
    store_vec<float, 4>(p + 4, b);
  }
}

constexpr int kMaxThreads = 1024;

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) hadamard_kernel(const HadamardParams p) {
  extern __shared__ float4 smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);

  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ out = static_cast<T*>(p.out);
  const int64_t n = static_cast<int64_t>(p.K) * p.m;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * p.rpc;
  const int rows_here = static_cast<int>(p.rows - row0 < p.rpc ? p.rows - row0 : p.rpc);
  const int64_t elems = rows_here * n;             // valid elements of this CTA
  const int nvec = static_cast<int>(elems >> p.log_E);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int T_ = blockDim.x;
  const T* xb = x + row0 * n;
  T* ob = out + row0 * n;

  // ---- 1. load, in-thread stages, warp-shuffle stages, store to shared memory
  const int iters = (nvec + T_ - 1) / T_;  // uniform across the CTA (shuffles need full warps)
  for (int it = 0; it < iters; ++it) {
    const int vi = it * T_ + tid;
    const bool ok = vi < nvec;
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = 0.f;
    if (ok) {
      const T* src = xb + (static_cast<int64_t>(vi) << p.log_E);
      if (p.E == 8) {
        load8(src, v);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (e < p.E) v[e] = to_float(src[e]);
        }
      }
    }
#pragma unroll
    for (int h = 1; h < 8; h <<= 1) {
      if (h < p.E) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if ((e & h) == 0) {
            const float a = v[e], b = v[e + h];
            v[e] = a + b;
            v[e + h] = a - b;
          }
        }
      }
    }
    for (int b = 0; b < p.lane_bits; ++b) {
      const int mask = 1 << b;
      const bool upper = lane & mask;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float o = __shfl_xor_sync(0xffffffffu, v[e], mask);
        v[e] = upper ? o - v[e] : v[e] + o;
      }
    }
    if (ok) {
      float* dst = s + (static_cast<int64_t>(vi) << p.log_E);
      if (p.E == 8) {
        reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (e < p.E) dst[e] = v[e];
        }
      }
    }
  }

  // ---- 2. remaining stages of the length-m transform, through shared memory
  const int chunks = rows_here * p.K;  // independent length-m transforms in this CTA
  for (int d = p.log_E + p.lane_bits; d < p.log_m; d += kPassBits) {
    const int pb = min(kPassBits, p.log_m - d);
    const int cnt = 1 << pb;
    const int64_t stride = int64_t{1} << d;
    const int64_t groups_per_chunk = p.m >> pb;
    const int64_t groups = groups_per_chunk * chunks;
    __syncthreads();
    for (int64_t g = tid; g < groups; g += T_) {
      const int64_t c = g / groups_per_chunk;
      const int64_t gg = g - c * groups_per_chunk;
      const int64_t low = gg & (stride - 1);
      const int64_t high = gg >> d;
      float* base = s + c * p.m + low + high * (stride << pb);
      float v[1 << kPassBits];
#pragma unroll
      for (int e = 0; e < (1 << kPassBits); ++e) v[e] = e < cnt ? base[e * stride] : 0.f;
#pragma unroll
      for (int h = 1; h < (1 << kPassBits); h <<= 1) {
        if (h < cnt) {
#pragma unroll
          for (int e = 0; e < (1 << kPassBits); ++e) {
            if ((e & h) == 0) {
              const float a = v[e], b = v[e + h];
              v[e] = a + b;
              v[e + h] = a - b;
            }
          }
        }
      }
#pragma unroll
      for (int e = 0; e < (1 << kPassBits); ++e) {
        if (e < cnt) base[e * stride] = v[e];
      }
    }
  }
  __syncthreads();

  // ---- 3. K x K stage (or plain scaled store for K == 1)
  if (p.K == 1) {
    for (int vi = tid; vi < nvec; vi += T_) {
      const int64_t off = static_cast<int64_t>(vi) << p.log_E;
      if (p.E == 8) {
        const float4 a = reinterpret_cast<const float4*>(s + off)[0];
        const float4 b = reinterpret_cast<const float4*>(s + off)[1];
        float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] *= p.scale;
        store8(ob + off, v);
      } else {
        for (int e = 0; e < p.E; ++e) store_float(s[off + e] * p.scale, ob + off + e);
      }
    }
    return;
  }
  const int tiles = p.bits_words;  // 32 outputs i per tile
  const int64_t items = static_cast<int64_t>(rows_here) * tiles * p.m;
  const uint32_t* hb = c_hadamard_bits + p.bits_offset;
  for (int64_t item = tid; item < items; item += T_) {
    const int64_t j = item & (p.m - 1);
    const int64_t rt = item >> p.log_m;
    const int tile = static_cast<int>(rt % tiles);
    const int64_t r = rt / tiles;
    const float* col = s + r * n + j;
    float acc[32];
#pragma unroll
    for (int ii = 0; ii < 32; ++ii) acc[ii] = 0.f;
    for (int k = 0; k < p.K; ++k) {
      const float val = col[static_cast<int64_t>(k) * p.m];
      const uint32_t bits = hb[k * tiles + tile];
      const uint32_t ival = __float_as_uint(val);
#pragma unroll
      for (int ii = 0; ii < 32; ++ii) {
        acc[ii] += __uint_as_float(ival ^ (((bits >> ii) & 1u) << 31));
      }
    }
    const int i0 = tile * 32;
    const int nout = min(32, p.K - i0);
    T* dst = ob + r * n + static_cast<int64_t>(i0) * p.m + j;
#pragma unroll
    for (int ii = 0; ii < 32; ++ii) {
      if (ii < nout) store_float(acc[ii] * p.scale, dst + static_cast<int64_t>(ii) * p.m);
    }
  }
}

int ilog2(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

}  // namespace

int64_t hadamard_max_row_elems(int device) {
  // Cached per device (the attribute never changes); a race only writes the same value twice.
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  int optin = device >= 0 && device < kMaxDevices ? cache[device].load(std::memory_order_relaxed)
                                                  : 0;
  if (optin == 0) {
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
        cudaSuccess) {
      cudaGetLastError();
      optin = 48 * 1024;
    }
    if (device >= 0 && device < kMaxDevices) cache[device].store(optin, std::memory_order_relaxed);
  }
  return optin / static_cast<int64_t>(sizeof(float));
}

cudaError_t launch_hadamard(FloatType type, const void* x, void* out, int64_t rows, int K,
                            int64_t m, float scale, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (m <= 0 || (m & (m - 1)) != 0) return cudaErrorInvalidValue;
  HadamardParams p{};
  p.K = K;
  if (K != 1) {
    int idx = -1;
    for (int i = 0; i < kNumHadamardBase; ++i) {
      if (kHadamardBase[i].K == K) idx = i;
    }
    if (idx < 0) return cudaErrorInvalidValue;
    p.bits_offset = kHadamardBase[idx].offset;
    p.bits_words = kHadamardBase[idx].words;
  }
  const int64_t n = K * m;
  p.x = x;
  p.out = out;
  p.rows = rows;
  p.m = m;
  p.log_m = ilog2(m);
  p.E = static_cast<int>(m < 8 ? m : 8);
  p.log_E = ilog2(p.E);
  p.lane_bits = p.log_m - p.log_E < 5 ? p.log_m - p.log_E : 5;
  p.scale = scale;
  // Rows per CTA: enough to give the CTA ~2K elements of work, never splitting a row.
  constexpr int64_t kTargetElems = 2048;
  p.rpc = static_cast<int>(n >= kTargetElems ? 1 : kTargetElems / n);
  if (p.rpc > rows) p.rpc = static_cast<int>(rows);
  const int64_t cta_elems = p.rpc * n;
  const size_t smem = static_cast<size_t>(cta_elems) * sizeof(float);
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (cta_elems > hadamard_max_row_elems(device)) return cudaErrorInvalidValue;
  const int64_t nvec = cta_elems / p.E;
  const int max_threads = cta_elems >= 16384 ? kMaxThreads : 256;
  int threads = static_cast<int>(((nvec + 31) / 32) * 32);
  if (threads > max_threads) threads = max_threads;
  if (threads < 32) threads = 32;
  const int64_t grid = (rows + p.rpc - 1) / p.rpc;
  if (grid > 0x7fffffff) return cudaErrorInvalidValue;
  return OSTQ_DISPATCH_FLOAT(type, [&] {
    auto kernel = hadamard_kernel<scalar_t>;
    if (smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    kernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace ostquant
