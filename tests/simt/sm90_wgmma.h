// sm90 emulator: wgmma, the Hopper warp-group MMA (tests/simt/sm90_study/REPORT.md §2.2, §2.3,
// §3.1; step 5 of its plan, with the warp-group rendezvous of step 2). Included by
// sm90_prelude.h after sm90_emu.h (builds with the Hopper GEMMs and their self-tests);
// sm90_overlay_wgmma.py routes cute's wgmma sites here (cute::warpgroup_arrive /
// warpgroup_commit_batch / warpgroup_wait<N> and the RS atoms MMA_64xNx32_S32S8S8_RS_TN,
// MMA_64xNx16_F32F16F16_RS, MMA_64xNx16_F32BF16BF16_RS). Self-test: sm90_wgmma_selftest.cpp.
//
//  * Warp-group collectives. wgmma.fence, wgmma.mma_async, wgmma.commit_group and
//    wgmma.wait_group are .sync.aligned over the warp group: all 128 threads of the aligned warp
//    group (threads 128g..128g+127 of the block) must execute the same instruction. Each is a
//    rendezvous of those 128 threads (spin_yield: a deadlock report when they never all come);
//    threads at different wgmma instructions, a different wait count, B descriptor, scale-d or
//    shape, or a thread of the group that has returned, are errors.
//  * mma_async, RS form: D(64xN) = A(64xK)·B(KxN) [+ D]. A from registers in the PTX fragment
//    layout (per warp w, rows 16w..16w+15 in the mma.sync m16n8kK A layout: simt_emu.h
//    a_frag); B K-major in shared memory through the 64-bit GMMA descriptor (start address,
//    SBO, swizzle mode SW32 / SW64 / SW128 on the absolute shared-window address; the XOR of
//    REPORT §2.2, ported from sm90_study/proto_sm90.cpp); D in the PTX accumulator layout
//    (d[4i+j]: the m16n8 C fragment of warp w, column block i). s8·s8 -> s32 is exact (wrapping
//    int32, as the non-.satfinite instruction). f16 / bf16 -> f32: the K (16) products are exact
//    in fp32 and summed in k order in fp32 (round to nearest), then added to D: the order
//    simt_emu.h's mma.sync emulation uses; the hardware's order is unspecified (REPORT §6).
//    Not emulated (loud failure): the SS form, MN-major B (tnspB), scale-a / scale-b = -1,
//    the interleaved (no-swizzle) descriptor layout, a non-zero base offset, a start address
//    that is not a K offset inside the first row of a swizzle atom.
//  * Asynchrony (REPORT §3.1). An issued wgmma is queued for its warp group; commit_group
//    closes the open group; wait_group N performs, in issue order, every op of the committed
//    groups but the N newest, at the rendezvous: B is read from shared memory then (the latest
//    legal time, so a stage released or refilled too early shows as wrong data), A from the
//    values captured at issue, and the results written to the D registers.
//      - D registers are poisoned at issue (kWgmmaPoison, a NaN as f32): reading the
//        accumulators before the covering wait gives wrong values. A later wgmma of the same
//        shape on the same accumulators chains (its D input is the earlier op's result, as the
//        hardware orders same-shape accumulations without a fence); the register keeps the
//        poison until the last op of the chain completes. A D register that no longer holds the
//        poison when its op completes was written while in flight: an error (nothing is written
//        there then, so a stack slot reused after its scope ended is never clobbered).
//      - A-hazard: the A registers of an op still in flight must keep the values they had at
//        issue; each thread checks its own at every later wgmma instruction it executes while
//        the op is pending (fence, mma_async, commit, and a wait that leaves the op pending).
//        Not at the wait that completes the op: the A fragment may be out of scope by then
//        (CUTLASS's mma() returns with K_WAIT_MAX wgmmas in flight, mma_tail's wait<0>
//        completes them; ptxas keeps those registers alive, our stack slot is reused).
//      - wgmma.fence (what is checkable): (1) a thread's first mma_async of the block must
//        follow a wgmma.fence of that thread; (2) value check: the registers an mma_async
//        reads (A, and D when accumulating) that earlier wgmmas of the thread used must hold
//        the value they had at the thread's last wgmma.fence (or that the emulator gave them
//        since: the poison at issue, the result at completion); a difference is a thread write
//        after the last fence: "missing wgmma.fence". Registers first used by this op are
//        covered by (1) only, and register *reads* (e.g. the epilogue reading accumulators
//        before the next tile's wgmma) cannot be seen.
//      - a thread that exits while its warp group has wgmmas not yet completed: an error
//        (thread_exit_hooks).
//  * wgmma.fence establishes ordering only: nothing is flushed. warpgroup_fence_operand
//    (a compiler-only register fence) stays the empty host function.
#pragma once

