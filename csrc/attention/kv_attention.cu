// Attention over the int4 KV cache (contiguous or paged, launch.h), prefill and decode, GQA.
//
// Tensor-core kernel (fp16 / bf16 q), FlashAttention-2 style with online softmax; the full
// score matrix never exists. Work item: one (sequence b, KV head, group of row tiles, KV split).
// The "rows" of a KV head are its Sq·G query rows (query i, head-in-group g) → row i·G + g, so a
// decode step (Sq = 1) of G query heads is one 16-row MMA tile and every K/V element is loaded
// and dequantized once for the whole query group. Each warp owns one 16-row tile and walks the
// KV in steps of 16 tokens (mma.sync.m16n8k16, fp32 accumulation):
//
// * S = Q·Kᵀ: A = q (exact fp16/bf16), B = the raw int4 codes converted to q's type (exact small
//   integers, by the magic-number trick); the per-token scale/zero are applied to the fp32
//   result: score = sm_scale · s_k · (q·c − z_k · Σq). Head_dim is permuted identically for
//   q and k so that each thread reads one 16-byte (D = 128) run of codes per token.
// * O += P·V: A = P (fp16, in [0, 1]), B = V dequantized to fp16, s_v · (c − z_v) (exact code
//   difference, one rounding). Tokens and head_dim are again permuted so a thread reads 8 bytes
//   per token; the output is written back in natural order. fp16 is used for P·V for bf16 q as
//   well (the fp16 scale is exact there); |dequantized V| must stay below 65504.
// * Decode (≤ 16 rows): the 4 warps of a CTA split the KV of one row tile and merge in shared
//   memory; across CTAs the sequence is split (split-KV) with a final reduction kernel when the
//   batch alone cannot fill the GPU. Split sizes come from the cache capacity (or the host's
//   max_seqlen hint), never from the device lengths: no host synchronisation.
// * Prefill (many rows): 4 row tiles per CTA, each warp walks the KV up to its causal limit.
//
// Variable lengths: sequence b has seqlens[b] tokens; tokens past a row's (causal) limit are
// masked, and loads clamp to the last valid token so nothing out of bounds or uninitialised is
// read. Bad lengths / unallocated pages are recorded in the status word (kv_status.h), so the
// next KV call raises; a bad length gives a NaN output for that sequence, an unallocated page is
// read as page 0 (in bounds, wrong values).
//
// fp32 q takes a plain CUDA-core kernel (one CTA per query row and head), exact to float32
// rounding — the reference's precision, for tests and tools, not for speed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "attention/kv_common.cuh"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/int4.cuh"
#include "common/mma.cuh"

namespace ostquant {
namespace {

constexpr int kWarps = 4;      // warps per CTA
constexpr int kStep = 16;      // tokens per step
constexpr int kTileRows = 16;  // query rows per warp tile
constexpr float kLog2e = 1.4426950408889634f;

// ------------------------------------------------------------------------------ helpers

__device__ __forceinline__ float fast_exp2(float x) {
#if defined(OSTQ_SIMT_EMU)  // tests/simt
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

template <typename T>
struct MmaType;

template <>
struct MmaType<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both halves
  __device__ static __forceinline__ uint32_t codes(uint32_t nibbles) {
    // (1024 + c + 8) − 1032 = c, exact
    const __half2 h = __hsub2(*reinterpret_cast<const __half2*>(&nibbles),
                              __half2half2(__ushort_as_half(0x6408)));  // 1032.0
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    mma_16816<__half>(c, a, b0, b1);
  }
};

template <>
struct MmaType<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in both halves
  __device__ static __forceinline__ uint32_t codes(uint32_t nibbles) {
    // (128 + c + 8) − 136 = c, exact (bf16 integers up to 256 are exact)
    const __nv_bfloat162 h = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&nibbles),
                                     __bfloat162bfloat162(__ushort_as_bfloat16(0x4308)));
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    mma_16816<__nv_bfloat16>(c, a, b0, b1);
  }
};

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// lo, hi rounded to T and packed into one word (lo in the low half), as pack_half2 for fp16
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) { return pack_half2(lo, hi); }
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ float half_lo(uint32_t x) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(x & 0xFFFF)));
}
__device__ __forceinline__ float half_hi(uint32_t x) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(x >> 16)));
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <int N>
__device__ __forceinline__ void load_words(const uint8_t* p, uint32_t (&w)[N]) {
  static_assert(N == 1 || N == 2 || N == 4, "1, 2 or 4 words");
  if constexpr (N == 4) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else if constexpr (N == 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x; w[1] = v.y;
  } else {
    w[0] = __ldg(reinterpret_cast<const uint32_t*>(p));
  }
}

