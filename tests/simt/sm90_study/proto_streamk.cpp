// Does the stream-K scheduler of our kernel (CUTLASS 4.2 PersistentTileSchedulerSm90StreamK,
// default Arguments: Heuristic decomposition, Deterministic reduction, splits = 1) ever make a
// CTA wait on a CTA with a higher blockIdx? The SIMT emulator runs blocks one after another in
// blockIdx order, so such a wait would deadlock there.
//
// The scheduler's own (host-compiled) work assignment is enumerated for every CTA of the
// persistent grid, in the order the CTA processes its work units, and the fixup protocol of
// fixup_helper() (Deterministic: a split with K_idx > 0 waits until the tile's lock == K_idx,
// then adds k_tile_count) is replayed with the CTAs run one after another. Also checked: every
// output tile's K range is covered exactly once, and exactly one unit per tile runs the epilogue.
#include <initializer_list>
#include <cstdio>
#include <cstring>
#include <map>
#include <vector>
#include <cuda.h>
#include "gemm/sm90/kernel.cuh"

namespace ostq_proto { uint32_t smem_addr(void const*) { return 0; }
void tma_load(void const*, uint32_t, uint32_t, std::initializer_list<int32_t>) {} }
extern "C" cudaError_t cudaGetDriverEntryPointByVersion(const char*, void**, unsigned int, unsigned long long,
                                                       cudaDriverEntryPointQueryResult* st) {
  if (st) *st = cudaDriverEntryPointSymbolNotFound;
  return cudaErrorInvalidValue;
}
extern "C" cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }

struct Stats { long problems = 0, dp = 0, sk = 0, splitk = 0, deadlocks = 0, coverage_errors = 0, later_waits = 0; };

