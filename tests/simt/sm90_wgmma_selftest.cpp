// Self-tests of sm90_wgmma.h (wgmma emulation) and its overlay route (sm90_overlay_wgmma.py):
// built and run by sm90_spike.py (the unit's flags, simt_emu.h + sm90_prelude.h force-included,
// the sm90 overlay on the include path, sm90_spike_stubs.cpp). Exit status 0 and
// "sm90 wgmma selftest: ALL OK" when every check passes.
//
//  1. Fragment layouts: the emulator's A (s8 k32, f16/bf16 k16) and D maps against cute's
//     MMA_Traits (ALayout_64x32 / ALayout_64x16 / CLayout_64xN) for the six RS atoms of the
//     eight instantiations; negative controls: the other type's A map and a D map with the
//     column blocks swapped disagree with cute.
//  2. The kernel's tile (Sm90Int4Gemm w4a4_t128_f16, w4a4_t64_bf16, w4a16_t64_f16,
//     w4a16_t128_bf16): the TiledMma's atom is the expected one; the GMMA descriptors cute
//     builds for the kernel's swizzled smem B (make_fragment_B, every k-block and stage) decode
//     to the addresses of cute's own sB(n, k, stage) (negative control: without the swizzle XOR
//     they do not); then a full emulated mainloop through cute::gemm (the overlay's atoms) on
//     256 threads (2 consumer warp groups): A registers from cute's partition_fragment_A, B
//     in the kernel's smem layout, 3 k-tiles x 4 k-blocks with warpgroup_arrive / gemm /
//     commit / wait<3>, A k-block registers rewritten after the wait that frees them (as the
//     mainloop does), wait<0>; against a direct product: s8 exact, f16/bf16 bit-exact against
//     the documented k-order (the test data are order-sensitive: a reversed-k reference
//     differs), with scale-d 0 (garbage accumulators) and scale-d 1 (preloaded accumulators).
//  3. Asynchrony and hazards (direct wgmma_rs calls, m64n64k32 s8): D reads before the wait
//     give the poison, after it the product; B is read at the wait; chained same-accumulator
//     wgmmas in two groups; A-hazard (at a fence, and at a wait that leaves the op pending);
//     a D register written in flight; missing wgmma.fence (first wgmma, and an A register
//     rewritten after a wait without a new fence; with the fence: fine); a warp group with a
//     missing warp (deadlock), a returned warp, threads at different wgmma instructions,
//     a different wait count; a thread exiting with wgmmas in flight; an incomplete warp
//     group; an unsupported (interleaved) descriptor.
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda.h>
#include <cuda_runtime_api.h>

#include "gemm/sm90/kernel.cuh"

#include "sm90_selftest_util.h"

