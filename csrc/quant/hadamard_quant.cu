// hadamard_quantize_per_token: online Hadamard transform + per-token quantization in one kernel,
// int4 codes (packed two per byte, or one per int8 with packed = false) + float32 scale/zero.
// Bit-identical to reference.hadamard_quantize_per_token
// (= quantize_per_token(reference.hadamard_transform_ordered(x, scale)), packed or not).
//
// One CTA holds `rpc` whole rows (n = K*m elements) in shared memory as fp32 (blockDim =
// (tpr, rpc): row r of the CTA belongs to threadIdx.y == r in step 4):
//   1-2. hadamard_fwht_rows (hadamard/hadamard_core.cuh): H_m on every length-m chunk, the
//        butterflies of reference.fwht_pow2 in its order;
//   3.   K == 1: y = dtype(s * scale) in place (stored back as float);
//        K > 1:  the K x K stage y[i*m + j] = dtype(scale * sum_k H_K[i][k] * s[k*m + j]),
//                summed in the order k = 0..K-1 from 0 (each term +-s exact, accumulated with
//                fmaf(+-1, s, acc), which rounds exactly like acc +- s) into a second
//                shared buffer of dtype. A thread owns a tile of 8 outputs i x TJ (4, 2 or 1)
//                consecutive columns j, so one sign extraction serves TJ FMAs and one 16-byte
//                shared load serves 8*TJ of them;
//   4.   per row (tpr threads): max/min of y, compute_qparams, quantize_value
//        (common/quant_math.cuh, as quantize_per_token), two codes per byte, 4-byte stores
//        (unpacked: one int8 per code, 8-byte stores).
// Rows too long for one CTA's shared memory (hadamard_quantize_fits) are not handled here: the
// host op falls back to hadamard_transform + the per-token quantizer (packed or int8 codes).
//
// Cost: the K x K stage is K FMAs per element on the CUDA cores (K = 172 for n = 11008), which
// makes large-K sizes compute-bound; K = 1 and small K are bound by memory bandwidth.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/int4.cuh"
#include "common/quant_math.cuh"
#include "hadamard/hadamard_core.cuh"
#include "hadamard/launch.h"
#include "quant/launch.h"
#include "quant/row_quant.cuh"

namespace ostquant {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kTileI = 8;        // outputs i per K-stage work item (8 x TJ accumulators)
constexpr int kMaxRowsPerCta = 8;
// Static shared memory of the kernel (row_reduce_max_min) is not part of the dynamic buffer:
// keep this much of the per-block limit free for it.
constexpr int64_t kStaticSmemReserve = 1024;

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  if constexpr (sizeof(T) == 2) {
    T t;
    store_float(v, &t);
    return to_float(t);
  } else {
    return v;
  }
}

// Step 3 for K > 1: y[r*n + i*m + j] for every row r < rows_here, output i < K, column j < m.
template <typename T, int TJ>
__device__ __forceinline__ void hadamard_k_stage(const HadamardParams& p, const float* s, T* y,
                                                 int rows_here, int tid, int nthreads) {
  const int64_t n = static_cast<int64_t>(p.K) * p.m;
  const int tiles = (p.K + kTileI - 1) / kTileI;
  const int64_t jgroups = p.m / TJ;
  const int64_t items = static_cast<int64_t>(rows_here) * tiles * jgroups;
  const uint32_t* hb = c_hadamard_bits + p.bits_offset;
  for (int64_t item = tid; item < items; item += nthreads) {
    const int64_t jg = item % jgroups;
    const int64_t rt = item / jgroups;
    const int tile = static_cast<int>(rt % tiles);
    const int64_t r = rt / tiles;
    const int64_t j0 = jg * TJ;
    const float* col = s + r * n + j0;
    const int word = tile >> 2;          // 32 outputs per sign word, 8 per tile
    const int shift = (tile & 3) * 8;
    float acc[kTileI][TJ];
#pragma unroll
    for (int ii = 0; ii < kTileI; ++ii) {
#pragma unroll
      for (int c = 0; c < TJ; ++c) acc[ii][c] = 0.f;
    }
    for (int k = 0; k < p.K; ++k) {
      float v[TJ];
      const float* src = col + static_cast<int64_t>(k) * p.m;
      if constexpr (TJ == 4) {
        const float4 t = *reinterpret_cast<const float4*>(src);
        v[0] = t.x;
        v[1] = t.y;
        v[2] = t.z;
        v[3] = t.w;
      } else if constexpr (TJ == 2) {
        const float2 t = *reinterpret_cast<const float2*>(src);
        v[0] = t.x;
        v[1] = t.y;
      } else {
        v[0] = src[0];
      }
      const uint32_t bits = hb[k * p.bits_words + word] >> shift;  // bit ii: H_K[i0+ii][k] < 0
#pragma unroll
      for (int ii = 0; ii < kTileI; ++ii) {
        // +1.0f or -1.0f; fmaf(+-1, v, acc) == acc +- v exactly (the product is exact).
        const float sg = __uint_as_float(0x3f800000u | ((bits << (31 - ii)) & 0x80000000u));
#pragma unroll
        for (int c = 0; c < TJ; ++c) acc[ii][c] = __fmaf_rn(sg, v[c], acc[ii][c]);
      }
    }
    const int i0 = tile * kTileI;
    const int nout = min(kTileI, p.K - i0);
    T* dst = y + r * n + static_cast<int64_t>(i0) * p.m + j0;
#pragma unroll
    for (int ii = 0; ii < kTileI; ++ii) {
      if (ii < nout) {
        // the TJ values as one vector (j0 is a multiple of TJ, m of TJ): per-element 2-byte
        // stores TJ·2 bytes apart across the lanes took two bank wavefronts each
        Vec<T, TJ> o;
#pragma unroll
        for (int c = 0; c < TJ; ++c) store_float(__fmul_rn(acc[ii][c], p.scale), &o.v[c]);
        store_vec<T, TJ>(dst + static_cast<int64_t>(ii) * p.m, o);
      }
    }
  }
}