// Per-launch geometry (host-computed, see plan()).
struct Plan {
  int rows;            // Sq · group
  int row_tiles;       // ceil(rows / 16)
  int W;               // warps per row tile (1, 2, 4)
  int tiles_per_cta;   // 4 / W
  int row_groups;      // ceil(row_tiles / tiles_per_cta)
  int splits;          // KV splits across CTAs
  int64_t split_steps; // 16-token steps per split (the last split is open-ended)
};

struct AttnParams {
  KvAttnArgs a;
  Plan p;
  float scale_log2;    // sm_scale · log2(e)
};

// ------------------------------------------------------------------------------ the kernel

template <int D>
struct StepData {
  uint32_t kw[2][D / 32];  // K codes: 2 token columns (n-tiles), D/8 bytes each
  uint32_t vw[4][D / 64];  // V codes: 4 tokens, D/16 bytes each
  uint32_t sz;             // (scale, zero) fp16 pair of one token of K (lanes 0-15) or V (16-31)
};

template <int D>
__device__ __forceinline__ void load_step(const KvAttnArgs& a, int b, int kvh, int64_t t0,
                                          int64_t last_tok, int lane, StepData<D>& sd) {
  const KvLayout& lay = a.lay;
  const int g = lane >> 2, j = lane & 3;
  int page = kv_page(lay, b, t0);
  if (page < 0) {
    if (lane == 0) kv_report(lay, kKvAttnNoPage, b);
    page = 0;  // stay in bounds; the status word makes the next call raise
  }
  const int64_t slot0 = kv_slot(lay, t0);
  auto slot_of = [&](int tau) { return slot0 + (min(t0 + tau, last_tok) - t0); };
  auto row_of = [&](int tau) { return kv_row(lay, page, slot_of(tau), kvh); };
  const uint8_t* kc = static_cast<const uint8_t*>(a.cache.k_codes);
  const uint8_t* vc = static_cast<const uint8_t*>(a.cache.v_codes);
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    load_words<D / 32>(kc + row_of(8 * nt + g) * (D / 2) + j * (D / 8), sd.kw[nt]);
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int tau = 2 * j + (k & 1) + 8 * (k >> 1);
    load_words<D / 64>(vc + row_of(tau) * (D / 2) + g * (D / 16), sd.vw[k]);
  }
  const int64_t srow = kv_sc_index(lay, page, slot_of(lane & 15), kvh);
  const unsigned short* sp = static_cast<const unsigned short*>(lane < 16 ? a.cache.k_scale : a.cache.v_scale);
  const unsigned short* zp = static_cast<const unsigned short*>(lane < 16 ? a.cache.k_zero : a.cache.v_zero);
  sd.sz = static_cast<uint32_t>(__ldg(sp + srow)) | (static_cast<uint32_t>(__ldg(zp + srow)) << 16);
}

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32, 3) kv_attn_mma_kernel(const __grid_constant__ AttnParams P) {
  constexpr int KS = D / 16;  // k-steps of Q·Kᵀ
  constexpr int NT = D / 8;   // n-tiles of P·V
  constexpr int CH = D / 4;   // q elements per thread per row
  using M = MmaType<T>;
  extern __shared__ float smem[];

  const KvAttnArgs& a = P.a;
  const Plan& pl = P.p;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, j = lane & 3;
  const int b = blockIdx.x / pl.row_groups;
  const int rg = blockIdx.x % pl.row_groups;
  const int kvh = blockIdx.y;
  const int split = blockIdx.z;
  const int W = pl.W;
  const int tile = rg * pl.tiles_per_cta + warp / W;
  const int wi = warp % W;
  const bool tile_ok = tile < pl.row_tiles;

  // ---- lengths
  const KvLayout& lay = a.lay;
  const int64_t L = kv_seqlen(lay, b);
  const bool bad = L < a.Sq || L > lay.capacity;
  if (bad && threadIdx.x == 0 && rg == 0 && kvh == 0 && split == 0) kv_report(lay, kKvAttnBadLen, b);
  const int64_t Lc = bad ? 0 : L;  // a bad sequence attends nothing: NaN output
  auto limit = [&](int r) -> int64_t {  // keys [0, limit) are visible to row r
    if (bad) return 0;
    if (!a.causal) return Lc;
    const int64_t i = r / a.group;
    return min(Lc - a.Sq + i + 1, Lc);
  };

  // ---- this warp's rows and their q fragments (head_dim permuted, see the file comment)
  const int r0 = tile * kTileRows + g, r1 = r0 + 8;
  const bool ok0 = tile_ok && r0 < pl.rows, ok1 = tile_ok && r1 < pl.rows;
  const int64_t lim0 = ok0 ? limit(r0) : 0, lim1 = ok1 ? limit(r1) : 0;
  auto out_row = [&](int r) -> int64_t {
    const int i = r / a.group, gq = r % a.group;
    return (static_cast<int64_t>(b) * a.Sq + i) * a.Hq + static_cast<int64_t>(kvh) * a.group + gq;
  };
  uint32_t qa[KS][4];
  float qsum0 = 0.f, qsum1 = 0.f;
  {
    uint32_t q0[CH / 2], q1[CH / 2];
    const T* qp = static_cast<const T*>(a.q);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const bool ok = half ? ok1 : ok0;
      uint32_t* dst = half ? q1 : q0;
      if (ok) {
        const uint4* src = reinterpret_cast<const uint4*>(qp + out_row(half ? r1 : r0) * D + j * CH);
#pragma unroll
        for (int v = 0; v < CH / 8; ++v) {
          const uint4 x = __ldg(src + v);
          dst[4 * v] = x.x; dst[4 * v + 1] = x.y; dst[4 * v + 2] = x.z; dst[4 * v + 3] = x.w;
        }
      } else {
#pragma unroll
        for (int v = 0; v < CH / 2; ++v) dst[v] = 0u;
      }
    }
#pragma unroll
    for (int v = 0; v < CH / 2; ++v) {
      const T* e0 = reinterpret_cast<const T*>(&q0[v]);
      const T* e1 = reinterpret_cast<const T*>(&q1[v]);
      qsum0 += to_float(e0[0]) + to_float(e0[1]);
      qsum1 += to_float(e1[0]) + to_float(e1[1]);
    }
#pragma unroll
    for (int s = 0; s < KS; ++s) {
      qa[s][0] = __byte_perm(q0[2 * s], q0[2 * s + 1], 0x5410);  // (q[4s], q[4s+2])
      qa[s][1] = __byte_perm(q1[2 * s], q1[2 * s + 1], 0x5410);
      qa[s][2] = __byte_perm(q0[2 * s], q0[2 * s + 1], 0x7632);  // (q[4s+1], q[4s+3])
      qa[s][3] = __byte_perm(q1[2 * s], q1[2 * s + 1], 0x7632);
    }
    qsum0 += __shfl_xor_sync(kFullMask, qsum0, 1);
    qsum0 += __shfl_xor_sync(kFullMask, qsum0, 2);
    qsum1 += __shfl_xor_sync(kFullMask, qsum1, 1);
    qsum1 += __shfl_xor_sync(kFullMask, qsum1, 2);
  }

  // ---- the steps this warp walks
  const int last_row = tile_ok ? min(tile * kTileRows + kTileRows - 1, pl.rows - 1) : 0;
  const int64_t warp_lim = tile_ok ? limit(last_row) : 0;  // rows are ordered by query position
  const int64_t n_steps = warp_lim > 0 ? (warp_lim + kStep - 1) / kStep : 0;
  const int64_t s_begin = static_cast<int64_t>(split) * pl.split_steps;
  const int64_t s_end = split == pl.splits - 1 ? n_steps : min(n_steps, s_begin + pl.split_steps);
  const int64_t last_tok = Lc - 1;

  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  float o[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;

  int64_t st = s_begin + wi;
  StepData<D> cur;
  if (st < s_end) load_step<D>(a, b, kvh, st * kStep, last_tok, lane, cur);
  for (; st < s_end; st += W) {
    StepData<D> nxt;
    if (st + W < s_end) load_step<D>(a, b, kvh, (st + W) * kStep, last_tok, lane, nxt);
    const int64_t t0 = st * kStep;

    // per-token (scale, zero) of the 4 tokens this thread's scores / V rows belong to:
    // k = 0..3 ↔ tokens 2j, 2j+1, 2j+8, 2j+9 of the step
    float ks[4], kz[4];
    uint32_t vsz[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int tau = 2 * j + (k & 1) + 8 * (k >> 1);
      const uint32_t ksz = __shfl_sync(kFullMask, cur.sz, tau);
      vsz[k] = __shfl_sync(kFullMask, cur.sz, 16 + tau);
      ks[k] = half_lo(ksz) * P.scale_log2;
      kz[k] = half_hi(ksz);
    }

    // ---- S = Q·Kᵀ on raw codes
    float sc[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
      for (int w = 0; w < D / 32; ++w) {
        const uint32_t x = cur.kw[nt][w] ^ 0x88888888u;  // code c -> unsigned c + 8
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const uint32_t r = __byte_perm(x, 0u, hf ? 0x4342 : 0x4140);  // bytes (2hf, 2hf+1)
          const uint32_t b0 = M::codes((r & 0x000F000Fu) | M::kMagic);
          const uint32_t b1 = M::codes(((r >> 4) & 0x000F000Fu) | M::kMagic);
          M::mma(sc[nt], qa[2 * w + hf], b0, b1);
        }
      }
    }

    // ---- scale, mask, online softmax (log2 domain)
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int k = 2 * nt + c;
        const int64_t t = t0 + 8 * nt + 2 * j + c;
        float x0 = (sc[nt][c] - kz[k] * qsum0) * ks[k];
        float x1 = (sc[nt][2 + c] - kz[k] * qsum1) * ks[k];
        x0 = t < lim0 ? x0 : -INFINITY;
        x1 = t < lim1 ? x1 : -INFINITY;
        sc[nt][c] = x0;
        sc[nt][2 + c] = x1;
        mx0 = fmaxf(mx0, x0);
        mx1 = fmaxf(mx1, x1);
      }
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(kFullMask, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(kFullMask, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(kFullMask, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(kFullMask, mx1, 2));
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float mu0 = mn0 == -INFINITY ? 0.f : mn0, mu1 = mn1 == -INFINITY ? 0.f : mn1;
    const float al0 = fast_exp2(m0 - mu0), al1 = fast_exp2(m1 - mu1);
    m0 = mn0;
    m1 = mn1;
    float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        sc[nt][c] = fast_exp2(sc[nt][c] - mu0);
        sc[nt][2 + c] = fast_exp2(sc[nt][2 + c] - mu1);
        ps0 += sc[nt][c];
        ps1 += sc[nt][2 + c];
      }
    }
    l0 = l0 * al0 + ps0;
    l1 = l1 * al1 + ps1;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      o[nt][0] *= al0; o[nt][1] *= al0;
      o[nt][2] *= al1; o[nt][3] *= al1;
    }

    // ---- O += P·V (fp16)
    uint32_t pa[4];
    pa[0] = pack_half2(sc[0][0], sc[0][1]);
    pa[1] = pack_half2(sc[0][2], sc[0][3]);
    pa[2] = pack_half2(sc[1][0], sc[1][1]);
    pa[3] = pack_half2(sc[1][2], sc[1][3]);
    // (1032 + z, s) of tokens (2j, 2j+1) and (2j+8, 2j+9)
    const __half2 z01 = __floats2half2_rn(1032.f + half_hi(vsz[0]), 1032.f + half_hi(vsz[1]));
    const __half2 z23 = __floats2half2_rn(1032.f + half_hi(vsz[2]), 1032.f + half_hi(vsz[3]));
    const uint32_t s01u = (vsz[0] & 0xFFFFu) | (vsz[1] << 16);
    const uint32_t s23u = (vsz[2] & 0xFFFFu) | (vsz[3] << 16);
    const __half2 s01 = *reinterpret_cast<const __half2*>(&s01u);
    const __half2 s23 = *reinterpret_cast<const __half2*>(&s23u);
    auto dq = [](uint32_t nib, __half2 z, __half2 s) -> uint32_t {
      const uint32_t hbits = nib | 0x64006400u;  // 1024 + c + 8
      const __half2 v = __hmul2(__hsub2(*reinterpret_cast<const __half2*>(&hbits), z), s);
      return *reinterpret_cast<const uint32_t*>(&v);
    };