namespace {
using namespace cute;
namespace wg = ::ostq_emu::sm90;

using namespace ostq_selftest;  // check, error_of, has, g_fail

uint32_t g_rng = 12345;
uint32_t rnd() {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 17;
  g_rng ^= g_rng << 5;
  return g_rng;
}

void kernel_key() {}  // the launches' function key (dynamic shared memory opt-in)
const void* key() { return reinterpret_cast<const void*>(&kernel_key); }

// ------------------------------------------------------------------ 1. fragment layouts
template <class Traits, int N, wg::WgType T>
void check_layouts(const char* name) {
  using AL = typename Traits::ALayout;
  using CL = typename Traits::CLayout;
  const wg::WgType other = T == wg::WgType::kS8 ? wg::WgType::kF16 : wg::WgType::kS8;
  int bad = 0, bad_other = 0, bad_d_swapped = 0;
  for (int thr = 0; thr < 128; ++thr) {
    for (int e = 0; e < int(size<1>(AL{})); ++e) {
      const int idx = AL{}(thr, e);  // (m, k) -> m + 64 k
      const auto c = wg::wgmma_a_coord(T, thr, e);
      bad += idx != c.row + 64 * c.col;
      const auto o = wg::wgmma_a_coord(other, thr, e % (other == wg::WgType::kS8 ? 16 : 8));
      bad_other += idx != o.row + 64 * o.col;
    }
    for (int v = 0; v < int(size<1>(CL{})); ++v) {
      const int idx = CL{}(thr, v);  // (m, n) -> m + 64 n
      const auto c = wg::wgmma_d_coord(thr, v);
      bad += idx != c.row + 64 * c.col;
      // negative control: register v of column block i read as block (i+1) mod N/8
      const auto s = wg::wgmma_d_coord(thr, (v + 4) % (N / 2));
      bad_d_swapped += idx != s.row + 64 * s.col;
    }
  }
  check(size<1>(CL{}) == N / 2, std::string(name) + ": D registers per thread");
  check(bad == 0, std::string(name) + ": " + std::to_string(bad) + " fragment elements differ from cute's layouts");
  check(bad_other > 0 && bad_d_swapped > 0, std::string(name) + ": negative controls agree with cute");
  std::printf("fragment layouts %-40s %s\n", name, bad ? "DIFFER" : "agree with cute");
}

// ------------------------------------------------------------------ 2. the kernel's tile
template <class E>
float to_f(E v) {
  return float(v);
}
// A / B test values: s8 any byte; f16 / bf16 a random mantissa (11 / 8 bits) times 2^e,
// e in [-8, 3], so that the fp32 sums round (the summation order shows)
template <class E>
E rnd_val() {
  if constexpr (std::is_same_v<E, int8_t>) {
    return static_cast<int8_t>(rnd());
  } else {
    constexpr int bits = std::is_same_v<E, cutlass::half_t> ? 11 : 8;
    const int m = int(rnd() % (1u << bits)) - (1 << (bits - 1));
    const int e = int(rnd() % 12) - 8;
    return E(std::ldexp(float(m) / float(1 << (bits - 1)), e));
  }
}

template <class G, class ExpectedOp>
void test_kernel_tile(const char* name, bool scale_d1) {
  using CM = typename G::CollectiveMainloop;
  using TiledMma = typename CM::TiledMma;
  static_assert(std::is_same_v<typename TiledMma::MMA_Op, ExpectedOp>, "the instantiation's wgmma atom");
  using ElementX = typename G::ElementX;
  using TS = typename CM::TensorStorage;
  constexpr int BM = size<0>(typename G::TileShape{}), BN = size<1>(typename G::TileShape{});
  constexpr int BK = size<2>(typename G::TileShape{});
  constexpr int Stages = CM::DispatchPolicy::Stages;
  constexpr int KT = 3;  // k-tiles
  constexpr bool kInt = std::is_same_v<ElementX, int8_t>;
  constexpr int kK = kInt ? 32 : 16, KB = BK / kK;
  static_assert(KB == 4, "4 k-blocks per k-tile (K_WAIT_MAX = 3)");
  using ElementA = std::conditional_t<kInt, int8_t, ElementX>;
  auto stage_of = [](int kt) { return (3 * kt + 1) % Stages; };

  // the test problem: A[kt][m][k], B[stage][n][k] (k within the k-tile), D0[m][n]
  std::vector<ElementA> A(size_t(KT) * BM * BK);
  std::vector<ElementX> B(size_t(Stages) * BN * BK);
  std::vector<float> D0(size_t(BM) * BN);
  std::vector<int32_t> D0i(size_t(BM) * BN);
  for (auto& v : A) v = rnd_val<ElementA>();
  for (auto& v : B) v = rnd_val<ElementX>();
  for (size_t i = 0; i < D0.size(); ++i) {
    D0[i] = std::ldexp(float(int(rnd() % 2001) - 1000), int(rnd() % 16) - 10);
    D0i[i] = int32_t(rnd());
  }
  auto a_at = [&](int kt, int m, int k) { return A[(size_t(kt) * BM + m) * BK + k]; };
  auto b_at = [&](int s, int n, int k) { return B[(size_t(s) * BN + n) * BK + k]; };

  std::vector<uint32_t> out(size_t(BM) * BN, 0);
  int bad_addr = 0, unswizzled_ok = 0, checked = 0;
  ostq_emu::funcSetAttribute(&kernel_key, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sizeof(TS)));
  const std::string err = error_of([&] {
    ostq_emu::launch(name, key(), dim3(1), dim3(256), sizeof(TS), nullptr, [&] {
      const int tid = threadIdx.x;
      TS& st = *reinterpret_cast<TS*>(ostq_emu::dyn_smem_base());
      Tensor sB = make_tensor(make_smem_ptr(st.smem_B.begin()), typename CM::SmemLayoutB{});  // (BN, BK, PIPE)
      if (tid == 0) {
        for (int s = 0; s < Stages; ++s)
          for (int n = 0; n < BN; ++n)
            for (int k = 0; k < BK; ++k) sB(n, k, s) = b_at(s, n, k);
      }
      __syncthreads();
      TiledMma tiled_mma;
      auto thr_mma = tiled_mma.get_thread_slice(tid);
      auto wg_slice = tiled_mma.get_slice(tid / 128 * 128);
      Tensor tCrB = wg_slice.make_fragment_B(wg_slice.partition_B(sB));  // GMMA descriptors (MMA,N,K,PIPE)
      if (tid % 128 == 0) {  // the descriptors vs cute's own element addresses
        for (int s = 0; s < Stages; ++s)
          for (int kb = 0; kb < KB; ++kb) {
            const auto d = wg::decode_gmma_desc(uint64_t(tCrB(0, 0, kb, s)));
            wg::GmmaDesc plain = d;  // negative control: the same rows without the swizzle
            for (int n = 0; n < BN; ++n)
              for (int k = 0; k < kK; ++k) {
                const uint32_t want = ostq_emu::smem_window_addr(&sB(n, kb * kK + k, s));
                bad_addr += wg::gmma_kmajor_addr(d, n, k * int(sizeof(ElementX))) != want;
                const uint32_t a = plain.start + (n / 8) * plain.sbo + (n % 8) * wg::gmma_span(plain.layout) +
                                   k * int(sizeof(ElementX));
                unswizzled_ok += a == want;
                ++checked;
              }
          }
      }
      Tensor cA = make_identity_tensor(make_shape(Int<BM>{}, Int<BK>{}));
      Tensor tCcA = thr_mma.partition_A(cA);              // (MMA, MMA_M, MMA_K) -> (m, k)
      // the A registers, made as the mainloop makes them (from its swizzled smem view of A)
      Tensor sA = as_position_independent_swizzle_tensor(
          make_tensor(make_smem_ptr(st.smem_A.begin()), typename CM::SmemLayoutA{}));
      Tensor tCrA = thr_mma.partition_fragment_A(sA(_, _, Int<0>{}));
      static_assert(decltype(size(tCrA) == size(tCcA))::value, "A fragment");
      Tensor cC = make_identity_tensor(make_shape(Int<BM>{}, Int<BN>{}));
      Tensor tCcC = thr_mma.partition_C(cC);
      Tensor accum = partition_fragment_C(tiled_mma, make_shape(Int<BM>{}, Int<BN>{}));
      static_assert(size<2>(decltype(tCrA){}) == KB, "k-blocks");
      auto load_a = [&](int kt, int kb) {
        for (int i = 0; i < size(tCrA(_, _, kb)); ++i) {
          const auto c = tCcA(_, _, kb)(i);
          tCrA(_, _, kb)(i) = a_at(kt, get<0>(c), get<1>(c));
        }
      };
      for (int i = 0; i < size(accum); ++i) {
        const int m = get<0>(tCcC(i)), n = get<1>(tCcC(i));
        if constexpr (kInt) {
          accum(i) = scale_d1 ? D0i[size_t(m) * BN + n] : int32_t(0x12345678);
        } else {
          accum(i) = scale_d1 ? D0[size_t(m) * BN + n] : 1.0e30f;
        }
      }
      for (int kb = 0; kb < KB; ++kb) load_a(0, kb);
      tiled_mma.accumulate_ = scale_d1 ? GMMA::ScaleOut::One : GMMA::ScaleOut::Zero;
      warpgroup_fence_operand(accum);
      for (int kt = 0; kt < KT; ++kt) {
        for (int kb = 0; kb < KB; ++kb) {
          warpgroup_arrive();
          cute::gemm(tiled_mma, tCrA(_, _, kb), tCrB(_, _, kb, stage_of(kt)), accum);
          tiled_mma.accumulate_ = GMMA::ScaleOut::One;
          warpgroup_commit_batch();
          warpgroup_wait<3>();  // the wgmma 3 back (k-block kb+1 of the previous k-tile) is done
          if (kb + 1 < KB && kt > 0) load_a(kt, kb + 1);
          if (kb + 1 == KB && kt + 1 < KT) load_a(kt + 1, 0);
        }
      }
      warpgroup_wait<0>();
      warpgroup_fence_operand(accum);
      for (int i = 0; i < size(accum); ++i) {
        uint32_t bits;
        std::memcpy(&bits, &accum(i), 4);
        out[size_t(get<0>(tCcC(i))) * BN + get<1>(tCcC(i))] = bits;
      }
    });
  });
  check(err.empty(), std::string(name) + ": launch failed: " + err);
  check(checked > 0 && bad_addr == 0, std::string(name) + ": " + std::to_string(bad_addr) + " of " +
        std::to_string(checked) + " B descriptor addresses differ from cute's sB");
  check(unswizzled_ok < checked, std::string(name) + ": negative control (no swizzle) matches cute");