#include <cstdint>
#include <cstring>
#include <deque>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace ostq_emu {
namespace sm90 {

constexpr int kWarpGroup = 128;
constexpr uint32_t kWgmmaPoison = 0x7FF0BAD5u;  // a quiet NaN as f32, 2146482901 as s32

// ------------------------------------------------------------------ shapes and layouts
enum class WgType : uint8_t { kS8, kF16, kBF16 };
inline int wg_k(WgType t) { return t == WgType::kS8 ? 32 : 16; }         // K of m64nNkK
inline int wg_esize(WgType t) { return t == WgType::kS8 ? 1 : 2; }      // bytes per element
inline int wg_per_reg(WgType t) { return t == WgType::kS8 ? 4 : 2; }    // A elements per register
inline const char* wg_types(WgType t) {
  return t == WgType::kS8 ? "s32.s8.s8" : t == WgType::kF16 ? "f32.f16.f16" : "f32.bf16.bf16";
}
inline std::string wg_shape_str(WgType t, int n) {
  return "m64n" + std::to_string(n) + "k" + std::to_string(wg_k(t)) + "." + wg_types(t);
}

// A (64 x K) from registers: element e (per_reg per 32-bit register, low bits first, register
// after register) of thread thr of the warp group. Warp w = thr / 32 holds rows 16w..16w+15 in
// the mma.sync m16n8k(8E) A fragment layout (PTX ISA "Register fragment for matrix A" of wgmma).
inline Coord wgmma_a_coord(WgType t, int thr, int e) {
  Coord c = wg_per_reg(t) == 4 ? a_frag<4>(thr % kWarpSize, e) : a_frag<2>(thr % kWarpSize, e);
  c.row += 16 * (thr / kWarpSize);
  return c;
}
// D (64 x N, f32 / s32): register v of thread thr: d[4i + j] is element j of the m16n8 C
// fragment of warp w, column block i: row 16w + g + 8(j>>1), column 8i + 2t + (j&1).
inline Coord wgmma_d_coord(int thr, int v) {
  Coord c = c_16n8(thr % kWarpSize, v % 4);
  c.row += 16 * (thr / kWarpSize);
  c.col += 8 * (v / 4);
  return c;
}

// ------------------------------------------------------------------ GMMA descriptor
// PTX ISA "Matrix Descriptor Format" (cute::GmmaDescriptor): bits 0-13 start address >> 4,
// 16-29 leading-dimension byte offset >> 4, 32-45 stride-dimension byte offset >> 4, 49-51 base
// offset, 62-63 layout type (0 interleave, 1 SW128, 2 SW64, 3 SW32); the other bits reserved.
struct GmmaDesc {
  uint32_t start, lbo, sbo, base, layout;
  uint64_t reserved;
};
inline GmmaDesc decode_gmma_desc(uint64_t d) {
  constexpr uint64_t kFields = 0x3FFFull | (0x3FFFull << 16) | (0x3FFFull << 32) | (7ull << 49) | (3ull << 62);
  return {static_cast<uint32_t>(d & 0x3FFF) << 4, static_cast<uint32_t>((d >> 16) & 0x3FFF) << 4,
          static_cast<uint32_t>((d >> 32) & 0x3FFF) << 4, static_cast<uint32_t>((d >> 49) & 7),
          static_cast<uint32_t>(d >> 62), d & ~kFields};
}
// swizzle span (bytes per row of the swizzle atom) and XOR bits of a layout type
inline uint32_t gmma_span(uint32_t layout) { return layout == 1 ? 128 : layout == 2 ? 64 : layout == 3 ? 32 : 0; }
inline uint32_t gmma_swizzle_bits(uint32_t layout) { return layout == 1 ? 3 : layout == 2 ? 2 : layout == 3 ? 1 : 0; }
// The 16-byte chunk bits [4..] of a shared-window byte address XORed with bits [7..] (SW32 /
// SW64 / SW128: 1 / 2 / 3 bits: cute's Swizzle<B,4,3> on byte addresses).
inline uint32_t gmma_swizzle(uint32_t addr, uint32_t layout) {
  const uint32_t mask = (1u << gmma_swizzle_bits(layout)) - 1u;
  return addr ^ (((addr >> 7) & mask) << 4);
}
// What the emulation supports of a K-major operand descriptor whose instruction reads
// `k_bytes` per row; "" when fine, else why not.
inline std::string gmma_desc_unsupported(const GmmaDesc& d, uint32_t k_bytes) {
  if (d.reserved) return "reserved bits set (start address beyond the 14-bit field?)";
  if (d.layout == 0) return "layout type INTERLEAVE (no swizzle) is not emulated";
  if (d.base != 0) return "base offset " + std::to_string(d.base) + " is not emulated";
  const uint32_t span = gmma_span(d.layout);
  const uint32_t off = d.start % (8 * span);
  if (off + k_bytes > span) {
    return "start address " + std::to_string(d.start) + " is not a K offset inside the first row of a " +
           std::to_string(8 * span) + "-byte swizzle atom (not emulated)";
  }
  return "";
}
// Shared-window address of byte kb (along K) of row r (along M/N) of a K-major operand: 8-row
// groups SBO apart, rows one swizzle span apart inside the group, then the swizzle XOR on the
// absolute address. (LBO is unused: the instruction's 32 bytes of K lie in one span.)
inline uint32_t gmma_kmajor_addr(const GmmaDesc& d, int r, int kb) {
  const uint32_t a = d.start + static_cast<uint32_t>(r / 8) * d.sbo + static_cast<uint32_t>(r % 8) * gmma_span(d.layout) +
                     static_cast<uint32_t>(kb);
  return gmma_swizzle(a, d.layout);
}

// ------------------------------------------------------------------ per-block state
struct WgOp {
  long long seq = 0;       // issue order in the warp group
  long long group = 0;     // wgmma.commit_group count of the warp group before it
  WgType type = WgType::kS8;
  int n = 0, nd = 0;       // N; D registers per thread (N / 2)
  uint64_t desc = 0;
  int scale_d = 0;
  const char* name = "";
  uint32_t a[kWarpGroup][4];                // A values at issue
  const uint32_t* a_ptr[kWarpGroup][4];     // ... and where they live
  std::vector<uint32_t*> d_ptr;             // [thr * nd + v]
  std::vector<uint32_t> d_in;               // D input (value at issue, or a predecessor's result)
  std::vector<uint8_t> d_waiting;           // d_in still to come from a pending predecessor
  std::vector<std::pair<long long, int>> succ;  // the pending op that chains on this result
};
struct WgThread {
  bool fenced = false;                               // a wgmma.fence since the block started
  std::unordered_map<const void*, uint32_t> known;   // registers of its wgmmas -> fenced value
};
struct WarpGroupState {
  int arrived = 0;                  // rendezvous: threads arrived at the current collective
  int per_warp[4] = {0, 0, 0, 0};
  unsigned long long generation = 0;
  const char* what = nullptr;
  long long arg = 0;
  std::deque<WgOp> pending;         // issued, not completed (issue order)
  WgOp building;                    // the mma_async whose rendezvous is under way
  long long next_seq = 0, committed = 0;
  // D register -> (seq, index) of the newest pending op that writes it
  std::unordered_map<const void*, std::pair<long long, int>> last_writer;
  WgThread thr[kWarpGroup];
};
struct WgmmaBlock {
  std::deque<WarpGroupState> groups;  // stable addresses (threads hold references across yields)
};
inline BlockLocal<WgmmaBlock>& wgmma_local() {
  static thread_local BlockLocal<WgmmaBlock> b;
  return b;
}
// This block's state (reset when a new block or launch starts using it).
inline WgmmaBlock& wgmma_state() {
  return wgmma_local().state([](WgmmaBlock& b) {
    b.groups.clear();
    b.groups.resize(static_cast<size_t>(S().nthreads / kWarpGroup));
  });
}
struct WgSelf {
  WarpGroupState& g;
  int gi, t;  // warp group of the block, thread in the warp group
};
inline WgSelf wg_self(const char* what) {
  const Sched& s = S();
  const int lin = s.cur->lin, gi = lin / kWarpGroup;
  if ((gi + 1) * kWarpGroup > s.nthreads) {
    fail(std::string(what) + ": warp group " + std::to_string(gi) + " is incomplete (the block has " +
         std::to_string(s.nthreads) + " threads; wgmma needs whole warp groups of 128)");
  }
  return {wgmma_state().groups[static_cast<size_t>(gi)], gi, lin % kWarpGroup};
}

inline uint32_t reg_load(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline void reg_store(void* p, uint32_t v) { std::memcpy(p, &v, 4); }
inline std::string reg_str(uint32_t v) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// ------------------------------------------------------------------ warp-group rendezvous
// Arrive at the warp group's collective `what` (arg: an operand every thread must give alike).
// join() runs in the arriving thread after the checks (posts its operands); last() in the
// thread that completes the rendezvous, before any thread leaves it.
template <class Join, class Last>
inline void wg_collective(WgSelf self, const char* what, long long arg, Join&& join, Last&& last) {
  Sched& s = S();
  WarpGroupState& g = self.g;
  const int base = self.gi * kWarpGroup;
  for (int i = 0; i < kWarpGroup; ++i) {
    if (s.fibers[base + i].state == St::kDone) {
      fail(std::string(what) + ": thread " + std::to_string(base + i) + " of warp group " + std::to_string(self.gi) +
           " has returned (all 128 threads of the warp group must execute it)");
    }
  }
  if (g.arrived == 0) {
    g.what = what;
    g.arg = arg;
  } else if (std::strcmp(g.what, what) != 0 || g.arg != arg) {
    fail(std::string(what) + " (" + std::to_string(arg) + ") meets " + g.what + " (" + std::to_string(g.arg) +
         ") of other threads of warp group " + std::to_string(self.gi) + " (.aligned: all must execute the same)");
  }
  join();
  progress();
  const unsigned long long gen = g.generation;
  ++g.per_warp[self.t / kWarpSize];
  if (++g.arrived == kWarpGroup) {
    last();
    g.arrived = 0;
    for (int& w : g.per_warp) w = 0;
    ++g.generation;
    progress();
    return;
  }
  while (g.generation == gen) {
    for (int i = 0; i < kWarpGroup; ++i) {
      if (s.fibers[base + i].state == St::kDone) {
        fail(std::string(what) + ": thread " + std::to_string(base + i) + " of warp group " + std::to_string(self.gi) +
             " returned without executing it (all 128 threads of the warp group must)");
      }
    }
    std::string msg = std::string(what) + " rendezvous of warp group " + std::to_string(self.gi) + " (threads " +
                      std::to_string(base) + ".." + std::to_string(base + kWarpGroup - 1) + "; arrived per warp:";
    for (int w = 0; w < 4; ++w) msg += " " + std::to_string(g.per_warp[w]) + "/32";
    spin_yield(msg + ")");
  }
}

// ------------------------------------------------------------------ checks of a thread's registers
// A-hazard: the A registers of thread t in every pending op (or only in ops of groups >=
// keep_from, those a wait leaves pending) still hold their values at issue.
inline void check_a_in_flight(WgSelf self, const char* at, long long keep_from = -1) {
  for (const WgOp& op : self.g.pending) {
    if (op.group < keep_from) continue;
    for (int r = 0; r < 4; ++r) {
      const uint32_t now = reg_load(op.a_ptr[self.t][r]);
      if (now != op.a[self.t][r]) {
        fail(std::string("wgmma A-hazard: A register ") + std::to_string(r) + " of " + op.name + " (issue #" +
             std::to_string(op.seq) + ") was modified while the wgmma is in flight (" + reg_str(op.a[self.t][r]) +
             " at issue, " + reg_str(now) + " at " + at + "; wait_group before rewriting A)");
      }
    }
  }
}

// ------------------------------------------------------------------ execution
template <class F>
inline WgOp* find_pending(WarpGroupState& g, long long seq, F&& what) {
  if (g.pending.empty() || seq < g.pending.front().seq || seq - g.pending.front().seq >= static_cast<long long>(g.pending.size())) {
    fail(std::string("wgmma emulator: internal error: op #") + std::to_string(seq) + " not pending (" + what() + ")");
  }
  return &g.pending[static_cast<size_t>(seq - g.pending.front().seq)];
}

inline void wgmma_execute(WarpGroupState& g, int gi, WgOp& op) {
  const int K = wg_k(op.type), es = wg_esize(op.type), E = wg_per_reg(op.type);
  const bool is_int = op.type == WgType::kS8;
  // A (64 x K) from the captured registers
  std::vector<float> af(is_int ? 0 : 64 * K);
  std::vector<int> ai(is_int ? 64 * K : 0);
  for (int thr = 0; thr < kWarpGroup; ++thr)
    for (int e = 0; e < 4 * E; ++e) {
      const Coord c = wgmma_a_coord(op.type, thr, e);
      const uint32_t reg = op.a[thr][e / E];
      if (op.type == WgType::kS8) {
        ai[c.row * K + c.col] = static_cast<int8_t>(reg >> (8 * (e % E)));
      } else {
        const uint16_t h = static_cast<uint16_t>(reg >> (16 * (e % E)));
        af[c.row * K + c.col] = op.type == WgType::kF16 ? half_bits_to_float<__half>(h) : half_bits_to_float<__nv_bfloat16>(h);
      }
    }
  // B (N x K, K-major) from shared memory through the descriptor, read now
  const GmmaDesc d = decode_gmma_desc(op.desc);
  const std::string why = gmma_desc_unsupported(d, static_cast<uint32_t>(K * es));
  if (!why.empty()) fail(std::string(op.name) + ": B descriptor " + reg_str(static_cast<uint32_t>(op.desc >> 32)) +
                         reg_str(static_cast<uint32_t>(op.desc)) + ": " + why);
  std::vector<float> bf(is_int ? 0 : op.n * K);
  std::vector<int> bi(is_int ? op.n * K : 0);
  for (int n = 0; n < op.n; ++n)
    for (int k = 0; k < K; ++k) {
      const unsigned char* p = smem_window_ptr(gmma_kmajor_addr(d, n, k * es), es);
      if (is_int) {
        bi[n * K + k] = static_cast<int8_t>(*p);
      } else {
        uint16_t h;
        std::memcpy(&h, p, 2);
        bf[n * K + k] = op.type == WgType::kF16 ? half_bits_to_float<__half>(h) : half_bits_to_float<__nv_bfloat16>(h);
      }
    }
  for (int thr = 0; thr < kWarpGroup; ++thr)
    for (int v = 0; v < op.nd; ++v) {
      const size_t i = static_cast<size_t>(thr) * op.nd + v;
      if (op.d_waiting[i]) fail("wgmma emulator: internal error: chained D input never arrived");
      const Coord c = wgmma_d_coord(thr, v);
      uint32_t res;
      if (is_int) {
        int acc = 0;  // |sum| <= 32 * 2^14: exact
        for (int k = 0; k < K; ++k) acc += ai[c.row * K + k] * bi[c.col * K + k];
        res = (op.scale_d ? op.d_in[i] : 0u) + static_cast<uint32_t>(acc);  // s32, wrapping
      } else {
        float acc = 0.f;  // exact products, summed in k order (fp32, round to nearest)
        for (int k = 0; k < K; ++k) acc += af[c.row * K + k] * bf[c.col * K + k];
        float din;
        std::memcpy(&din, &op.d_in[i], 4);
        const float r = op.scale_d ? din + acc : acc;
        std::memcpy(&res, &r, 4);
      }
      if (op.succ[i].first >= 0) {  // a later op of the chain accumulates onto it
        WgOp* nx = find_pending(g, op.succ[i].first, [] { return std::string("chain successor"); });
        const size_t j = static_cast<size_t>(op.succ[i].second);
        nx->d_in[j] = res;
        nx->d_waiting[j] = 0;
        continue;
      }
      uint32_t* p = op.d_ptr[i];
      const uint32_t now = reg_load(p);
      if (now != kWgmmaPoison) {
        fail(std::string("wgmma: accumulator register ") + std::to_string(v) + " of thread " +
             std::to_string(gi * kWarpGroup + thr) + " (" + op.name + ", issue #" + std::to_string(op.seq) +
             ") was written while the wgmma was in flight (holds " + reg_str(now) +
             ", not the in-flight poison; or its storage went out of scope)");
      }
      reg_store(p, res);
      auto it = g.last_writer.find(p);
      if (it != g.last_writer.end() && it->second.first == op.seq) g.last_writer.erase(it);
      auto& known = g.thr[thr].known;
      auto kt = known.find(p);
      if (kt != known.end()) kt->second = res;
    }
}

// ------------------------------------------------------------------ the instructions
// wgmma.fence.sync.aligned (cute::warpgroup_arrive)
inline void wgmma_fence() {
  WgSelf self = wg_self("wgmma.fence");
  check_a_in_flight(self, "wgmma.fence");
  WgThread& me = self.g.thr[self.t];
  for (auto& kv : me.known) kv.second = reg_load(kv.first);  // registers fenced at their values
  me.fenced = true;
  wg_collective(self, "wgmma.fence", 0, [] {}, [] {});
}

// wgmma.commit_group.sync.aligned (cute::warpgroup_commit_batch)
inline void wgmma_commit() {
  WgSelf self = wg_self("wgmma.commit_group");
  check_a_in_flight(self, "wgmma.commit_group");
  WarpGroupState& g = self.g;
  wg_collective(self, "wgmma.commit_group", 0, [] {}, [&] { ++g.committed; });
}

// wgmma.wait_group.sync.aligned N (cute::warpgroup_wait<N>)
inline void wgmma_wait(int n) {
  WgSelf self = wg_self("wgmma.wait_group");
  if (n < 0 || n > 7) fail("wgmma.wait_group " + std::to_string(n) + " (0..7)");
  WarpGroupState& g = self.g;
  // the commit count cannot change during this rendezvous (commit is a rendezvous too)
  check_a_in_flight(self, "wgmma.wait_group", g.committed - n);
  const int gi = self.gi;
  wg_collective(self, "wgmma.wait_group", n, [] {}, [&] {
    while (!g.pending.empty() && g.pending.front().group < g.committed - n) {
      wgmma_execute(g, gi, g.pending.front());
      g.pending.pop_front();
    }
  });
}

// wgmma.mma_async.sync.aligned.m64nNkK.<types> (RS: A from registers, B through its
// descriptor) with scale-d; called by the overlay's RS atoms with the atom's registers.
template <WgType T, int N>
inline void wgmma_rs(const char* name, const uint32_t* const (&a)[4], uint64_t desc_b, void* const (&d)[N / 2],
                     int scale_d, int scale_a, int scale_b, int tnsp_b) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N");
  constexpr int ND = N / 2;
  WgSelf self = wg_self(name);
  if (scale_a != 1 || scale_b != 1) fail(std::string(name) + ": scale-a / scale-b = -1 (negation) is not emulated");
  if (tnsp_b != 0) fail(std::string(name) + ": MN-major B (tnspB) is not emulated");
  WarpGroupState& g = self.g;
  WgThread& me = g.thr[self.t];
  const std::string shape = wg_shape_str(T, N);
  if (!me.fenced) {
    fail(std::string("wgmma.mma_async ") + shape + " (" + name + ") without a wgmma.fence before it (required before "
         "the first wgmma of the warp group; cute::warpgroup_arrive)");
  }
  check_a_in_flight(self, "wgmma.mma_async");
  // missing fence: registers of earlier wgmmas written since this thread's last wgmma.fence
  for (int r = 0; r < 4; ++r) {
    auto it = me.known.find(a[r]);
    if (it != me.known.end() && reg_load(a[r]) != it->second) {
      fail(std::string("wgmma.mma_async ") + shape + ": A register " + std::to_string(r) +
           " was written after the last wgmma.fence (" + reg_str(it->second) + " then, " + reg_str(reg_load(a[r])) +
           " now): missing wgmma.fence between the register write and the wgmma");
    }
  }
  for (int v = 0; v < ND; ++v) {
    const uint32_t now = reg_load(d[v]);
    auto lw = g.last_writer.find(d[v]);
    if (lw != g.last_writer.end()) {
      const WgOp* pred = find_pending(g, lw->second.first, [] { return std::string("last writer"); });
      if (pred->type != T || pred->n != N) {
        fail(std::string("wgmma.mma_async ") + shape + ": accumulator register " + std::to_string(v) +
             " is the D of a pending wgmma of another shape (" + wg_shape_str(pred->type, pred->n) +
             "): wait_group first");
      }
      if (now != kWgmmaPoison) {
        fail(std::string("wgmma.mma_async ") + shape + ": accumulator register " + std::to_string(v) +
             " of a pending wgmma was written while in flight (holds " + reg_str(now) + ")");
      }
      continue;
    }
    auto it = me.known.find(d[v]);
    if (scale_d && it != me.known.end() && now != it->second) {
      fail(std::string("wgmma.mma_async ") + shape + ": accumulator register " + std::to_string(v) +
           " was written after the last wgmma.fence (" + reg_str(it->second) + " then, " + reg_str(now) +
           " now): missing wgmma.fence between the register write and the wgmma");
    }
  }
  const long long op_arg = static_cast<long long>(T) * 1000 + N;
  const int t = self.t;
  wg_collective(self, "wgmma.mma_async", op_arg,
      [&] {
        WgOp& b = g.building;
        if (g.arrived == 0) {  // the first thread opens the op
          b.seq = g.next_seq;
          b.type = T;
          b.n = N;
          b.nd = ND;
          b.desc = desc_b;
          b.scale_d = scale_d;
          b.name = name;
          b.d_ptr.assign(static_cast<size_t>(kWarpGroup) * ND, nullptr);
          b.d_in.assign(static_cast<size_t>(kWarpGroup) * ND, 0u);
          b.d_waiting.assign(static_cast<size_t>(kWarpGroup) * ND, 0);
          b.succ.assign(static_cast<size_t>(kWarpGroup) * ND, std::make_pair(-1LL, 0));
        } else if (b.desc != desc_b || b.scale_d != scale_d) {
          fail(std::string("wgmma.mma_async ") + shape + ": operands differ across the warp group (B descriptor " +
               reg_str(static_cast<uint32_t>(desc_b >> 32)) + reg_str(static_cast<uint32_t>(desc_b)) + " scale-d " +
               std::to_string(scale_d) + " here, " + reg_str(static_cast<uint32_t>(b.desc >> 32)) +
               reg_str(static_cast<uint32_t>(b.desc)) + " scale-d " + std::to_string(b.scale_d) + " before)");
        }
        for (int r = 0; r < 4; ++r) {
          b.a[t][r] = reg_load(a[r]);
          b.a_ptr[t][r] = a[r];
          me.known[a[r]] = b.a[t][r];
        }
        for (int v = 0; v < ND; ++v) {
          const size_t i = static_cast<size_t>(t) * ND + v;
          uint32_t* p = static_cast<uint32_t*>(d[v]);
          b.d_ptr[i] = p;
          auto lw = g.last_writer.find(p);
          if (lw != g.last_writer.end()) {  // chained on a pending op's result
            WgOp* pred = find_pending(g, lw->second.first, [] { return std::string("chain predecessor"); });
            pred->succ[static_cast<size_t>(lw->second.second)] = {b.seq, static_cast<int>(i)};
            b.d_waiting[i] = 1;
          } else {
            b.d_in[i] = reg_load(p);
          }
          reg_store(p, kWgmmaPoison);  // in flight: reads before the wait see the poison
          g.last_writer[p] = {b.seq, static_cast<int>(i)};
          me.known[p] = kWgmmaPoison;
        }
      },
      [&] {
        g.building.group = g.committed;
        g.pending.push_back(std::move(g.building));
        g.building = WgOp{};
        ++g.next_seq;
      });
}

// A thread that exits while its warp group has wgmmas not completed (never waited for, or never
// committed): an error.
inline void wgmma_thread_exit() {
  if (!wgmma_local().current()) return;
  WgmmaBlock& b = wgmma_local().value();
  const Sched& s = S();
  const int gi = s.cur->lin / kWarpGroup;
  if (gi >= static_cast<int>(b.groups.size())) return;
  const WarpGroupState& g = b.groups[static_cast<size_t>(gi)];
  if (!g.pending.empty()) {
    fail("thread exits with " + std::to_string(g.pending.size()) + " wgmma(s) of warp group " + std::to_string(gi) +
         " in flight (no wgmma.wait_group completed them" +
         (g.pending.back().group >= g.committed ? std::string("; the newest were never committed") : std::string()) + ")");
  }
}
inline const bool kWgmmaThreadExitHook = (thread_exit_hooks().push_back(&wgmma_thread_exit), true);

}  // namespace sm90
}  // namespace ostq_emu
