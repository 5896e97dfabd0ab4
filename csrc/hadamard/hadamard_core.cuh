// Building blocks of the Hadamard transform kernels, shared by hadamard.cu
// (hadamard_transform) and quant/hadamard_quant.cu (hadamard_quantize_per_token).
//
// A CTA holds `rows_here` whole rows (n = K*m elements each) in shared memory as fp32:
//   hadamard_fwht_rows  1. load: each thread reads E = min(8, m) contiguous elements (16-byte
//                          vectors), does the log2(E) lowest butterfly stages in registers, then
//                          up to 5 more stages across the warp with shuffles (lanes hold
//                          consecutive vectors), and stores the vector to shared memory;
//                       2. the remaining stages of the length-m transform (strides >= 256) as
//                          passes over shared memory, each thread gathering up to 16 strided
//                          values and doing 4 stages in registers.
// Every stage is the butterfly (a, b) -> (a + b, a - b) on the pairs of reference.fwht_pow2, in
// its order, so the fp32 values equal the reference's bit for bit. What follows (the K x K
// stage, the scale, the store) is up to the kernel: c_hadamard_bits holds the sign bits of H_K.
//
// The header defines __constant__ data and device code in an unnamed namespace: each .cu file
// that includes it gets its own copy (no relocatable device code needed).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "hadamard/hadamard_tables.h"

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

inline int hadamard_ilog2(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// Fill the fields of `p` that depend on (K, m) only. False for an unsupported K or m.
inline bool hadamard_setup(HadamardParams& p, int K, int64_t m) {
  if (m <= 0 || (m & (m - 1)) != 0) return false;
  p.K = K;
  p.bits_offset = 0;
  p.bits_words = 0;
  if (K != 1) {
    int idx = -1;
    for (int i = 0; i < kNumHadamardBase; ++i) {
      if (kHadamardBase[i].K == K) idx = i;
    }
    if (idx < 0) return false;
    p.bits_offset = kHadamardBase[idx].offset;
    p.bits_words = kHadamardBase[idx].words;
  }
  p.m = m;
  p.log_m = hadamard_ilog2(m);
  p.E = static_cast<int>(m < 8 ? m : 8);
  p.log_E = hadamard_ilog2(p.E);
  p.lane_bits = p.log_m - p.log_E < 5 ? p.log_m - p.log_E : 5;
  return true;
}

// v[0..7] to s[8·vi .. 8·vi+7] as two 16-byte stores. Stores 32 bytes apart across the lanes
// would hit each bank twice per quarter-warp; lanes with bit 2 of vi set store their upper half
// first, so each store of a quarter-warp covers the 32 banks once (tests/simt/memprof.py).
__device__ __forceinline__ void store8_shared(float* s, int64_t vi, const float (&v)[8]) {
  const int sw = static_cast<int>((vi >> 2) & 1);
  const float4 lo = make_float4(v[0], v[1], v[2], v[3]);
  const float4 hi = make_float4(v[4], v[5], v[6], v[7]);
  float4* p = reinterpret_cast<float4*>(s + (vi << 3));
  p[sw] = sw ? hi : lo;
  p[sw ^ 1] = sw ? lo : hi;
}

// s[8·vi .. 8·vi+7] from shared memory as two 16-byte loads, in store8_shared's lane order,
// free of bank conflicts.
__device__ __forceinline__ void load8_shared(const float* s, int64_t vi, float (&v)[8]) {
  const int sw = static_cast<int>((vi >> 2) & 1);
  const float4* p = reinterpret_cast<const float4*>(s + (vi << 3));
  const float4 first = p[sw], second = p[sw ^ 1];
  const float4 lo = sw ? second : first, hi = sw ? first : second;
  v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
  v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
}

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

// Steps 1 and 2 above: s[r*n + c*m + j] (r < rows_here, c < K) <- the unscaled Sylvester
// transform H_m of each length-m chunk of the rows xb[0 .. rows_here*n). `tid` / `nthreads` are
// the flat thread index and count of the CTA (all threads must call this; warps are made of
// consecutive tid). Ends with __syncthreads(), so s is ready for any thread to read.
template <typename T>
__device__ __forceinline__ void hadamard_fwht_rows(const HadamardParams& p, const T* xb, float* s,
                                                   int rows_here, int tid, int nthreads) {
  const int64_t n = static_cast<int64_t>(p.K) * p.m;
  const int64_t elems = rows_here * n;  // valid elements of this CTA
  const int nvec = static_cast<int>(elems >> p.log_E);
  const int lane = tid & 31;

  // ---- 1. load, in-thread stages, warp-shuffle stages, store to shared memory
  const int iters = (nvec + nthreads - 1) / nthreads;  // uniform across the CTA (full warps)
  for (int it = 0; it < iters; ++it) {
    const int vi = it * nthreads + tid;
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
        store8_shared(s, vi, v);
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
    for (int64_t g = tid; g < groups; g += nthreads) {
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
}

}  // namespace
}  // namespace ostquant