  // references: k order within each wgmma, then added to the accumulator, wgmma after wgmma
  int bad = 0, order_sensitive = 0;
  double max_rel = 0;
  for (int m = 0; m < BM; ++m)
    for (int n = 0; n < BN; ++n) {
      uint32_t want;
      if constexpr (kInt) {
        long long acc = scale_d1 ? D0i[size_t(m) * BN + n] : 0;
        for (int kt = 0; kt < KT; ++kt)
          for (int k = 0; k < BK; ++k) acc += int(a_at(kt, m, k)) * int(b_at(stage_of(kt), n, k));
        want = uint32_t(acc);
      } else {
        float acc = scale_d1 ? D0[size_t(m) * BN + n] : 0.f, rev = acc;
        double exact = acc, mag = std::abs(acc);  // exact sum; sum of the magnitudes
        for (int kt = 0; kt < KT; ++kt)
          for (int kb = 0; kb < KB; ++kb) {
            float s = 0.f, r = 0.f;
            for (int k = 0; k < kK; ++k) {
              const int kk = kb * kK + k, kr = kb * kK + kK - 1 - k;
              s += to_f(a_at(kt, m, kk)) * to_f(b_at(stage_of(kt), n, kk));
              r += to_f(a_at(kt, m, kr)) * to_f(b_at(stage_of(kt), n, kr));
              const double p = double(to_f(a_at(kt, m, kk))) * double(to_f(b_at(stage_of(kt), n, kk)));
              exact += p;
              mag += std::abs(p);
            }
            acc = (kt == 0 && kb == 0 && !scale_d1) ? s : acc + s;
            rev = (kt == 0 && kb == 0 && !scale_d1) ? r : rev + r;
          }
        std::memcpy(&want, &acc, 4);
        order_sensitive += rev != acc;
        float got;
        std::memcpy(&got, &out[size_t(m) * BN + n], 4);
        max_rel = std::max(max_rel, std::abs(double(got) - exact) / std::max(1e-30, mag));
      }
      bad += out[size_t(m) * BN + n] != want;
    }
  check(bad == 0, std::string(name) + ": " + std::to_string(bad) + " of " + std::to_string(BM * BN) +
        " accumulators differ from the direct product");
  if constexpr (!kInt) {
    check(order_sensitive > 0, std::string(name) + ": test data not order-sensitive");
    // recursive fp32 summation of ~200 terms: |error| <= 200 * 2^-24 * sum |terms|
    check(max_rel < 200 * std::ldexp(1.0, -24), std::string(name) + ": far from the exact product (error / magnitude " +
          std::to_string(max_rel) + ")");
  }
  std::printf("kernel tile %-16s scale-d %d: descriptors %s, %d x %d x (%d x %d) wgmma %s%s\n", name,
              int(scale_d1), bad_addr ? "DIFFER" : "= cute's sB", BM, BN, KT, BK, bad ? "DIFFERS" : "= direct product",
              kInt ? " (exact)" : (" (bit-exact in k order; " + std::to_string(order_sensitive) +
                                   " elements order-sensitive)").c_str());
}