#pragma unroll
    for (int w = 0; w < D / 64; ++w) {
      const uint32_t x0 = cur.vw[0][w] ^ 0x88888888u, x1 = cur.vw[1][w] ^ 0x88888888u;
      const uint32_t x2 = cur.vw[2][w] ^ 0x88888888u, x3 = cur.vw[3][w] ^ 0x88888888u;
#pragma unroll
      for (int by = 0; by < 4; ++by) {
        const uint32_t sel = static_cast<uint32_t>(by) | (static_cast<uint32_t>(4 + by) << 8);
        const uint32_t r01 = __byte_perm(x0, x1, sel);  // byte `by` of tokens 2j | 2j+1
        const uint32_t r23 = __byte_perm(x2, x3, sel);  // byte `by` of tokens 2j+8 | 2j+9
        const int nt = w * 8 + by * 2;  // low nibble: d offset nt; high nibble: nt + 1
        MmaType<__half>::mma(o[nt], pa, dq(r01 & 0x000F000Fu, z01, s01),
                             dq(r23 & 0x000F000Fu, z23, s23));
        MmaType<__half>::mma(o[nt + 1], pa, dq((r01 >> 4) & 0x000F000Fu, z01, s01),
                             dq((r23 >> 4) & 0x000F000Fu, z23, s23));
      }
    }
    cur = nxt;
  }

  // ---- finish the row sums (each thread summed its own columns)
  l0 += __shfl_xor_sync(kFullMask, l0, 1);
  l0 += __shfl_xor_sync(kFullMask, l0, 2);
  l1 += __shfl_xor_sync(kFullMask, l1, 1);
  l1 += __shfl_xor_sync(kFullMask, l1, 2);

  // ---- merge the W warps of a row tile (decode) through shared memory
  if (W > 1) {
    constexpr int kPer = 4 * 32 + NT * 4 * 32;  // floats per warp
    float* mine = smem + warp * kPer;
    if (wi > 0) {
      mine[lane] = m0; mine[32 + lane] = m1; mine[64 + lane] = l0; mine[96 + lane] = l1;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) mine[128 + (nt * 4 + c) * 32 + lane] = o[nt][c];
      }
    }
    __syncthreads();
    if (wi == 0) {
      float M0 = m0, M1 = m1;
      for (int w = 1; w < W; ++w) {
        const float* th = smem + (warp + w) * kPer;
        M0 = fmaxf(M0, th[lane]);
        M1 = fmaxf(M1, th[32 + lane]);
      }
      const float u0 = M0 == -INFINITY ? 0.f : M0, u1 = M1 == -INFINITY ? 0.f : M1;
      float f0 = fast_exp2(m0 - u0), f1 = fast_exp2(m1 - u1);
      l0 *= f0;
      l1 *= f1;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        o[nt][0] *= f0; o[nt][1] *= f0; o[nt][2] *= f1; o[nt][3] *= f1;
      }
      for (int w = 1; w < W; ++w) {
        const float* th = smem + (warp + w) * kPer;
        f0 = fast_exp2(th[lane] - u0);
        f1 = fast_exp2(th[32 + lane] - u1);
        l0 += th[64 + lane] * f0;
        l1 += th[96 + lane] * f1;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          o[nt][0] += th[128 + (nt * 4 + 0) * 32 + lane] * f0;
          o[nt][1] += th[128 + (nt * 4 + 1) * 32 + lane] * f0;
          o[nt][2] += th[128 + (nt * 4 + 2) * 32 + lane] * f1;
          o[nt][3] += th[128 + (nt * 4 + 3) * 32 + lane] * f1;
        }
      }
      m0 = M0;
      m1 = M1;
    }
  }
  if (wi != 0 || !tile_ok) return;

  // ---- epilogue: this thread holds head_dim [j·D/4, (j+1)·D/4) of rows r0 and r1:
  // d = 2j·D/8 + nt  <- o[nt][0 | 2],   d = (2j+1)·D/8 + nt  <- o[nt][1 | 3]
  const int64_t R = static_cast<int64_t>(lay.B) * a.Sq * a.Hq;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const bool ok = half ? ok1 : ok0;
    if (!ok) continue;
    const int64_t orow = out_row(half ? r1 : r0);
    const float m = half ? m1 : m0, l = half ? l1 : l0;
    if (pl.splits == 1) {
      T* dst = static_cast<T*>(a.out) + orow * D + j * CH;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        Vec<T, NT> v;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) v.v[nt] = from_float<T>(o[nt][2 * half + c] / l);
        // NT elements = 16 or 32 bytes: store as 16-byte pieces
        constexpr int kPieces = NT * sizeof(T) / 16;
        const uint4* vs = reinterpret_cast<const uint4*>(&v);
        uint4* dp = reinterpret_cast<uint4*>(dst + c * NT);