// y[8·wi .. 8·wi+7] of one row as float: from the float buffer (K == 1) as two conflict-free
// 16-byte loads, from the dtype buffer (K > 1) as one 16-byte load (fp32: 32 bytes). Per-element
// loads, 16 or 32 bytes apart across the lanes, were 4- or 8-way bank conflicts
// (tests/simt/memprof.py).
template <typename T>
__device__ __forceinline__ void load8_y(bool in_s, const float* ys, const T* yt, int64_t wi,
                                        float (&a)[8]) {
  if (in_s) {
    load8_shared(ys, wi, a);
  } else if constexpr (sizeof(T) == 4) {
    load8_shared(reinterpret_cast<const float*>(yt), wi, a);
  } else {
    const Vec<T, 8> v = load_vec<T, 8>(yt + wi * 8);
#pragma unroll
    for (int e = 0; e < 8; ++e) a[e] = to_float(v.v[e]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) hadamard_quant_kernel(const HadamardParams p,
                                                                     const FusedQuantArgs qa) {
  extern __shared__ float4 smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int64_t n = static_cast<int64_t>(p.K) * p.m;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * p.rpc;
  const int rows_here = static_cast<int>(p.rows - row0 < p.rpc ? p.rows - row0 : p.rpc);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;

  // ---- 1., 2. H_m on every chunk, unscaled, into s
  hadamard_fwht_rows<T>(p, x + row0 * n, s, rows_here, tid, nthreads);

  // ---- 3. y = dtype(scale * (H_K stage)), the values the unfused op would store
  T* yb = reinterpret_cast<T*>(s + static_cast<int64_t>(p.rpc) * n);  // K > 1 only
  if (p.K == 1) {
    const int64_t elems = rows_here * n;
    for (int64_t i = tid; i < elems; i += nthreads) s[i] = round_to<T>(__fmul_rn(s[i], p.scale));
  } else if (p.m % 4 == 0) {
    hadamard_k_stage<T, 4>(p, s, yb, rows_here, tid, nthreads);
  } else if (p.m % 2 == 0) {
    hadamard_k_stage<T, 2>(p, s, yb, rows_here, tid, nthreads);
  } else {
    hadamard_k_stage<T, 1>(p, s, yb, rows_here, tid, nthreads);
  }
  __syncthreads();

  // ---- 4. per-row quantization: threadIdx.y is the row, blockDim.x threads per row
  const int r = threadIdx.y;
  const bool valid = r < rows_here;
  const int tpr = blockDim.x;
  const int gt = threadIdx.x;
  const float* ys = s + r * n;  // K == 1
  const T* yt = yb + r * n;     // K > 1
  const bool in_s = p.K == 1;
  float mx = -INFINITY, mn = INFINITY;
  if (valid) {
    for (int64_t i = gt; i < n; i += tpr) {
      const float v = in_s ? ys[i] : to_float(yt[i]);
      mx = nan_max(mx, v);
      mn = nan_min(mn, v);
    }
  }
  row_reduce_max_min(mx, mn);
  if (!valid) return;  // no block-wide sync below this point
  const int64_t row = row0 + r;
  const QParams qp = compute_qparams(mx, mn, qa.bits, qa.sym, qa.clip);
  if (gt == 0) {
    qa.scale[row] = qp.scale;
    qa.zero[row] = qp.zero;
  }
  if (!qa.packed) {  // one int8 per code (the Hopper GEMM's activation layout)
    int8_t* c_row = static_cast<int8_t*>(qa.q) + row * n;
    if (n % 8 == 0) {  // 8 codes -> one 8-byte store
      for (int64_t wi = gt; wi < n / 8; wi += tpr) {
        uint32_t word[2] = {0u, 0u};
        float a8[8];
        load8_y(in_s, ys, yt, wi, a8);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          word[e >> 2] |= (static_cast<uint32_t>(quantize_value(a8[e], qp)) & 0xffu) << (8 * (e & 3));
        }
        reinterpret_cast<uint2*>(c_row)[wi] = make_uint2(word[0], word[1]);
      }
    } else {
      for (int64_t i = gt; i < n; i += tpr) {
        c_row[i] = static_cast<int8_t>(quantize_value(in_s ? ys[i] : to_float(yt[i]), qp));
      }
    }
    return;
  }
  uint8_t* q_row = static_cast<uint8_t*>(qa.q) + row * (n / 2);
  if (n % 8 == 0) {  // 8 codes -> one 4-byte store
    for (int64_t wi = gt; wi < n / 8; wi += tpr) {
      uint32_t word = 0;
      float a8[8];
      load8_y(in_s, ys, yt, wi, a8);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        word |= static_cast<uint32_t>(pack_int4_pair(quantize_value(a8[2 * e], qp),
                                                     quantize_value(a8[2 * e + 1], qp)))
                << (8 * e);
      }
      reinterpret_cast<uint32_t*>(q_row)[wi] = word;
    }
  } else {
    for (int64_t bi = gt; bi < n / 2; bi += tpr) {
      const float a = in_s ? ys[2 * bi] : to_float(yt[2 * bi]);
      const float b = in_s ? ys[2 * bi + 1] : to_float(yt[2 * bi + 1]);
      q_row[bi] = pack_int4_pair(quantize_value(a, qp), quantize_value(b, qp));
    }
  }
}