// ------------------------------------------------------------------ 3. asynchrony and hazards
// m64n64k32 s8 through wgmma_rs directly. B (64 rows x 32 bytes) in a SW128 K-major atom at the
// start of dynamic shared memory (window address 1024): rows 128 B apart, 8-row groups 1024 B.
constexpr int kN = 64, kND = kN / 2;
struct Regs {
  uint32_t a[4];
  uint32_t d[kND];
};
uint64_t test_desc(uint32_t layout = 1) {
  const uint64_t start = 1024 >> 4, sbo = 1024 >> 4, lbo = 1;
  return start | (lbo << 16) | (sbo << 32) | (uint64_t(layout) << 62);
}
int8_t a_val(int seed, int m, int k) { return int8_t((m * 7 + k * 3 + seed * 11) % 23 - 11); }
int8_t b_val(int seed, int n, int k) { return int8_t((n * 5 + k * 13 + seed * 3) % 19 - 9); }
// B into smem (thread 0), through the emulator's own address map (checked against cute above)
void fill_b(int seed) {
  const auto d = wg::decode_gmma_desc(test_desc());
  for (int n = 0; n < kN; ++n)
    for (int k = 0; k < 32; ++k) *ostq_emu::smem_window_ptr(wg::gmma_kmajor_addr(d, n, k), 1) = uint8_t(b_val(seed, n, k));
}
void fill_a(Regs& r, int seed) {
  const int t = threadIdx.x % 128;
  for (int e = 0; e < 16; ++e) {
    const auto c = wg::wgmma_a_coord(wg::WgType::kS8, t, e);
    r.a[e / 4] = (r.a[e / 4] & ~(0xFFu << (8 * (e % 4)))) | (uint32_t(uint8_t(a_val(seed, c.row, c.col))) << (8 * (e % 4)));
  }
}
int32_t ref(int sa, int sb, int m, int n) {
  int32_t s = 0;
  for (int k = 0; k < 32; ++k) s += a_val(sa, m, k) * b_val(sb, n, k);
  return s;
}
void issue(Regs& r, int scale_d, uint64_t desc = test_desc()) {
  void* d[kND];
  for (int v = 0; v < kND; ++v) d[v] = &r.d[v];
  const uint32_t* a[4] = {&r.a[0], &r.a[1], &r.a[2], &r.a[3]};
  wg::wgmma_rs<wg::WgType::kS8, kN>("test m64n64k32", a, desc, d, scale_d, 1, 1, 0);
}
std::string run(const char* name, int threads, const std::function<void(Regs&)>& body) {
  return error_of([&] {
    ostq_emu::launch(name, nullptr, dim3(1), dim3(threads), 8192, nullptr, [&] {
      if (threadIdx.x == 0) fill_b(0);
      __syncthreads();
      Regs r{};
      fill_a(r, 0);
      body(r);
    });
  });
}