template <class G>
void survey(const char* name, Stats& st, bool verbose) {
  using Kernel = typename G::Kernel;
  using TS = typename Kernel::TileScheduler;
  using TileShape = typename G::TileShape;
  using ClusterShape = typename G::ClusterShape;
  constexpr int BM = cute::size<0>(TileShape{}), BN = cute::size<1>(TileShape{}), BK = cute::size<2>(TileShape{});
  constexpr uint32_t SubTiles = Kernel::CollectiveEpilogue::get_store_pipe_increment(TileShape{});
  const int sms[] = {1, 2, 3, 4, 5, 7, 8, 16, 66, 114, 132};
  for (int sm : sms)
    for (int tm = 1; tm <= 12; ++tm)          // output tiles along M' (channels)
      for (int tn = 1; tn <= 6; ++tn)         // along N' (tokens)
        for (int kt : {1, 8, 9, 13, 16, 33, 64}) {  // k tiles per output tile
          const int Mp = tm * BM - (tm > 1 ? 8 : 0), Np = tn * BN - (tn % 2), K = kt * BK - 32;
          if (K <= 0) continue;
          cute::Shape<int, int, int, int> prob{Mp, Np, K, 1};
          cutlass::KernelHardwareInfo hw{0, sm, 0};
          typename TS::Arguments args{};  // what our arguments() leaves: Heuristic, Deterministic
          auto p = TS::to_underlying_arguments(cute::append<4>(prob, cute::Int<1>{}), TileShape{}, ClusterShape{},
                                               hw, args, nullptr, SubTiles);
          dim3 grid = TS::get_grid_shape(p, prob, TileShape{}, ClusterShape{}, hw, args);
          const uint64_t G_ = uint64_t(grid.x) * grid.y * grid.z;
          ++st.problems;
          const bool splitk = p.divmod_splits_.divisor > 1, sk = p.sk_units_ > 0 && !splitk;
          st.splitk += splitk; st.sk += sk; st.dp += !splitk && !sk;
          const uint32_t ktiles = p.divmod_tiles_per_output_tile_.divisor;
          // enumerate: per CTA (blockIdx-linear order), its work units in processing order
          struct Item { uint64_t tile, linear; int K_idx, kcount; bool fix, epi; };
          std::vector<std::vector<Item>> per_cta(G_);
          for (uint64_t b = 0; b < G_; ++b) {
            uint64_t linear = b;  // grid is 1-D for 1x1 clusters: (1, G, 1) or (G, 1, 1)
            uint32_t unit_start = 0;
            auto w = TS::get_current_work_for_linear_idx(unit_start, linear, dim3(0, 0, 0), p);
            int guard = 0;
            while (w.is_valid() && ++guard < 100000) {
              per_cta[b].push_back({TS::output_tile_index(p, w), linear, w.K_idx, int(w.k_tile_count),
                                    TS::requires_fixup(p, w), TS::compute_epilogue(w, p)});
              auto w2 = w;
              if (TS::continue_current_work_for_linear_idx(linear, unit_start, dim3(0, 0, 0), w2, p)) {
                w = w2;
              } else {
                linear += G_;
                w = TS::get_current_work_for_linear_idx(unit_start, linear, dim3(0, 0, 0), p);
              }
            }
          }
          // coverage and one epilogue per tile
          std::map<uint64_t, std::vector<std::pair<int, int>>> cover;
          std::map<uint64_t, int> epis;
          for (auto& v : per_cta) for (auto& it : v) { cover[it.tile].push_back({it.K_idx, it.kcount}); epis[it.tile] += it.epi; }
          bool cov_ok = cover.size() == uint64_t(tm) * tn;
          for (auto& [t, r] : cover) {
            std::vector<int> c(ktiles, 0);
            for (auto [k0, n] : r) for (int k = k0; k < k0 + n; ++k) if (k >= 0 && k < int(ktiles)) ++c[k];
            for (int x : c) cov_ok = cov_ok && x == 1;
            cov_ok = cov_ok && epis[t] == 1;
          }
          st.coverage_errors += !cov_ok;
          // replay the Deterministic fixup protocol with CTAs run one after another
          std::map<uint64_t, long> lock;
          bool dead = false;
          for (uint64_t b = 0; b < G_ && !dead; ++b)
            for (auto& it : per_cta[b]) {
              if (!it.fix) continue;
              if (!it.epi) {
                if (it.K_idx != 0 && lock[it.tile] != it.K_idx) { dead = true; break; }
                lock[it.tile] += it.kcount;
              } else if (lock[it.tile] != it.K_idx) { dead = true; break; }
            }
          st.deadlocks += dead;
          // any wait whose producer unit has a higher linear index than the waiter?
          std::map<uint64_t, std::vector<std::pair<int, uint64_t>>> producers;  // tile -> (K_idx, linear)
          for (auto& v : per_cta) for (auto& it : v) if (it.fix) producers[it.tile].push_back({it.K_idx, it.linear});
          for (auto& v : per_cta) for (auto& it : v)
            if (it.fix && it.K_idx > 0)
              for (auto [k0, lin] : producers[it.tile]) st.later_waits += k0 < it.K_idx && lin > it.linear;
          if (verbose && (splitk || sk) && sm == 4 && tm * tn <= 5 && (kt == 16 || kt == 33))
            std::printf("  %s sm=%d tiles %dx%d k_tiles=%u grid=(%u,%u,%u): %s sk_units=%u sk_tiles=%u splits=%d\n",
                        name, sm, tm, tn, ktiles, grid.x, grid.y, grid.z, splitk ? "split-K" : "stream-K",
                        p.sk_units_, p.sk_tiles_, p.divmod_splits_.divisor);
        }
}

int main() {
  Stats st;
  survey<ostquant::sm90::Sm90Int4Gemm<true, int8_t, cutlass::half_t, 128>>("w4a4_t128", st, true);
  survey<ostquant::sm90::Sm90Int4Gemm<true, int8_t, cutlass::half_t, 64>>("w4a4_t64", st, false);
  survey<ostquant::sm90::Sm90Int4Gemm<false, cutlass::half_t, cutlass::half_t, 128>>("w4a16_t128", st, false);
  survey<ostquant::sm90::Sm90Int4Gemm<false, cutlass::bfloat16_t, cutlass::bfloat16_t, 64>>("w4a16_t64", st, true);
  std::printf("problems %ld: data-parallel %ld, stream-K %ld, split-K %ld; coverage/epilogue errors %ld; "
              "sequential-blockIdx deadlocks %ld; waits on a higher linear index %ld\n",
              st.problems, st.dp, st.sk, st.splitk, st.coverage_errors, st.deadlocks, st.later_waits);
  return (st.coverage_errors || st.deadlocks || st.later_waits) ? 1 : 0;
}
