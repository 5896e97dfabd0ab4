// rmsnorm_quantize_per_token: RMSNorm (optional weight) + per-token quantization, int4 codes
// (packed, or one per int8) + float32 scale/zero, in one pass over x. Bit-identical to
// reference.rmsnorm_quantize_per_token (= quantize_per_token(reference.rms_norm(x)), packed),
// except when the float64 sum of squares, whose order differs, rounds to another float32 mean
// square (a ~1e-7-per-row event: the float64 sums agree to ~K ulps of float64).
//
// Layout as row_quant.cuh: `tpr` threads (blockDim.x, a power of two) per row, blockDim.y rows
// per block, each thread caching up to CACHE vectors of VEC elements in registers (longer rows
// re-read the rest). Per row:
//   1. ss = sum of x^2 in float64 (the squares of fp16/bf16/fp32 values are exact in float64);
//   2. var = float32(ss / K); inv = 1 / sqrt(var + eps) (IEEE float32 sqrt and division);
//   3. y = dtype(x * inv) [then y = dtype(y * w)], the cached vectors overwritten with y;
//      row max/min of y;
//   4. compute_qparams / quantize_value (common/quant_math.cuh, as quantize_per_token), codes
//      packed two per byte (low nibble first), or one per int8 (packed = false).
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/int4.cuh"
#include "common/quant_math.cuh"
#include "quant/launch.h"
#include "quant/row_quant.cuh"

namespace ostquant {
namespace {

template <typename T>
__device__ __forceinline__ T from_float_rn(float v);
template <>
__device__ __forceinline__ float from_float_rn<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float_rn<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float_rn<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int VEC>
__device__ __forceinline__ double add_squares(const Vec<T, VEC>& v, double ss) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const double f = static_cast<double>(to_float(v.v[j]));
    ss = __fma_rn(f, f, ss);  // f*f is exact in float64: one rounding, as ss + f*f
  }
  return ss;
}

// y = dtype(x * inv), then, with a weight, y = dtype(y * w): torch's rounding of
// `(x.float() * inv).to(dtype)` and `weight * y` (the product of two dtype values is exact in
// float32 for fp16/bf16, so rounding it once to dtype is what torch does).
template <bool HAS_W, typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> rms_apply(const Vec<T, VEC>& x, float inv, const T* w,
                                                 int64_t vi) {
  Vec<T, VEC> y;
#pragma unroll
  for (int j = 0; j < VEC; ++j) y.v[j] = from_float_rn<T>(__fmul_rn(to_float(x.v[j]), inv));
  if constexpr (HAS_W) {
    const Vec<T, VEC> wv = load_vec<T, VEC>(w + vi * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      y.v[j] = from_float_rn<T>(__fmul_rn(to_float(y.v[j]), to_float(wv.v[j])));
    }
  }
  return y;
}

// The codes of vector vi of the row: PACKED two per byte into uint8 q_row[K/2], else one per
// int8 into q_row[K].
template <bool PACKED, typename T, int VEC>
__device__ __forceinline__ void quantize_store_codes(const Vec<T, VEC>& v, const QParams& p,
                                                     void* q_row, int64_t vi) {
  if constexpr (PACKED) {
    static_assert(VEC % 2 == 0, "packs pairs");
    Vec<uint8_t, VEC / 2> out;
#pragma unroll
    for (int j = 0; j < VEC / 2; ++j) {
      out.v[j] = pack_int4_pair(quantize_value(to_float(v.v[2 * j]), p),
                                quantize_value(to_float(v.v[2 * j + 1]), p));
    }
    store_vec<uint8_t, VEC / 2>(static_cast<uint8_t*>(q_row) + vi * (VEC / 2), out);
  } else {
    Vec<int8_t, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      out.v[j] = static_cast<int8_t>(quantize_value(to_float(v.v[j]), p));
    }
    store_vec<int8_t, VEC>(static_cast<int8_t*>(q_row) + vi * VEC, out);
  }
}