void test_async() {
  // reading D before the wait gives the poison, after it the product; B read at the wait
  std::vector<uint32_t> before(128 * kND), after(128 * kND);
  std::string e = run("wg_poison", 128, [&](Regs& r) {
    const int t = threadIdx.x;
    wg::wgmma_fence();
    issue(r, 0);
    wg::wgmma_commit();
    for (int v = 0; v < kND; ++v) before[t * kND + v] = r.d[v];
    wg::wgmma_wait(0);
    for (int v = 0; v < kND; ++v) after[t * kND + v] = r.d[v];
  });
  int bad_before = 0, bad_after = 0;
  for (int t = 0; t < 128; ++t)
    for (int v = 0; v < kND; ++v) {
      const auto c = wg::wgmma_d_coord(t, v);
      const uint32_t want = uint32_t(ref(0, 0, c.row, c.col));
      bad_before += before[t * kND + v] == want || before[t * kND + v] != wg::kWgmmaPoison;
      bad_after += after[t * kND + v] != want;
    }
  check(e.empty() && bad_before == 0 && bad_after == 0,
        "D before the wait is the poison, after it the product (" + e + ")");

  // B is read when the wgmma completes: smem rewritten after the issue shows in the result;
  // two groups in flight chain on the same accumulators (scale-d 1 adds to the first's result)
  e = run("wg_chain", 128, [&](Regs& r) {
    const int t = threadIdx.x;
    wg::wgmma_fence();
    issue(r, 0);
    wg::wgmma_commit();
    Regs r2 = r;  // second op: other A registers, same accumulators
    fill_a(r2, 1);
    wg::wgmma_fence();
    {
      void* d[kND];
      for (int v = 0; v < kND; ++v) d[v] = &r.d[v];
      const uint32_t* a[4] = {&r2.a[0], &r2.a[1], &r2.a[2], &r2.a[3]};
      wg::wgmma_rs<wg::WgType::kS8, kN>("test m64n64k32", a, test_desc(), d, 1, 1, 1, 0);
    }
    wg::wgmma_commit();
    __syncthreads();
    if (t == 0) fill_b(2);  // both ops not completed yet: they read this B
    __syncthreads();
    wg::wgmma_wait(1);      // the first completes; its result goes to the second, not to D
    for (int v = 0; v < kND; ++v) before[t * kND + v] = r.d[v];
    wg::wgmma_wait(0);
    for (int v = 0; v < kND; ++v) after[t * kND + v] = r.d[v];
  });
  bad_before = bad_after = 0;
  for (int t = 0; t < 128; ++t)
    for (int v = 0; v < kND; ++v) {
      const auto c = wg::wgmma_d_coord(t, v);
      bad_before += before[t * kND + v] != wg::kWgmmaPoison;
      bad_after += after[t * kND + v] != uint32_t(ref(0, 2, c.row, c.col) + ref(1, 2, c.row, c.col));
    }
  check(e.empty() && bad_before == 0 && bad_after == 0, "chained wgmmas, B read at completion (" + e + ")");

  // A-hazard: an A register of an op in flight rewritten, seen at the next fence
  e = run("wg_ahazard", 128, [&](Regs& r) {
    wg::wgmma_fence();
    issue(r, 0);
    wg::wgmma_commit();
    if (threadIdx.x == 77) r.a[2] ^= 1;
    wg::wgmma_fence();
    wg::wgmma_wait(0);
  });
  check(has(e, "A-hazard") && has(e, "thread (77,"), "A-hazard at a fence reported: " + e);
  // ... and at a wait that leaves the op pending
  e = run("wg_ahazard_wait", 128, [&](Regs& r) {
    wg::wgmma_fence();
    issue(r, 0);
    wg::wgmma_commit();
    Regs r2{};
    fill_a(r2, 1);
    wg::wgmma_fence();
    issue(r2, 0);
    wg::wgmma_commit();
    if (threadIdx.x == 5) r2.a[0] += 1;
    wg::wgmma_wait(1);
    wg::wgmma_wait(0);
  });
  check(has(e, "A-hazard") && has(e, "wgmma.wait_group"), "A-hazard at a wait reported: " + e);
  // the same with wait<0> first: the completing wait does not check A (documented)
  e = run("wg_a_after_wait", 128, [&](Regs& r) {
    wg::wgmma_fence();
    issue(r, 0);
    wg::wgmma_commit();
    wg::wgmma_wait(0);
    r.a[0] += 1;  // legal: the op completed
    wg::wgmma_fence();
    issue(r, 0);
    wg::wgmma_commit();
    wg::wgmma_wait(0);
  });
  check(e.empty(), "A rewritten after the covering wait, then fence + wgmma: fine (" + e + ")");

  // an accumulator written while in flight
  e = run("wg_dwrite", 128, [&](Regs& r) {
    wg::wgmma_fence();
    issue(r, 0);
    wg::wgmma_commit();
    if (threadIdx.x == 100) r.d[3] = 0;
    wg::wgmma_wait(0);
  });
  check(has(e, "written while the wgmma was in flight") && has(e, "thread 100"), "D written in flight reported: " + e);

  // missing wgmma.fence: before the first wgmma; after rewriting A following a wait
  e = run("wg_nofence", 128, [&](Regs& r) {
    issue(r, 0);
    wg::wgmma_commit();
    wg::wgmma_wait(0);
  });
  check(has(e, "without a wgmma.fence"), "first wgmma without a fence reported: " + e);
  e = run("wg_nofence2", 128, [&](Regs& r) {
    wg::wgmma_fence();
    issue(r, 0);
    wg::wgmma_commit();
    wg::wgmma_wait(0);
    r.a[1] ^= 0x100;
    issue(r, 0);  // no fence after the register write
    wg::wgmma_commit();
    wg::wgmma_wait(0);
  });
  check(has(e, "written after the last wgmma.fence"), "A write without a new fence reported: " + e);
  e = run("wg_nofence3", 128, [&](Regs& r) {
    wg::wgmma_fence();
    issue(r, 0);
    wg::wgmma_commit();
    wg::wgmma_wait(0);
    r.d[0] += 1;  // accumulate onto a modified accumulator without a fence
    issue(r, 1);
    wg::wgmma_commit();
    wg::wgmma_wait(0);
  });
  check(has(e, "accumulator register 0 was written after the last wgmma.fence"),
        "D write without a new fence reported: " + e);

  // rendezvous: a missing warp (deadlock), a returned warp, mismatched instructions / counts
  e = run("wg_missing_warp", 128, [&](Regs&) {
    if (threadIdx.x < 96) wg::wgmma_fence();
    __syncthreads();
  });
  check(has(e, "deadlock") && has(e, "wgmma.fence rendezvous of warp group 0") && has(e, "32/32 32/32 32/32 0/32"),
        "missing warp reported as deadlock: " + e);
  e = run("wg_returned_warp", 128, [&](Regs&) {
    if (threadIdx.x >= 96) return;
    wg::wgmma_fence();
  });
  check(has(e, "returned"), "returned warp reported: " + e);
  e = run("wg_mismatch", 128, [&](Regs&) {
    if (threadIdx.x < 64) wg::wgmma_fence(); else wg::wgmma_commit();
  });
  check(has(e, "meets"), "different wgmma instructions reported: " + e);
  e = run("wg_waitcount", 128, [&](Regs&) { wg::wgmma_wait(threadIdx.x < 32 ? 1 : 0); });
  check(has(e, "meets"), "different wait counts reported: " + e);
  // two warp groups: independent rendezvous and queues
  e = run("wg_two_groups", 256, [&](Regs& r) {
    wg::wgmma_fence();
    issue(r, 0);
    wg::wgmma_commit();
    wg::wgmma_wait(0);
  });
  check(e.empty(), "two warp groups (" + e + ")");
  e = run("wg_partial_group", 192, [&](Regs&) { wg::wgmma_fence(); });
  check(has(e, "incomplete"), "incomplete warp group reported: " + e);

  // a thread exits with wgmmas in flight
  e = run("wg_exit", 128, [&](Regs& r) {
    wg::wgmma_fence();
    issue(r, 0);
    wg::wgmma_commit();
  });
  check(has(e, "in flight"), "exit with wgmmas in flight reported: " + e);
  // an unsupported descriptor: interleaved (no swizzle)
  e = run("wg_interleave", 128, [&](Regs& r) {
    wg::wgmma_fence();
    issue(r, 0, test_desc(0));
    wg::wgmma_commit();
    wg::wgmma_wait(0);
  });
  check(has(e, "INTERLEAVE"), "interleaved descriptor reported: " + e);
  std::printf("asynchrony and hazards: %s\n", g_fail ? "FAILURES above" : "ok");
}
}  // namespace

