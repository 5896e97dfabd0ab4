// Self-tests of sm90_tma.h (the TMA emulation) and of its overlay routes (sm90_overlay_tma.py,
// and fence_view_async_shared in sm90_overlay.py): built and run by sm90_spike.py with the
// unit's flags (simt_emu.h, sm90_prelude.h, the overlay headers, sm90_spike_stubs.cpp). Exit
// status 0 and "sm90 tma selftest: ALL OK" when every check passes.
//
//  * The kernel's own operands (w4a4_t128_f16, the spike's unit): the mainloop's A (int4 as
//    uint8, K-major SW64) and B (int8, K-major SW128) tiles loaded through cute's TMA
//    partitioning of the real Params, every element of the consumer's smem views against gmem
//    (zeros outside), on a problem with partial tiles in M', N' and K; the loads land lazily
//    (poisoned stage, phase incomplete, before the wait) and complete exactly the Params'
//    tma_transaction_bytes. The epilogue's D store (half, MN-major SW128) through cute's
//    partitioning, with StagesD = 2 buffers and tma_store_wait<1>, clipped at the edges.
//    Negative controls: the same with the descriptor's swizzle changed must disagree.
//  * make_tma_copy loads for the other modes: K-major SW32 (the W4A16 A operand), SW64, SW128
//    (fp32), no swizzle, MN-major SW128; partial tiles. A box the encode stub rejects fails
//    make_tma_copy with the stub's reason.
//  * Direct descriptors: byte count with OOB fill, lazy landing seen by a second thread, store
//    clipping, bulk-group timing, in-flight modification, thread exit, the proxy shadow, and
//    the errors (descriptor, alignment, box outside smem, mbarrier, coordinates, multicast).
#include <cstdio>
#include <cstring>
#include <functional>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda.h>
#include <cuda_runtime_api.h>

#include "gemm/sm90/kernel.cuh"  // the kernel types (through the overlay)

#include "sm90_selftest_util.h"