template <typename T, int VEC, int CACHE, bool HAS_W, bool PACKED>
__global__ void __launch_bounds__(1024) rmsnorm_quant_kernel(const T* __restrict__ x,
                                                             const T* __restrict__ w,
                                                             FusedQuantArgs a) {
  const int tpr = blockDim.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < a.rows;
  const int64_t nvec = a.K / VEC;
  const T* xr = x + (valid ? row : 0) * a.K;

  // 1. sum of squares (x cached in registers)
  Vec<T, VEC> cache[CACHE];
  double ss = 0.0;
  if (valid) {
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int64_t vi = threadIdx.x + static_cast<int64_t>(i) * tpr;
      if (vi < nvec) {
        cache[i] = load_vec<T, VEC>(xr + vi * VEC);
        ss = add_squares(cache[i], ss);
      }
    }
    for (int64_t vi = threadIdx.x + static_cast<int64_t>(CACHE) * tpr; vi < nvec; vi += tpr) {
      ss = add_squares(load_vec<T, VEC>(xr + vi * VEC), ss);
    }
  }
  ss = row_reduce_sum(ss);

  // 2. inverse RMS, the same float in every thread of the row
  const float var = __double2float_rn(__ddiv_rn(ss, static_cast<double>(a.K)));
  const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, a.eps)));

  // 3. normalised values (cached ones overwritten) and their range
  float mx = -INFINITY, mn = INFINITY;
  if (valid) {
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int64_t vi = threadIdx.x + static_cast<int64_t>(i) * tpr;
      if (vi < nvec) {
        cache[i] = rms_apply<HAS_W>(cache[i], inv, w, vi);
        update_max_min(cache[i], mx, mn);
      }
    }
    for (int64_t vi = threadIdx.x + static_cast<int64_t>(CACHE) * tpr; vi < nvec; vi += tpr) {
      update_max_min(rms_apply<HAS_W>(load_vec<T, VEC>(xr + vi * VEC), inv, w, vi), mx, mn);
    }
  }
  row_reduce_max_min(mx, mn);
  if (!valid) return;  // no block-wide sync below this point

  // 4. quantize, pack (PACKED), store
  const QParams p = compute_qparams(mx, mn, a.bits, a.sym, a.clip);
  void* q_row = PACKED ? static_cast<void*>(static_cast<uint8_t*>(a.q) + row * (a.K / 2))
                       : static_cast<void*>(static_cast<int8_t*>(a.q) + row * a.K);
  if (threadIdx.x == 0) {
    a.scale[row] = p.scale;
    a.zero[row] = p.zero;
  }
#pragma unroll
  for (int i = 0; i < CACHE; ++i) {
    const int64_t vi = threadIdx.x + static_cast<int64_t>(i) * tpr;
    if (vi < nvec) quantize_store_codes<PACKED, T, VEC>(cache[i], p, q_row, vi);
  }
  for (int64_t vi = threadIdx.x + static_cast<int64_t>(CACHE) * tpr; vi < nvec; vi += tpr) {
    quantize_store_codes<PACKED, T, VEC>(
        rms_apply<HAS_W>(load_vec<T, VEC>(xr + vi * VEC), inv, w, vi), p, q_row, vi);
  }
}

template <typename T, int VEC>
cudaError_t launch_rmsnorm_vec(const T* x, const T* w, const FusedQuantArgs& a,
                               cudaStream_t stream) {
  constexpr int CACHE = kRowQuantCache;
  const int64_t nvec = a.K / VEC;
  const int64_t want = ceil_div<int64_t>(nvec, CACHE);
  int tpr = 8;
  while (tpr < want && tpr < 1024) tpr *= 2;
  const int rows_per_block = tpr >= kRowQuantMinBlock ? 1 : kRowQuantMinBlock / tpr;
  const int64_t blocks = ceil_div<int64_t>(a.rows, rows_per_block);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 block(tpr, rows_per_block);
  const unsigned grid = static_cast<unsigned>(blocks);
  auto launch = [&](auto has_w, auto packed) {
    rmsnorm_quant_kernel<T, VEC, CACHE, decltype(has_w)::value, decltype(packed)::value>
        <<<grid, block, 0, stream>>>(x, w, a);
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (w != nullptr) {
    a.packed ? launch(Yes{}, Yes{}) : launch(Yes{}, No{});
  } else {
    a.packed ? launch(No{}, Yes{}) : launch(No{}, No{});
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rmsnorm_quantize(FloatType type, const void* x, const void* weight,
                                    const FusedQuantArgs& args, cudaStream_t stream) {
  if (args.rows <= 0 || args.K <= 0) return cudaSuccess;
  if (args.K % 2 != 0 || args.bits < 2 || args.bits > 4) return cudaErrorInvalidValue;
  return OSTQ_DISPATCH_FLOAT(type, [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);  // 16-byte loads
    const auto* xp = static_cast<const scalar_t*>(x);
    const auto* wp = static_cast<const scalar_t*>(weight);
    const bool w_ok16 = wp == nullptr || is_aligned(wp, 16);
    const bool w_ok2 = wp == nullptr || is_aligned(wp, 2 * sizeof(scalar_t));
    if (!is_aligned(xp, 2 * sizeof(scalar_t)) || !w_ok2) return cudaErrorInvalidValue;
    if (args.K % kVec == 0 && is_aligned(xp, 16) && w_ok16) {
      return launch_rmsnorm_vec<scalar_t, kVec>(xp, wp, args, stream);
    }
    return launch_rmsnorm_vec<scalar_t, 2>(xp, wp, args, stream);
  });
}

}  // namespace ostquant