int main() {
  using namespace cute;
  using namespace cute::SM90::GMMA;
  check_layouts<MMA_Traits<SM90_64x128x32_S32S8S8_RS_TN>, 128, wg::WgType::kS8>("SM90_64x128x32_S32S8S8_RS_TN");
  check_layouts<MMA_Traits<SM90_64x64x32_S32S8S8_RS_TN>, 64, wg::WgType::kS8>("SM90_64x64x32_S32S8S8_RS_TN");
  check_layouts<MMA_Traits<SM90_64x128x16_F32F16F16_RS<Major::K, Major::K>>, 128, wg::WgType::kF16>("SM90_64x128x16_F32F16F16_RS");
  check_layouts<MMA_Traits<SM90_64x64x16_F32F16F16_RS<Major::K, Major::K>>, 64, wg::WgType::kF16>("SM90_64x64x16_F32F16F16_RS");
  check_layouts<MMA_Traits<SM90_64x128x16_F32BF16BF16_RS<Major::K, Major::K>>, 128, wg::WgType::kBF16>("SM90_64x128x16_F32BF16BF16_RS");
  check_layouts<MMA_Traits<SM90_64x64x16_F32BF16BF16_RS<Major::K, Major::K>>, 64, wg::WgType::kBF16>("SM90_64x64x16_F32BF16BF16_RS");

  using namespace ostquant::sm90;
  for (bool s1 : {false, true}) {
    test_kernel_tile<Sm90Int4Gemm<true, int8_t, cutlass::half_t, 128>, MMA_64x128x32_S32S8S8_RS_TN>("w4a4_t128_f16", s1);
    test_kernel_tile<Sm90Int4Gemm<true, int8_t, cutlass::bfloat16_t, 64>, MMA_64x64x32_S32S8S8_RS_TN>("w4a4_t64_bf16", s1);
    test_kernel_tile<Sm90Int4Gemm<false, cutlass::half_t, cutlass::half_t, 64>,
                     MMA_64x64x16_F32F16F16_RS<Major::K, Major::K>>("w4a16_t64_f16", s1);
    test_kernel_tile<Sm90Int4Gemm<false, cutlass::bfloat16_t, cutlass::bfloat16_t, 128>,
                     MMA_64x128x16_F32BF16BF16_RS<Major::K, Major::K>>("w4a16_t128_bf16", s1);
  }
  test_async();
  if (g_fail) {
    std::printf("sm90 wgmma selftest: %d FAILED\n", g_fail);
    return 1;
  }
  std::printf("sm90 wgmma selftest: ALL OK\n");
  return 0;
}