namespace {
namespace emu = ostq_emu::sm90;
using namespace cute;

using namespace ostq_selftest;  // check, error_of, has, g_fail
void expect_error(const std::function<void()>& f, const char* sub, const std::string& what) {
  const std::string e = error_of(f);
  check(has(e, sub), what + ": expected an error with \"" + sub + "\", got \"" + e + "\"");
}

// one block, `smem` bytes of dynamic shared memory (opted in as a kernel would)
void smem_key() {}
template <class F>
void run_block(const char* name, int threads, size_t smem, F&& body) {
  ostq_emu::funcSetAttribute(&smem_key, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  ostq_emu::launch(name, reinterpret_cast<const void*>(&smem_key), dim3(1), dim3(threads), smem, nullptr,
                   std::forward<F>(body));
}

uint32_t g_rng = 12345;
uint32_t rnd() {
  g_rng = g_rng * 1664525u + 1013904223u;
  return g_rng >> 8;
}
template <class T> int ival(T const& v) {
  if constexpr (requires { v.get(); }) return int(v.get()); else return int(v);
}

// ------------------------------------------------------------------ the kernel's operands
using G = ostquant::sm90::Sm90Int4Gemm<true, int8_t, cutlass::half_t, 128>;
using CM = typename G::CollectiveMainloop;
using CE = typename G::CollectiveEpilogue;

struct Problem {
  int M = 136, N = 200, K = 352;  // the op's: tokens, channels, K (partial tiles in M', N', K)
  std::vector<uint8_t> w;
  std::vector<int8_t> x;
  std::vector<float> ones;
  std::vector<cutlass::half_t> out;  // [M, N] + a guard
  ostquant::CutlassGemmProblem p{};
  Problem() {
    w.resize(size_t(N) * K / 2);
    x.resize(size_t(M) * K);
    for (auto& b : w) b = uint8_t(rnd());
    for (auto& v : x) v = int8_t(int(rnd() % 256) - 128);
    ones.assign(std::max(M, N), 1.f);
    out.assign(size_t(M) * N + 4096, cutlass::half_t::bitcast(0x7E01));
    p.w = w.data(); p.x = x.data(); p.M = M; p.N = N; p.K = K; p.sm_count = 4;
    p.epi.x_scale = ones.data(); p.epi.w_scale = ones.data(); p.epi.out = out.data();
  }
  int W(int m, int k) const {  // int4 code of the swapped problem's A'(m', k)
    const uint8_t b = w[(size_t(m) * K + k) / 2];
    const int q = (k % 2) ? (b >> 4) : (b & 15);
    return q >= 8 ? q - 16 : q;
  }
};

// Loads every (m', n', k) tile of A' and B' with the kernel's TMA copies into a rotating stage
// (thread 0, as the producer warp); thread 32 checks that nothing landed before its wait, waits
// on the full barrier, and compares the consumer views with gmem. Returns the element
// mismatches (the lazy-landing checks are reported directly).
template <class Params>
long long mainloop_tiles(const Problem& pr, const Params& params, const char* name) {
  using TS = typename CM::TensorStorage;
  constexpr int BM = size<0>(typename G::TileShape{}), BN = size<1>(typename G::TileShape{});
  constexpr int BK = size<2>(typename G::TileShape{});
  constexpr int Stages = CM::DispatchPolicy::Stages;
  const int Mp = pr.N, Np = pr.M, K = pr.K;
  const int tiles_m = (Mp + BM - 1) / BM, tiles_n = (Np + BN - 1) / BN, tiles_k = (K + BK - 1) / BK;
  long long bad = 0, lazy_bad = 0, tiles = 0;
  run_block(name, 64, sizeof(TS) + 64, [&] {
    auto* base = ostq_emu::dyn_smem_base();
    TS& st = *reinterpret_cast<TS*>(base);
    uint64_t* bar = reinterpret_cast<uint64_t*>(base + sizeof(TS));
    const int t = threadIdx.x;
    auto problem = append<4>(make_shape(Mp, Np, K), 1);
    CM mainloop;
    auto load_inputs = mainloop.load_init(problem, params);
    Tensor gA_mkl = get<0>(load_inputs);
    Tensor gB_nkl = get<1>(load_inputs);
    Tensor sA = as_position_independent_swizzle_tensor(
        make_tensor(make_smem_ptr(st.smem_A.begin()), typename CM::SmemLayoutA{}));
    Tensor sB = as_position_independent_swizzle_tensor(
        make_tensor(make_smem_ptr(st.smem_B.begin()), typename CM::SmemLayoutB{}));
    auto block_tma_a = params.tma_load_a.get_slice(0);
    auto block_tma_b = params.tma_load_b.get_slice(0);
    if (t == 0) cute::initialize_barrier(*bar, 1);  // cute's helper (copy_sm90_desc.hpp route)
    __syncthreads();
    uint32_t phase = 0;
    for (int mt = 0; mt < tiles_m; ++mt)
      for (int nt = 0; nt < tiles_n; ++nt)
        for (int kt = 0; kt < tiles_k; ++kt, ++phase) {
          const int stage = (mt * 7 + nt * 3 + kt) % Stages;
          if (t == 0) {
            cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(bar, params.tma_transaction_bytes);
            Tensor tAgA = block_tma_a.partition_S(gA_mkl(_, _, mt, _, 0));
            Tensor tAsA = block_tma_a.partition_D(sA);
            Tensor tBgB = block_tma_b.partition_S(gB_nkl(_, _, nt, _, 0));
            Tensor tBsB = block_tma_b.partition_D(sB);
            copy(params.tma_load_a.with(*bar, 0), tAgA(_, _, _, kt), tAsA(_, _, _, stage));
            copy(params.tma_load_b.with(*bar, 0), tBgB(_, _, _, kt), tBsB(_, _, _, stage));
          }
          __syncthreads();
          if (t == 32) {
            // nothing has landed: two loads recorded, the phase open, the stage poisoned
            bool lazy = emu::tma_pending_loads(bar) == 2 && emu::mbar_phase(bar) == phase;
            for (int m = 0; m < BM && lazy; ++m)
              for (int k = 0; k < BK; ++k) lazy = lazy && ival(sA(m, k, stage)) == -1;
            for (int n = 0; n < BN && lazy; ++n)
              for (int k = 0; k < BK; ++k) lazy = lazy && ival(sB(n, k, stage)) == -1;
            lazy_bad += !lazy;
            cutlass::arch::ClusterTransactionBarrier::wait(bar, phase & 1);
            lazy_bad += emu::tma_pending_loads(bar) != 0 || emu::mbar_phase(bar) != phase + 1;
            for (int m = 0; m < BM; ++m)
              for (int k = 0; k < BK; ++k) {
                const int gm = mt * BM + m, gk = kt * BK + k;
                bad += ival(sA(m, k, stage)) != ((gm < Mp && gk < K) ? pr.W(gm, gk) : 0);
              }
            for (int n = 0; n < BN; ++n)
              for (int k = 0; k < BK; ++k) {
                const int gn = nt * BN + n, gk = kt * BK + k;
                bad += ival(sB(n, k, stage)) != ((gn < Np && gk < K) ? int(pr.x[size_t(gn) * K + gk]) : 0);
              }
            ++tiles;
          }
          __syncthreads();
        }
  });
  check(lazy_bad == 0, std::string(name) + ": " + std::to_string(lazy_bad) +
                           " tiles landed before the consumer's wait, or the wait did not land them");
  check(tiles == tiles_m * tiles_n * tiles_k, std::string(name) + ": tiles checked");
  return bad;
}

template <class Params>
void set_swizzle(Params& p, CUtensorMapSwizzle sw) {
  auto* d = const_cast<cute::TmaDescriptor*>(p.get_tma_descriptor());
  reinterpret_cast<emu::TensorMapRec*>(d)->swizzle = sw;
}

void test_kernel_mainloop() {
  Problem pr;
  auto args = G::arguments(pr.p);
  auto params = CM::to_underlying_arguments(args.problem_shape, args.mainloop, nullptr);
  const auto& ra = emu::tensor_map(params.tma_load_a.get_tma_descriptor());
  const auto& rb = emu::tensor_map(params.tma_load_b.get_tma_descriptor());
  check(ra.swizzle == CU_TENSOR_MAP_SWIZZLE_64B && rb.swizzle == CU_TENSOR_MAP_SWIZZLE_128B,
        "the kernel's A is SW64, B SW128");
  const long long bad = mainloop_tiles(pr, params, "mainloop_tma");
  check(bad == 0, "mainloop: " + std::to_string(bad) + " consumer-view elements differ from gmem");
  // negative controls: a descriptor with another swizzle puts the bytes where cute's views do
  // not look
  auto p1 = params;
  set_swizzle(p1.tma_load_a, CU_TENSOR_MAP_SWIZZLE_NONE);
  check(mainloop_tiles(pr, p1, "mainloop_tma_a_unswizzled") > 0, "negative control: A without swizzle must differ");
  auto p2 = params;
  set_swizzle(p2.tma_load_b, CU_TENSOR_MAP_SWIZZLE_64B);
  check(mainloop_tiles(pr, p2, "mainloop_tma_b_sw64") > 0, "negative control: B with SW64 must differ");
  // the transaction count is the Params' (the whole box): one byte less expected overflows
  auto p3 = params;
  p3.tma_transaction_bytes -= 16;
  expect_error([&] { mainloop_tiles(pr, p3, "mainloop_tma_tx"); }, "more than expected",
               "tx bytes beyond the expected count");
}

// The epilogue's D store: StagesD = 2 smem buffers, as the collective's store loop uses them.
template <class EpParams>
long long epilogue_store(Problem& pr, const EpParams& ep) {
  using CtaTile = typename CE::CtaTileMNK;
  using EpiTile = typename CE::EpilogueTile;
  constexpr bool m_major = cutlass::epilogue::collective::detail::is_m_major<typename CE::StrideD>();
  static_assert(m_major, "D' is column-major");
  using SmemLayoutD = decltype(tile_to_shape(typename CE::SmemLayoutAtomD{},
                                             make_shape(size<0>(EpiTile{}), size<1>(EpiTile{}), Int<2>{}),
                                             Step<_2, _1, _3>{}));
  using H = cutlass::half_t;
  const int Mp = pr.N, Np = pr.M;
  auto val = [](int m, int n) { return H(float((m * 5 + n * 3) % 2000 + 1)); };
  std::fill(pr.out.begin(), pr.out.end(), H::bitcast(0x7E01));
  constexpr int BM = size<0>(CtaTile{}), BN = size<1>(CtaTile{});
  constexpr int EM = size<0>(EpiTile{}), EN = size<1>(EpiTile{});
  run_block("epilogue_tma_store", 32, cosize(SmemLayoutD{}) * sizeof(H), [&] {
    if (threadIdx.x != 0) return;
    H* ptr = reinterpret_cast<H*>(ostq_emu::dyn_smem_base());
    Tensor sD_epi = as_position_independent_swizzle_tensor(make_tensor(make_smem_ptr(ptr), SmemLayoutD{}));
    Tensor mD_mn = ep.tma_store_d.get_tma_tensor(make_shape(Mp, Np, 1));
    Tensor mD = coalesce(mD_mn, take<0, 2>(CtaTile{}));
    auto s2g = ep.tma_store_d.get_slice(Int<0>{});
    Tensor bSG_sD = s2g.partition_S(sD_epi);
    int count = 0;
    for (int mt = 0; mt < (Mp + BM - 1) / BM; ++mt)
      for (int nt = 0; nt < (Np + BN - 1) / BN; ++nt) {
        Tensor gD = local_tile(mD, take<0, 2>(CtaTile{}), make_coord(mt, nt, 0));
        Tensor gD_epi = flat_divide(gD, EpiTile{});
        Tensor bSG_gD = s2g.partition_D(gD_epi);
        for (int en = 0; en < size<3>(gD_epi); ++en)
          for (int em = 0; em < size<2>(gD_epi); ++em, ++count) {
            const int pipe = count % 2;
            for (int i = 0; i < EM; ++i)
              for (int j = 0; j < EN; ++j) sD_epi(i, j, pipe) = val(mt * BM + em * EM + i, nt * BN + en * EN + j);
            emu::proxy_generic_write(&sD_epi(0, 0, pipe), EM * EN * sizeof(H));  // as stmatrix would
            cutlass::arch::fence_view_async_shared();  // (sm90_overlay.py route)
            copy(ep.tma_store_d, bSG_sD(_, _, _, pipe), bSG_gD(_, _, _, em, en));
            cute::tma_store_arrive();
            cute::tma_store_wait<1>();  // the other buffer is free again
          }
      }
    cute::tma_store_wait<0>();
  });
  long long bad = 0;
  for (int n = 0; n < Np; ++n)
    for (int m = 0; m < Mp; ++m) bad += pr.out[size_t(n) * Mp + m].raw() != val(m, n).raw();
  for (size_t i = size_t(Mp) * Np; i < pr.out.size(); ++i) bad += pr.out[i].raw() != 0x7E01;  // clipped
  return bad;
}

void test_kernel_epilogue() {
  Problem pr;
  auto args = G::arguments(pr.p);
  auto ep = CE::to_underlying_arguments(args.problem_shape, args.epilogue, nullptr);
  check(emu::tensor_map(ep.tma_store_d.get_tma_descriptor()).swizzle == CU_TENSOR_MAP_SWIZZLE_128B,
        "the kernel's D store is SW128");
  const long long bad = epilogue_store(pr, ep);
  check(bad == 0, "epilogue store: " + std::to_string(bad) + " output elements wrong (or written outside)");
  auto ep1 = ep;
  set_swizzle(ep1.tma_store_d, CU_TENSOR_MAP_SWIZZLE_NONE);
  check(epilogue_store(pr, ep1) > 0, "negative control: D store without swizzle must differ");
}

// ------------------------------------------------------------------ make_tma_copy, other modes
// rows x cols gmem (K-major: cols contiguous; MN-major: rows contiguous) loaded tile by tile
// into the smem layout `sl` (rows x cols of a tile) and checked through cute's smem view.
template <class T, bool KMajor, class SmemLayout>
void cute_tiles(const char* name, int rows, int cols, SmemLayout sl) {
  constexpr int TR = size<0>(SmemLayout{}), TC = size<1>(SmemLayout{});
  const int contig = KMajor ? cols : rows, other = KMajor ? rows : cols;
  const int ld = (contig * int(sizeof(T)) + 47) / 16 * 16 / int(sizeof(T));  // padded, 16-byte rows
  std::vector<T> g(size_t(ld) * other);
  for (auto& v : g) v = T(int(rnd() % 200) - 100);
  auto at = [&](int r, int c) { return KMajor ? g[size_t(r) * ld + c] : g[size_t(c) * ld + r]; };
  auto stride = [&] {
    if constexpr (KMajor) return make_stride(ld, Int<1>{}); else return make_stride(Int<1>{}, ld);
  }();
  Tensor gT = make_tensor(make_gmem_ptr(g.data()), make_shape(rows, cols), stride);
  auto tma = make_tma_copy(SM90_TMA_LOAD{}, gT, sl);
  long long bad = 0, tiles = 0;
  const uint32_t box_bytes = size(sl) * sizeof(T);
  run_block(name, 32, cosize(sl) * sizeof(T) + 1024 + 64, [&] {
    if (threadIdx.x != 0) return;
    auto* base = ostq_emu::dyn_smem_base();
    uint64_t* bar = reinterpret_cast<uint64_t*>(base + cosize(sl) * sizeof(T) + 1024);
    cute::initialize_barrier(*bar, 1);
    // a 1024-aligned tile at window offset 1024 (base + 1024)
    Tensor sT = as_position_independent_swizzle_tensor(make_tensor(make_smem_ptr(reinterpret_cast<T*>(base + 1024)), sl));
    Tensor mT = tma.get_tma_tensor(make_shape(rows, cols));
    auto cta = tma.get_slice(0);
    int phase = 0;
    for (int i = 0; i * TR < rows; ++i)
      for (int j = 0; j * TC < cols; ++j, ++phase) {
        Tensor gTile = local_tile(mT, make_shape(Int<TR>{}, Int<TC>{}), make_coord(i, j));
        cute::set_barrier_transaction_bytes(*bar, box_bytes);
        copy(tma.with(*bar), cta.partition_S(gTile), cta.partition_D(sT));
        cute::wait_barrier(*bar, phase & 1);
        for (int r = 0; r < TR; ++r)
          for (int c = 0; c < TC; ++c) {
            const int gr = i * TR + r, gc = j * TC + c;
            const T want = (gr < rows && gc < cols) ? at(gr, gc) : T(0);
            bad += std::memcmp(&sT(r, c), &want, sizeof(T)) != 0;
          }
        ++tiles;
      }
  });
  check(bad == 0 && tiles > 1, std::string(name) + ": " + std::to_string(bad) + " elements differ");
}

void test_cute_modes() {
  using namespace cute::GMMA;
  // the W4A16 A operand's mode: uint8, K-major, SW32 (8 x 32 byte atoms)
  cute_tiles<uint8_t, true>("tma_k_sw32", 150, 70, tile_to_shape(Layout_K_SW32_Atom<uint8_t>{}, make_shape(Int<64>{}, Int<32>{})));
  cute_tiles<uint8_t, true>("tma_k_sw64", 100, 200, tile_to_shape(Layout_K_SW64_Atom<uint8_t>{}, make_shape(Int<64>{}, Int<64>{})));
  cute_tiles<cutlass::half_t, true>("tma_k_inter", 40, 50, tile_to_shape(Layout_K_INTER_Atom<cutlass::half_t>{}, make_shape(Int<16>{}, Int<16>{})));
  cute_tiles<cutlass::half_t, false>("tma_mn_sw128", 200, 20, tile_to_shape(Layout_MN_SW128_Atom<cutlass::half_t>{}, make_shape(Int<64>{}, Int<16>{})));
  cute_tiles<float, true>("tma_k_sw128_f32", 33, 70, tile_to_shape(Layout_K_SW128_Atom<float>{}, make_shape(Int<16>{}, Int<32>{})));
  // a descriptor the driver rejects (8-byte box rows; cute does not check that one itself):
  // make_tma_copy fails with the encode stub's reason
  std::vector<uint8_t> g(64 * 64);
  Tensor gT = make_tensor(make_gmem_ptr(g.data()), make_shape(64, 64), make_stride(64, Int<1>{}));
  std::streambuf* cerr_buf = std::cerr.rdbuf(nullptr);  // CUTLASS prints the descriptor first
  expect_error([&] { make_tma_copy(SM90_TMA_LOAD{}, gT, Layout<Shape<_8, _8>, Stride<_8, _1>>{}); },
               "rejected the TMA descriptor: boxDim[0] * elementSize", "make_tma_copy with a box the driver rejects");
  std::cerr.rdbuf(cerr_buf);
  std::cerr.clear();
}

// ------------------------------------------------------------------ direct descriptors
CUtensorMap make_map(CUtensorMapDataType dt, void* g, std::vector<cuuint64_t> gdim, std::vector<cuuint64_t> gstride,
                     std::vector<cuuint32_t> box, CUtensorMapSwizzle sw) {
  CUtensorMap m;
  std::vector<cuuint32_t> es(gdim.size(), 1);
  const CUresult r = emu::encode_tiled(&m, dt, static_cast<cuuint32_t>(gdim.size()), g, gdim.data(), gstride.data(),
                                       box.data(), es.data(), CU_TENSOR_MAP_INTERLEAVE_NONE, sw,
                                       CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) throw std::runtime_error("make_map: encode rejected: " + emu::encode_log());
  return m;
}

// A 2-D uint16 tensor (rows x cols, ld elements per row), box 16 x 8, no swizzle.
struct Grid2 {
  int rows = 20, cols = 40, ld = 64;
  std::vector<uint16_t> g;
  Grid2() : g(size_t(rows) * ld) {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < ld; ++c) g[size_t(r) * ld + c] = uint16_t(c < cols ? 1000 * r + c + 1 : 0xDEAD);
  }
  CUtensorMap map(CUtensorMapSwizzle sw = CU_TENSOR_MAP_SWIZZLE_NONE, cuuint32_t b0 = 16, cuuint32_t b1 = 8) {
    return make_map(CU_TENSOR_MAP_DATA_TYPE_UINT16, g.data(), {cuuint64_t(cols), cuuint64_t(rows)},
                    {cuuint64_t(ld) * 2}, {b0, b1}, sw);
  }
};

void test_load_direct() {
  Grid2 gr;
  const CUtensorMap map = gr.map();
  // a partial box at (-4, 16): rows 16..23 (20..23 outside), columns -4..11 (-4..-1 outside)
  const uint32_t box_bytes = 16 * 8 * 2;
  std::string seen_before;
  run_block("tma_load_lazy", 64, 4096, [&] {
    auto* base = ostq_emu::dyn_smem_base();
    uint64_t* bar = reinterpret_cast<uint64_t*>(base + 2048);
    uint16_t* dst = reinterpret_cast<uint16_t*>(base);
    const int t = threadIdx.x;
    if (t == 0) {
      std::memset(dst, 0x11, box_bytes);  // the stage's earlier content
      emu::mbar_init(bar, 1);
      emu::mbar_arrive_expect_tx(bar, box_bytes);
      SM90_TMA_LOAD_2D::copy(&map, bar, 0, dst, -4, 16);  // the overlay's route
    }
    __syncthreads();
    if (t == 32) {  // reads the stage without waiting: undefined bytes (0xFF), nothing landed
      bool poisoned = true;
      for (uint32_t i = 0; i < box_bytes / 2; ++i) poisoned = poisoned && dst[i] == 0xFFFF;
      check(poisoned, "lazy load: the destination is poisoned until the wait");
      check(emu::mbar_phase(bar) == 0 && emu::tma_pending_loads(bar) == 1, "lazy load: not landed before the wait");
    }
    __syncthreads();
    if (t == 32) {
      emu::mbar_wait_parity(bar, 0);
      check(emu::mbar_phase(bar) == 1, "lazy load: the wait completes the phase (box bytes, OOB included)");
      long long bad = 0;
      for (int r = 0; r < 8; ++r)
        for (int c = 0; c < 16; ++c) {
          const int gr_ = 16 + r, gc = -4 + c;
          const uint16_t want = (gr_ < gr.rows && gc >= 0) ? gr.g[size_t(gr_) * gr.ld + gc] : 0;
          bad += dst[r * 16 + c] != want;
        }
      check(bad == 0, "lazy load: partial box with OOB zero fill");
    }
  });
  // fewer bytes than expected: the consumer waits forever (deadlock reported)
  expect_error([&] {
    run_block("tma_load_short", 32, 4096, [&] {
      auto* base = ostq_emu::dyn_smem_base();
      uint64_t* bar = reinterpret_cast<uint64_t*>(base + 2048);
      if (threadIdx.x == 0) {
        emu::mbar_init(bar, 1);
        emu::mbar_arrive_expect_tx(bar, box_bytes + 16);
        SM90_TMA_LOAD_2D::copy(&map, bar, 0, base, 0, 0);
      }
      emu::mbar_wait_parity(bar, 0);
    });
  }, "deadlock", "expect_tx above the box bytes");
  // more bytes than expected
  expect_error([&] {
    run_block("tma_load_long", 32, 4096, [&] {
      auto* base = ostq_emu::dyn_smem_base();
      uint64_t* bar = reinterpret_cast<uint64_t*>(base + 2048);
      if (threadIdx.x == 0) {
        emu::mbar_init(bar, 1);
        emu::mbar_arrive_expect_tx(bar, box_bytes - 16);
        SM90_TMA_LOAD_2D::copy(&map, bar, 0, base, 30, 0);  // partial: still the whole box
      }
      emu::mbar_wait_parity(bar, 0);
    });
  }, "more than expected", "expect_tx below the box bytes (OOB bytes count)");
}

void test_load_errors() {
  Grid2 gr;
  const CUtensorMap map = gr.map();
  const CUtensorMap map128 = gr.map(CU_TENSOR_MAP_SWIZZLE_128B, 64, 8);
  auto load = [&](const void* desc, size_t dst_off, bool init, std::function<void(uint64_t*, unsigned char*)> f = {}) {
    run_block("tma_load_error", 32, 8192, [&] {
      auto* base = ostq_emu::dyn_smem_base();
      uint64_t* bar = reinterpret_cast<uint64_t*>(base + 8192 - 64);
      if (threadIdx.x != 0) return;
      if (init) emu::mbar_init(bar, 1);
      if (f) {
        f(bar, base);
      } else {
        SM90_TMA_LOAD_2D::copy(desc, bar, 0, base + dst_off, 0, 0);
      }
    });
  };
  alignas(64) static unsigned char raw[128] = {};
  expect_error([&] { load(raw, 0, true); }, "not made by", "foreign descriptor");
  expect_error([&] { load(reinterpret_cast<const unsigned char*>(&map) + 0, 0, true, [&](uint64_t* bar, unsigned char* base) {
                  std::memcpy(base + 4096, &map, sizeof map);  // a copy in shared memory
                  SM90_TMA_LOAD_2D::copy(base + 4096, bar, 0, base, 0, 0);
                }); }, "in shared memory", "descriptor in shared memory");
  expect_error([&] { load(&map, 8, true); }, "16-byte aligned", "unswizzled destination 8 bytes off");
  check(error_of([&] { load(&map, 16, true); }).empty(), "unswizzled destination 16-byte aligned is fine");
  expect_error([&] { load(&map128, 64, true); }, "128-byte aligned", "swizzled destination 64 bytes off");
  check(error_of([&] { load(&map128, 128, true); }).empty(), "swizzled destination 128-byte aligned is fine");
  expect_error([&] { load(&map, 8192 - 128, true); }, "ends past", "box outside the dynamic shared memory");
  expect_error([&] { load(&map, 0, false); }, "never initialised", "uninitialised mbarrier");
  expect_error([&] { load(&map, 0, true, [&](uint64_t* bar, unsigned char* base) {
                  SM90_TMA_LOAD_3D::copy(&map, bar, 0, base, 0, 0, 0);
                }); }, "3 coordinates for a tensor map of rank 2", "coordinate count");
  expect_error([&] { load(&map, 0, true, [&](uint64_t* bar, unsigned char* base) {
                  SM90_TMA_LOAD_MULTICAST_2D::copy(&map, bar, 1, 0, base, 0, 0);
                }); }, "CUTE_INVALID_CONTROL_PATH", "multicast load is not emulated");
  // prefetches: validated, otherwise nothing
  check(error_of([&] { load(&map, 0, true, [&](uint64_t*, unsigned char*) {
          cute::prefetch_tma_descriptor(reinterpret_cast<const cute::TmaDescriptor*>(&map));
          SM90_TMA_LOAD_2D::PREFETCH::copy(&map, 0, 0);
        }); }).empty(), "prefetch.tensormap / tile prefetch of a valid descriptor");
  expect_error([&] { load(&map, 0, true, [&](uint64_t*, unsigned char*) {
                  cute::prefetch_tma_descriptor(reinterpret_cast<const cute::TmaDescriptor*>(raw));
                }); }, "not made by", "prefetch.tensormap of a foreign descriptor");
}

void test_store_direct() {
  // clipping: 2-D boxes at the four corners and past the end; the padding columns (40..63) and
  // everything outside the boxes keep their values
  {
    Grid2 gr;
    const std::vector<uint16_t> before = gr.g;
    const CUtensorMap map = gr.map();
    const int corners[][2] = {{-4, -3}, {32, -3}, {-4, 16}, {32, 16}, {48, 4}, {8, 24}};
    run_block("tma_store_clip", 32, 8192, [&] {
      if (threadIdx.x != 0) return;
      auto* src = reinterpret_cast<uint16_t*>(ostq_emu::dyn_smem_base());
      for (int b = 0; b < 6; ++b) {
        for (int i = 0; i < 16 * 8; ++i) src[b * 128 + i] = uint16_t(50000 + b * 128 + i);
        SM90_TMA_STORE_2D::copy(&map, src + b * 128, corners[b][0], corners[b][1]);
      }
      cute::tma_store_arrive();
      cute::tma_store_wait<0>();
    });
    long long bad = 0;
    for (int r = 0; r < gr.rows; ++r)
      for (int c = 0; c < gr.ld; ++c) {
        uint16_t want = before[size_t(r) * gr.ld + c];
        for (int b = 0; b < 6; ++b) {
          const int br = r - corners[b][1], bc = c - corners[b][0];
          if (c < gr.cols && br >= 0 && br < 8 && bc >= 0 && bc < 16) want = uint16_t(50000 + b * 128 + br * 16 + bc);
        }
        bad += gr.g[size_t(r) * gr.ld + c] != want;
      }
    check(bad == 0, "store clipping: " + std::to_string(bad) + " elements wrong");
  }
  // bulk groups: performed at the wait that covers them, reading shared memory then
  {
    Grid2 gr;
    const CUtensorMap map = gr.map();
    run_block("tma_store_groups", 32, 8192, [&] {
      if (threadIdx.x != 0) return;
      auto* src = reinterpret_cast<uint16_t*>(ostq_emu::dyn_smem_base());
      for (int i = 0; i < 256; ++i) src[i] = uint16_t(7000 + i);
      SM90_TMA_STORE_2D::copy(&map, src, 0, 0);
      cute::tma_store_arrive();
      SM90_TMA_STORE_2D::copy(&map, src + 128, 16, 0);
      cute::tma_store_arrive();
      SM90_TMA_STORE_2D::copy(&map, src + 128, 16, 8);  // not committed
      check(gr.g[0] == 1 && gr.g[16] == 17 && emu::tma_pending_stores() == 3, "store: nothing written at issue");
      cute::tma_store_wait<1>();
      check(gr.g[0] == 7000 && gr.g[16] == 17 && emu::tma_pending_stores() == 2, "store: wait<1> performs the older group only");
      cute::tma_store_wait<0>();
      check(gr.g[16] == 7128 && gr.g[size_t(8) * gr.ld + 16] == 8 * 1000 + 17 && emu::tma_pending_stores() == 1,
            "store: wait<0> performs the committed groups, not the open one");
      cute::tma_store_arrive();
      cute::tma_store_wait<0>();
      check(gr.g[size_t(8) * gr.ld + 16] == 7128 && emu::tma_pending_stores() == 0, "store: the last group");
      // the buffer may be reused after the wait
      src[0] = 1;
    });
  }
  // the buffer overwritten before the wait: the TMA may be reading it
  {
    Grid2 gr;
    const CUtensorMap map = gr.map();
    expect_error([&] {
      run_block("tma_store_overwrite", 32, 8192, [&] {
        if (threadIdx.x != 0) return;
        auto* src = reinterpret_cast<uint16_t*>(ostq_emu::dyn_smem_base());
        for (int i = 0; i < 128; ++i) src[i] = uint16_t(i);
        SM90_TMA_STORE_2D::copy(&map, src, 0, 0);
        cute::tma_store_arrive();
        src[5] = 99;  // too early
        cute::tma_store_wait<0>();
      });
    }, "modified while the store was in flight", "smem source overwritten before the bulk wait");
    check(gr.g[0] == 1, "the racy store wrote nothing");
  }
  // never waited for: the thread's exit performs it
  {
    Grid2 gr;
    const CUtensorMap map = gr.map();
    run_block("tma_store_exit", 32, 8192, [&] {
      if (threadIdx.x != 3) return;
      auto* src = reinterpret_cast<uint16_t*>(ostq_emu::dyn_smem_base());
      for (int i = 0; i < 128; ++i) src[i] = uint16_t(3000 + i);
      SM90_TMA_STORE_2D::copy(&map, src, 0, 0);
    });
    check(gr.g[0] == 3000 && gr.g[size_t(7) * gr.ld + 15] == 3127, "store performed at thread exit");
  }
  // errors
  {
    Grid2 gr;
    const CUtensorMap map = gr.map(), map128 = gr.map(CU_TENSOR_MAP_SWIZZLE_128B, 64, 8);
    auto store = [&](const void* desc, size_t off) {
      run_block("tma_store_error", 32, 8192, [&] {
        if (threadIdx.x == 0) SM90_TMA_STORE_2D::copy(desc, ostq_emu::dyn_smem_base() + off, 0, 0);
      });
    };
    expect_error([&] { store(&map, 8); }, "16-byte aligned", "store source misaligned");
    expect_error([&] { store(&map128, 64); }, "128-byte aligned", "swizzled store source misaligned");
    expect_error([&] { store(&map, 8192 - 64); }, "ends past", "store box outside smem");
    alignas(64) static unsigned char raw[128] = {};
    expect_error([&] { store(raw, 0); }, "not made by", "store with a foreign descriptor");
  }
}

// The proxy shadow: thread 1 writes the buffer through the generic proxy (as stmatrix), thread
// 0 issues the store after a barrier. fence_by: -1 none, else the thread that fences.
void proxy_case(int fence_by, bool cute_fence, const std::string& want, const std::string& what) {
  Grid2 gr;
  const CUtensorMap map = gr.map();
  const std::string e = error_of([&] {
    run_block("tma_proxy", 32, 8192, [&] {
      auto* src = reinterpret_cast<uint16_t*>(ostq_emu::dyn_smem_base());
      const int t = threadIdx.x;
      if (t == 1) {
        for (int i = 0; i < 128; ++i) src[i] = uint16_t(4000 + i);
        emu::proxy_generic_write(src, 64);
        emu::proxy_generic_write(src + 32, 192);
      }
      if (t == fence_by) {
        if (cute_fence) cute::tma_store_fence(); else cutlass::arch::fence_view_async_shared();
      }
      __syncthreads();
      if (t == 0) {
        SM90_TMA_STORE_2D::copy(&map, src, 0, 0);
        cute::tma_store_arrive();
        cute::tma_store_wait<0>();
      }
    });
  });
  if (want.empty()) {
    check(e.empty() && gr.g[0] == 4000, what + ": " + e);
  } else {
    check(has(e, want.c_str()), what + ": expected \"" + want + "\", got \"" + e + "\"");
  }
}

// The same through the routed stmatrix atom (the epilogue's smem writes): every lane's bytes
// are marked, so the store needs each writer's fence.
void stmatrix_proxy_case(bool fence, const std::string& want, const std::string& what) {
  Grid2 gr;
  const CUtensorMap map = gr.map();
  const std::string e = error_of([&] {
    run_block("tma_proxy_stmatrix", 32, 8192, [&] {
      auto* base = ostq_emu::dyn_smem_base();
      const unsigned l = threadIdx.x;
      SM90_U32x4_STSM_N::copy(5000 + l, 6000 + l, 7000 + l, 8000 + l,
                              *reinterpret_cast<cute::uint128_t*>(base + 16 * l));
      if (fence) cutlass::arch::fence_view_async_shared();
      __syncthreads();
      if (l == 0) {
        SM90_TMA_STORE_2D::copy(&map, base, 0, 0);
        cute::tma_store_arrive();
        cute::tma_store_wait<0>();
      }
    });
  });
  if (want.empty()) {
    check(e.empty(), what + ": " + e);
  } else {
    check(has(e, want.c_str()), what + ": expected \"" + want + "\", got \"" + e + "\"");
  }
}

void test_proxy() {
  stmatrix_proxy_case(false, "not fenced by that thread", "store of unfenced stmatrix writes");
  stmatrix_proxy_case(true, "", "stmatrix writes fenced by every writer");
  proxy_case(-1, false, "not fenced by that thread", "store of unfenced generic writes");
  proxy_case(0, false, "written by thread 1", "a fence by the issuing thread does not cover thread 1's writes");
  proxy_case(1, false, "", "fence_view_async_shared by the writer");
  proxy_case(1, true, "", "tma_store_fence by the writer");
  // a TMA load over unfenced bytes makes them async-proxy data again
  Grid2 gr;
  const CUtensorMap map = gr.map();
  check(error_of([&] {
    run_block("tma_proxy_load", 32, 8192, [&] {
      if (threadIdx.x != 0) return;
      auto* base = ostq_emu::dyn_smem_base();
      uint64_t* bar = reinterpret_cast<uint64_t*>(base + 4096);
      emu::proxy_generic_write(base, 256);
      emu::mbar_init(bar, 1);
      emu::mbar_arrive_expect_tx(bar, 256);
      SM90_TMA_LOAD_2D::copy(&map, bar, 0, base, 0, 0);
      emu::mbar_wait_parity(bar, 0);
      SM90_TMA_STORE_2D::copy(&map, base, 16, 0);
      cute::tma_store_arrive();
      cute::tma_store_wait<0>();
    });
  }).empty() && gr.g[16] == 1, "a TMA load clears the shadow; load + store round trip");
}

}  // namespace

int main() {
  test_load_direct();
  test_load_errors();
  test_store_direct();
  test_proxy();
  test_cute_modes();
  test_kernel_mainloop();
  test_kernel_epilogue();
  if (g_fail) {
    std::printf("sm90 tma selftest: %d FAILED\n", g_fail);
    return 1;
  }
  std::printf("sm90 tma selftest: ALL OK\n");
  return 0;
}