#pragma unroll
        for (int pc = 0; pc < kPieces; ++pc) dp[pc] = vs[pc];
      }
    } else {
      float* dst = a.part_o + (static_cast<int64_t>(split) * R + orow) * D + j * CH;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
#pragma unroll
        for (int nt = 0; nt < NT; nt += 4) {
          *reinterpret_cast<float4*>(dst + c * NT + nt) =
              make_float4(o[nt][2 * half + c], o[nt + 1][2 * half + c], o[nt + 2][2 * half + c],
                          o[nt + 3][2 * half + c]);
        }
      }
      if (j == 0) {
        *reinterpret_cast<float2*>(a.part_ml + (static_cast<int64_t>(split) * R + orow) * 2) =
            make_float2(m, l);
      }
    }
  }
}

// Merge the splits of every output row: one warp per row, each lane E = D/32 consecutive
// elements, read and written as one vector (16 / 8 bytes of partials per lane: coalesced, where
// E scalar loads were 4 bytes out of every 16 per request; tests/simt/memprof.py).
template <typename T, int D>
__global__ void __launch_bounds__(256) kv_attn_combine_kernel(const float* __restrict__ part_o,
                                                              const float* __restrict__ part_ml,
                                                              T* __restrict__ out, int64_t R,
                                                              int splits) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (row >= R) return;
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, part_ml[(s * R + row) * 2]);
  const float u = M == -INFINITY ? 0.f : M;
  float acc[E] = {};
  float l = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float2 ml = *reinterpret_cast<const float2*>(part_ml + (s * R + row) * 2);
    const float f = fast_exp2(ml.x - u);
    l += ml.y * f;
    const Vec<float, E> po = load_vec<float, E>(part_o + (s * R + row) * D + lane * E);
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] += po.v[e] * f;
  }
  // packed into 32-bit words and stored as one 8- / 4-byte value (nvcc copies a struct of
  // __half / __nv_bfloat16 member by member: 16-bit stores)
  static_assert(E == 2 || E == 4, "head_dim 64 or 128");
  uint32_t w[E / 2];
