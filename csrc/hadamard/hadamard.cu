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
// Steps 1 and 2 are hadamard_fwht_rows (hadamard_core.cuh), shared with the fused
// Hadamard + quantization kernel (quant/hadamard_quant.cu). The K x K stage sums over k in the
// order k = 0..K-1, which reference.hadamard_transform_ordered reproduces bit for bit.
// Only three instantiations (one per dtype); K, m, E are run-time values.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "hadamard/hadamard_core.cuh"
#include "hadamard/hadamard_tables.h"
#include "hadamard/launch.h"

namespace ostquant {
namespace {

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
  const int T_ = blockDim.x;
  const T* xb = x + row0 * n;
  T* ob = out + row0 * n;

  // ---- 1., 2. the length-m transforms of every chunk, into s (hadamard_core.cuh)
  hadamard_fwht_rows<T>(p, xb, s, rows_here, tid, T_);

  // ---- 3. K x K stage (or plain scaled store for K == 1)
  if (p.K == 1) {
    for (int vi = tid; vi < nvec; vi += T_) {
      const int64_t off = static_cast<int64_t>(vi) << p.log_E;
      if (p.E == 8) {
        float v[8];
        load8_shared(s, vi, v);
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
  if (!hadamard_setup(p, K, m)) return cudaErrorInvalidValue;
  const int64_t n = K * m;
  p.x = x;
  p.out = out;
  p.rows = rows;
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