// Shared memory per CTA: rows * n fp32 values, plus a dtype buffer for the K x K stage's output.
int64_t smem_bytes(FloatType type, int K, int64_t n, int64_t rows) {
  const int64_t esize = type == FloatType::kFloat32 ? 4 : 2;
  return rows * n * (4 + (K > 1 ? esize : 0));
}

int64_t max_dynamic_smem(int device) {
  return hadamard_max_row_elems(device) * static_cast<int64_t>(sizeof(float)) -
         kStaticSmemReserve;
}

}  // namespace

bool hadamard_quantize_fits(FloatType type, int Kh, int64_t m, int device) {
  return smem_bytes(type, Kh, Kh * m, 1) <= max_dynamic_smem(device);
}

cudaError_t launch_hadamard_quantize(FloatType type, const void* x, int Kh, int64_t m,
                                     const FusedQuantArgs& qa, cudaStream_t stream) {
  if (qa.rows <= 0) return cudaSuccess;
  if (qa.bits < 2 || qa.bits > 4) return cudaErrorInvalidValue;
  HadamardParams p{};
  if (!hadamard_setup(p, Kh, m)) return cudaErrorInvalidValue;
  const int64_t n = Kh * m;
  if (n != qa.K || n % 2 != 0) return cudaErrorInvalidValue;
  p.x = x;
  p.out = nullptr;
  p.rows = qa.rows;
  p.scale = qa.scale_h;
  // The output pointers must allow the 4-byte (packed) / 8-byte (int8) code stores (torch
  // allocations always do).
  if (!is_aligned(qa.q, qa.packed ? 4 : 8)) return cudaErrorInvalidValue;
  // Rows per CTA: ~2K elements of work for short rows, at most kMaxRowsPerCta, a power of two.
  constexpr int64_t kTargetElems = 2048;
  int rpc = 1;
  while (rpc * 2 <= kMaxRowsPerCta && rpc * 2 * n <= kTargetElems && rpc * 2 <= qa.rows) rpc *= 2;
  p.rpc = rpc;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const int64_t smem = smem_bytes(type, Kh, n, rpc);
  if (smem > max_dynamic_smem(device)) {
    return cudaErrorInvalidValue;  // too long for one CTA: the caller takes the unfused path
  }
  const int64_t cta_elems = rpc * n;
  const int64_t nvec = cta_elems / p.E;
  const int max_threads = cta_elems >= 16384 ? kMaxThreads : 256;
  int64_t threads = ((nvec + 31) / 32) * 32;
  if (threads > max_threads) threads = max_threads;
  const int64_t per_row_min = 32 * rpc;  // every row gets at least one warp in step 4
  threads = ((std::max<int64_t>(threads, per_row_min) + per_row_min - 1) / per_row_min) *
            per_row_min;
  const int64_t grid = (qa.rows + rpc - 1) / rpc;
  if (grid > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 block(static_cast<unsigned>(threads / rpc), static_cast<unsigned>(rpc));
  return OSTQ_DISPATCH_FLOAT(type, [&] {
    auto kernel = hadamard_quant_kernel<scalar_t>;
    if (smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    kernel<<<static_cast<unsigned>(grid), block, static_cast<size_t>(smem), stream>>>(p, qa);
    return cudaGetLastError();
  });
}

}  // namespace ostquant