#pragma unroll
  for (int e = 0; e < E / 2; ++e) w[e] = pack2<T>(acc[2 * e] / l, acc[2 * e + 1] / l);
  T* dst = out + row * D + lane * E;
  if constexpr (E == 4) {  // (a uint2 store came out as two 32-bit stores)
    *reinterpret_cast<unsigned long long*>(dst) =
        static_cast<unsigned long long>(w[0]) | (static_cast<unsigned long long>(w[1]) << 32);
  } else {
    *reinterpret_cast<uint32_t*>(dst) = w[0];
  }
}

// ------------------------------------------------------------------------------ fp32 kernel

template <int D>
__global__ void __launch_bounds__(128) kv_attn_f32_kernel(const __grid_constant__ KvAttnArgs a) {
  constexpr int NTH = 128;
  __shared__ float qs[D];
  __shared__ float ps[NTH];
  __shared__ float red[NTH / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.x / a.Sq, i = blockIdx.x % a.Sq;
  const int hq = blockIdx.y, kvh = hq / a.group;
  const KvLayout& lay = a.lay;
  const int64_t L = kv_seqlen(lay, b);
  const bool bad = L < a.Sq || L > lay.capacity;
  if (bad && tid == 0 && i == 0 && hq == 0) kv_report(lay, kKvAttnBadLen, b);
  const int64_t lim = bad ? 0 : (a.causal ? L - a.Sq + i + 1 : L);
  const int64_t orow = (static_cast<int64_t>(b) * a.Sq + i) * a.Hq + hq;
  const float* q = static_cast<const float*>(a.q) + orow * D;
  for (int d = tid; d < D; d += NTH) qs[d] = q[d];
  __syncthreads();

  const uint8_t* kc = static_cast<const uint8_t*>(a.cache.k_codes);
  const uint8_t* vc = static_cast<const uint8_t*>(a.cache.v_codes);
  const __half* ksc = static_cast<const __half*>(a.cache.k_scale);
  const __half* kzr = static_cast<const __half*>(a.cache.k_zero);
  const __half* vsc = static_cast<const __half*>(a.cache.v_scale);
  const __half* vzr = static_cast<const __half*>(a.cache.v_zero);
  auto page_of = [&](int64_t t) {
    const int page = kv_page(lay, b, t);
    if (page >= 0) return page;
    kv_report(lay, kKvAttnNoPage, b);
    return 0;
  };
  auto block_reduce = [&](float v, bool is_max) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float o = __shfl_xor_sync(kFullMask, v, off);
      v = is_max ? fmaxf(v, o) : v + o;
    }
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < NTH / 32; ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
    __syncthreads();
    return r;
  };

  float m = -INFINITY, l = 0.f, o = 0.f;
  for (int64_t t0 = 0; t0 < lim; t0 += NTH) {
    const int64_t t = t0 + tid;
    float s = -INFINITY;
    if (t < lim) {
      const int page = page_of(t);
      const int64_t slot = kv_slot(lay, t), si = kv_sc_index(lay, page, slot, kvh);
      const float sc = __half2float(ksc[si]), z = __half2float(kzr[si]);
      const uint8_t* c = kc + kv_row(lay, page, slot, kvh) * (D / 2);
      float dot = 0.f;
      for (int k = 0; k < D / 2; ++k) {
        const uint8_t by = c[k];
        dot += qs[2 * k] * ((static_cast<float>(unpack_int4_lo(by)) - z) * sc);
        dot += qs[2 * k + 1] * ((static_cast<float>(unpack_int4_hi(by)) - z) * sc);
      }
      s = dot * a.sm_scale;
    }
    const float mx = block_reduce(s, true);
    const float mn = fmaxf(m, mx);
    const float mu = mn == -INFINITY ? 0.f : mn;
    const float p = t < lim ? expf(s - mu) : 0.f;
    const float alpha = expf(m - mu);
    ps[tid] = p;
    l = l * alpha + block_reduce(p, false);  // (its syncs also publish ps)
    m = mn;
    if (tid < D) {
      o *= alpha;
      const int64_t n = min(static_cast<int64_t>(NTH), lim - t0);
      for (int64_t tt = 0; tt < n; ++tt) {
        const int page = page_of(t0 + tt);
        const int64_t slot = kv_slot(lay, t0 + tt), si = kv_sc_index(lay, page, slot, kvh);
        const uint8_t by = vc[kv_row(lay, page, slot, kvh) * (D / 2) + tid / 2];
        const float c = static_cast<float>((tid & 1) ? unpack_int4_hi(by) : unpack_int4_lo(by));
        o += ps[tt] * ((c - __half2float(vzr[si])) * __half2float(vsc[si]));
      }
    }
    __syncthreads();
  }
  if (tid < D) static_cast<float*>(a.out)[orow * D + tid] = o / l;
}

