// KV-cache append: quantize the new K and V tokens (asymmetric int4 per token and head, fp16
// scale/zero) and write them into the cache in one pass — contiguous or paged layout
// (launch.h), optionally applying RoPE and the online Hadamard to K first.
//
// One warp per (sequence b, new token s, KV head h, K-or-V) row of D elements; lane l holds the
// E = D/32 consecutive elements [l·E, l·E + E):
//
// * RoPE (rotate_half): element i pairs with i ± D/2, which is the same slot of lane l ^ 16;
//   every product and the sum are rounded to the input dtype, as transformers does in bf16/fp16.
// * Hadamard (Sylvester, the order of reference.fwht_pow2): stages h < E inside the lane, the
//   others across lanes with shuffles; float32 butterflies, then · D^-½ and rounding to the input
//   dtype (reference.hadamard_transform).
// * Quantization: warp max/min, then common/quant_math.cuh (compute_qparams_kv, quantize_value),
//   the functions quantize_kv uses, so the cache holds exactly reference.quantize_kv's bytes.
//
// Capacity and pages are checked on the device: a sequence whose append would overflow its
// capacity (or needs an unallocated page) is left untouched and the status word records it; the
// host raises at the next KV call (kv_status.h). No host synchronisation per call.
#include "attention/kv_common.cuh"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/int4.cuh"
#include "common/quant_math.cuh"

namespace ostquant {
namespace {

constexpr int kAppendWarps = 8;

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Round a float32 value to T and back (exact for T = float).
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

template <typename T, int E>
__device__ __forceinline__ void load_row(const T* p, float (&x)[E]) {
  const Vec<T, E> v = load_vec<T, E>(p);
#pragma unroll
  for (int e = 0; e < E; ++e) x[e] = to_float(v.v[e]);
}

template <typename T, int D>
__global__ void __launch_bounds__(kAppendWarps * 32) kv_append_kernel(const __grid_constant__ KvAppendArgs a) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x & 31;
  const int64_t warp_id = static_cast<int64_t>(blockIdx.x) * kAppendWarps + (threadIdx.x >> 5);
  const KvLayout& lay = a.lay;
  const int64_t total = static_cast<int64_t>(lay.B) * a.S * lay.Hkv * 2;
  if (warp_id >= total) return;  // whole warps only
  const bool is_v = warp_id & 1;
  int64_t r = warp_id >> 1;  // row of [B, S, Hkv]
  const int h = static_cast<int>(r % lay.Hkv);
  r /= lay.Hkv;
  const int s = static_cast<int>(r % a.S);
  const int b = static_cast<int>(r / a.S);
  const bool reporter = s == 0 && h == 0 && !is_v && lane == 0;

  const int64_t L = kv_seqlen(lay, b);
  if (L < 0) {
    if (reporter) kv_report(lay, kKvBadLength, b);
    return;
  }
  if (L + a.S > lay.capacity) {
    if (reporter) kv_report(lay, kKvAppendFull, b);
    return;
  }
  if (lay.block_table != nullptr) {
    // every page this append touches must be allocated, or nothing is written for sequence b
    const int64_t first = L >> lay.log2_page;
    const int64_t last = (L + a.S - 1) >> lay.log2_page;
    bool ok = true;
    for (int64_t p = first + lane; p <= last; p += 32) ok &= kv_page(lay, b, p << lay.log2_page) >= 0;
    if (!__all_sync(kFullMask, ok)) {
      if (reporter) kv_report(lay, kKvAppendNoPage, b);
      return;
    }
  }
  const int64_t pos = L + s;
  const int page = kv_page(lay, b, pos);
  const int64_t slot = kv_slot(lay, pos);
  const int64_t row = kv_row(lay, page, slot, h);

  const int64_t src = ((static_cast<int64_t>(b) * a.S + s) * lay.Hkv + h) * D + lane * E;
  float x[E];
  load_row<T, E>(static_cast<const T*>(is_v ? a.v : a.k) + src, x);

  if (!is_v && a.cos != nullptr) {
    // transformers' apply_rotary_pos_emb in dtype T: k·cos + rotate_half(k)·sin
    const int64_t cs = (static_cast<int64_t>(b) * a.S + s) * D + lane * E;
    float c[E], sn[E];
    load_row<T, E>(static_cast<const T*>(a.cos) + cs, c);
    load_row<T, E>(static_cast<const T*>(a.sin) + cs, sn);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float partner = __shfl_xor_sync(kFullMask, x[e], 16);
      const float rot = lane < 16 ? -partner : partner;
      x[e] = round_to<T>(fadd_rn(round_to<T>(fmul_rn(x[e], c[e])), round_to<T>(fmul_rn(rot, sn[e]))));
    }
  }
  if (!is_v && a.k_hadamard) {
#pragma unroll
    for (int hs = 1; hs < E; hs *= 2) {  // in-lane stages
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if ((e & hs) == 0) {
          const float u = x[e], w = x[e + hs];
          x[e] = fadd_rn(u, w);
          x[e + hs] = fsub_rn(u, w);
        }
      }
    }
#pragma unroll
    for (int ls = 1; ls < 32; ls *= 2) {  // cross-lane stages: element stride ls·E
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float partner = __shfl_xor_sync(kFullMask, x[e], ls);
        x[e] = (lane & ls) ? fsub_rn(partner, x[e]) : fadd_rn(x[e], partner);
      }
    }
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = round_to<T>(fmul_rn(x[e], a.hadamard_scale));
  }

  float mx = x[0], mn = x[0];
#pragma unroll
  for (int e = 1; e < E; ++e) {
    mx = nan_max(mx, x[e]);
    mn = nan_min(mn, x[e]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    mx = nan_max(mx, __shfl_xor_sync(kFullMask, mx, off));
    mn = nan_min(mn, __shfl_xor_sync(kFullMask, mn, off));
  }
  const QParams p = compute_qparams_kv(mx, mn);

  uint8_t* codes = static_cast<uint8_t*>(is_v ? a.cache.v_codes : a.cache.k_codes) + row * (D / 2);
  Vec<uint8_t, E / 2> packed;
#pragma unroll
  for (int e = 0; e < E / 2; ++e) {
    packed.v[e] = pack_int4_pair(quantize_value(x[2 * e], p), quantize_value(x[2 * e + 1], p));
  }
  store_vec<uint8_t, E / 2>(codes + lane * (E / 2), packed);
  if (lane == 0) {
    const int64_t si = kv_sc_index(lay, page, slot, h);
    static_cast<__half*>(is_v ? a.cache.v_scale : a.cache.k_scale)[si] = __float2half_rn(p.scale);
    static_cast<__half*>(is_v ? a.cache.v_zero : a.cache.k_zero)[si] = __float2half_rn(p.zero);
  }
}

template <typename T, int D>
cudaError_t launch_append(const KvAppendArgs& a, cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(a.lay.B) * a.S * a.lay.Hkv * 2;
  if (warps == 0) return cudaSuccess;
  const int64_t blocks = ceil_div<int64_t>(warps, kAppendWarps);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  kv_append_kernel<T, D><<<static_cast<unsigned>(blocks), kAppendWarps * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_kv_append(FloatType type, const KvAppendArgs& args, cudaStream_t stream) {
  return OSTQ_DISPATCH_FLOAT(type, [&] {
    if (args.lay.D == 64) return launch_append<scalar_t, 64>(args, stream);
    if (args.lay.D == 128) return launch_append<scalar_t, 128>(args, stream);
    return cudaErrorInvalidValue;
  });
}

}  // namespace ostquant