// ------------------------------------------------------------------------------ host side

Plan plan(const KvAttnArgs& a) {
  Plan p{};
  p.rows = a.Sq * a.group;
  p.row_tiles = (p.rows + kTileRows - 1) / kTileRows;
  p.W = p.row_tiles >= 3 ? 1 : (p.row_tiles == 2 ? 2 : 4);
  p.tiles_per_cta = kWarps / p.W;
  p.row_groups = (p.row_tiles + p.tiles_per_cta - 1) / p.tiles_per_cta;
  int64_t hint = a.lay.capacity;
  if (a.max_seqlen > 0) hint = std::min<int64_t>(hint, a.max_seqlen);
  const int64_t steps = std::max<int64_t>(1, (hint + kStep - 1) / kStep);
  const int64_t base = static_cast<int64_t>(a.lay.B) * a.lay.Hkv * p.row_groups;
  const int64_t target = 4 * static_cast<int64_t>(sm_count());
  int64_t splits = 1;
  if (base < target) splits = (target + base - 1) / base;
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, steps / (2 * p.W)));
  splits = std::min<int64_t>(splits, 128);
  p.split_steps = (steps + splits - 1) / splits;
  p.splits = static_cast<int>((steps + p.split_steps - 1) / p.split_steps);
  return p;
}

template <typename T, int D>
cudaError_t launch_mma(const KvAttnArgs& a, cudaStream_t stream) {
  AttnParams P;
  P.a = a;
  P.p = plan(a);
  P.scale_log2 = a.sm_scale * kLog2e;
  if (P.p.splits > 1 && (a.part_o == nullptr || a.part_ml == nullptr)) return cudaErrorInvalidValue;
  const int64_t gx = static_cast<int64_t>(a.lay.B) * P.p.row_groups;
  if (gx > 0x7fffffff || a.lay.Hkv > 65535 || P.p.splits > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(gx), a.lay.Hkv, P.p.splits);
  const size_t smem = P.p.W > 1 ? kWarps * (4 * 32 + (D / 8) * 4 * 32) * sizeof(float) : 0;
  kv_attn_mma_kernel<T, D><<<grid, kWarps * 32, smem, stream>>>(P);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || P.p.splits == 1) return err;
  const int64_t R = static_cast<int64_t>(a.lay.B) * a.Sq * a.Hq;
  const int64_t blocks = (R + 7) / 8;
  kv_attn_combine_kernel<T, D><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      a.part_o, a.part_ml, static_cast<T*>(a.out), R, P.p.splits);
  return cudaGetLastError();
}

template <int D>
cudaError_t launch_f32(const KvAttnArgs& a, cudaStream_t stream) {
  const int64_t gx = static_cast<int64_t>(a.lay.B) * a.Sq;
  if (gx > 0x7fffffff || a.Hq > 65535) return cudaErrorInvalidConfiguration;
  kv_attn_f32_kernel<D><<<dim3(static_cast<unsigned>(gx), a.Hq), 128, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

int kv_attention_splits(FloatType type, const KvAttnArgs& args) {
  if (type == FloatType::kFloat32) return 1;
  return plan(args).splits;
}

cudaError_t launch_kv_attention(FloatType type, const KvAttnArgs& a, cudaStream_t stream) {
  if (a.lay.B == 0 || a.Sq == 0 || a.Hq == 0) return cudaSuccess;
  switch (type) {
    case FloatType::kFloat16:
      if (a.lay.D == 64) return launch_mma<__half, 64>(a, stream);
      if (a.lay.D == 128) return launch_mma<__half, 128>(a, stream);
      break;
    case FloatType::kBFloat16:
      if (a.lay.D == 64) return launch_mma<__nv_bfloat16, 64>(a, stream);
      if (a.lay.D == 128) return launch_mma<__nv_bfloat16, 128>(a, stream);
      break;
    case FloatType::kFloat32:
      if (a.lay.D == 64) return launch_f32<64>(a, stream);
      if (a.lay.D == 128) return launch_f32<128>(a, stream);
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace ostquant
