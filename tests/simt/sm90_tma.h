// sm90 emulator: TMA (tests/simt/sm90_study/REPORT.md §2.1, §2.4, §3.3; step 4 of its plan).
// Included by sm90_prelude.h after sm90_emu.h (builds with the Hopper GEMMs and their self-tests);
// sm90_overlay_tma.py routes CUTLASS / cute's TMA sites here. Self-test: sm90_tma_selftest.cpp.
//
//  * TMA tile load (cp.async.bulk.tensor.Nd.shared::cluster.global.mbarrier::complete_tx::bytes,
//    cute SM90_TMA_LOAD_{1..5}D): the descriptor is the encode stub's record (tensor_map()).
//    The box is written densely (rows of box[0]·esize bytes) at the shared-window address of the
//    destination, then the 16-byte chunk bits [4..] of each byte's *window* address are XORed
//    with bits [7..] (SWIZZLE_32B / 64B / 128B: 1 / 2 / 3 bits; ported from
//    sm90_study/proto_sm90.cpp). Elements outside [0, globalDim) in any dimension are zeros
//    (OOB_FILL_NONE). The transaction count is the whole box, OOB elements included.
//    Timing: at issue the destination bytes become 0xFF (undefined until the copy completes)
//    and the copy is recorded on the mbarrier; it is performed (gmem read, smem written,
//    complete_tx) when some thread next tests or waits on that mbarrier (the hook at the top of
//    sm90_emu.h's mbar_test_parity). So a consumer that reads the stage without waiting reads
//    0xFF, and a producer that refills a stage still being read poisons it.
//  * TMA tile store (cp.async.bulk.tensor.Nd.global.shared::cta.bulk_group, SM90_TMA_STORE_*):
//    elements outside the tensor are clipped (not written). Bulk groups are per thread
//    (cp.async.bulk.commit_group / wait_group.read N): a store is queued at issue and performed
//    (smem read, gmem written) when a wait of its thread leaves at most N newer committed groups,
//    or when the thread exits (simt_emu.h's thread_exit_hooks). The source bytes are also
//    copied at issue; if they differ when the store is performed, the kernel modified the
//    buffer while the TMA was reading it: an error.
//  * Async-proxy fence (fence.proxy.async.shared::cta: cutlass::arch::fence_view_async_shared,
//    cute::tma_store_fence) and the "proxy shadow": see proxy_generic_write below.
//  * prefetch.tensormap and the tile prefetch (cp.async.bulk.prefetch.tensor): the descriptor
//    is validated, nothing else happens.
//  * cute's own mbarrier helpers (initialize_barrier, set_barrier_transaction_bytes,
//    wait_barrier, arrive_barrier in cute/arch/copy_sm90_desc.hpp, host no-ops otherwise) go to
//    sm90_emu.h's mbarrier.
// Checked on the way (each fails the launch): the descriptor (made by the encode stub, 64-byte
// aligned, not in shared memory; element strides 1, OOB fill NONE for loads), the coordinate
// count against its rank, the shared address (16-byte aligned, 128 with a swizzle; the whole
// box inside the block's dynamic shared memory), the mbarrier (in shared memory, initialised).
// A descriptor that the encode stub rejects fails at make_tma_copy (sm90_overlay_tma.py).
// Not emulated (they fail loudly through CUTE_INVALID_CONTROL_PATH): multicast and im2col
// loads, im2col stores, TMA reduce-add, non-tensor bulk copies, descriptor modification.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace ostq_emu {
namespace sm90 {

// The reason of encode_tiled's last rejection (its log's last REJECT line).
inline std::string encode_last_reject() {
  const std::string& log = encode_log();
  const size_t i = log.rfind("REJECT: ");
  if (i == std::string::npos) return "(no reason logged)";
  return log.substr(i + 8, log.find('\n', i) - i - 8);
}

// ------------------------------------------------------------------ box geometry
// The swizzle of the TMA (and GMMA) on a shared-window byte address: CU_TENSOR_MAP_SWIZZLE_32B
// = 1, 64B = 2, 128B = 3 bits of the 16-byte chunk index XORed with the 128-byte row index.
inline uint32_t tma_swizzle(uint32_t addr, uint32_t mode) {
  if (mode == CU_TENSOR_MAP_SWIZZLE_NONE) return addr;
  const uint32_t mask = (1u << mode) - 1u;
  return addr ^ (((addr >> 7) & mask) << 4);
}

struct TmaBox {
  TensorMapRec r;        // the descriptor as it was at issue
  int64_t c[5] = {0, 0, 0, 0, 0};
  uint64_t bytes = 0;    // box bytes (OOB elements included)
};

inline std::string tma_where(const char* op, const TmaBox& b) {
  std::string s = std::string(op) + " (rank " + std::to_string(b.r.rank) + ", coordinates (";
  for (uint32_t i = 0; i < b.r.rank; ++i) s += (i ? "," : "") + std::to_string(b.c[i]);
  return s + "), box " + std::to_string(b.bytes) + " bytes)";
}

// Decodes and checks the descriptor and the coordinates of one TMA instruction.
inline TmaBox tma_box(const void* desc, std::initializer_list<int32_t> crd, const char* op) {
  if (overlaps_smem(desc, sizeof(CUtensorMap))) {
    fail(std::string(op) + ": the tensor map is in shared memory (it must be in global, const "
         "or kernel-parameter memory)");
  }
  TmaBox b;
  b.r = tensor_map(desc);
  if (crd.size() != b.r.rank) {
    fail(std::string(op) + ": " + std::to_string(crd.size()) + " coordinates for a tensor map of rank " +
         std::to_string(b.r.rank));
  }
  uint32_t i = 0;
  for (int32_t v : crd) b.c[i++] = v;
  b.bytes = b.r.esize;
  for (i = 0; i < 5; ++i) {
    if (b.r.estride[i] != 1) fail(std::string(op) + ": elementStrides != 1 are not emulated");
    b.bytes *= b.r.box[i];
  }
  if (b.r.interleave != CU_TENSOR_MAP_INTERLEAVE_NONE) fail(std::string(op) + ": interleaved layout not emulated");
  if (b.r.swizzle > CU_TENSOR_MAP_SWIZZLE_128B) fail(std::string(op) + ": swizzle mode not emulated");
  return b;
}

// The shared-window address of a box at `p`: 16-byte aligned (128 with a swizzle, the TMA's
// rule; the swizzle then acts on the window address bits, as the hardware's does on the
// shared address) and wholly inside the block's dynamic shared memory. The swizzle moves
// 16-byte chunks only inside their 128-byte row, so a swizzled box lies in
// [addr, addr + bytes rounded up to 128).
inline uint32_t tma_smem_box(const void* p, const TmaBox& b, const char* op) {
  const Sched& s = S();
  const auto* q = static_cast<const unsigned char*>(p);
  if (s.dyn_base == nullptr || q < s.dyn_base || q >= s.dyn_base + s.dyn_smem_bytes) {
    fail(tma_where(op, b) + ": shared address " + addr_str(p) +
         " is not in the block's dynamic shared memory");
  }
  const uint32_t addr = smem_window_addr(p);
  const uint32_t align = b.r.swizzle != CU_TENSOR_MAP_SWIZZLE_NONE ? 128 : 16;
  if (addr % align) {
    fail(tma_where(op, b) + ": shared address " + std::to_string(addr) + " is not " +
         std::to_string(align) + "-byte aligned");
  }
  const uint64_t extent = b.r.swizzle != CU_TENSOR_MAP_SWIZZLE_NONE ? (b.bytes + 127) / 128 * 128 : b.bytes;
  if (addr - kDynSmemWindowBase + extent > s.dyn_smem_bytes) {
    fail(tma_where(op, b) + ": the box at shared address " + std::to_string(addr) +
         " ends past the block's dynamic shared memory (" + std::to_string(s.dyn_smem_bytes) + " bytes)");
  }
  return addr;
}

// Calls f(smem window address of the element, global address or nullptr when out of bounds)
// for every element of the box, in the box's dense order.
template <class F>
inline void tma_for_each(const TmaBox& b, uint32_t smem, F&& f) {
  const TensorMapRec& r = b.r;
  const uint32_t es = r.esize;
  uint32_t lin = 0;
  auto* g = reinterpret_cast<unsigned char*>(r.gaddr);
  for (uint32_t i4 = 0; i4 < r.box[4]; ++i4)
    for (uint32_t i3 = 0; i3 < r.box[3]; ++i3)
      for (uint32_t i2 = 0; i2 < r.box[2]; ++i2)
        for (uint32_t i1 = 0; i1 < r.box[1]; ++i1) {
          const int64_t x[5] = {0, b.c[1] + i1, b.c[2] + i2, b.c[3] + i3, b.c[4] + i4};
          bool row_in = true;
          int64_t row_off = 0;
          for (int d = 1; d < 5; ++d) {
            row_in = row_in && x[d] >= 0 && x[d] < static_cast<int64_t>(r.gdim[d]);
            if (d < static_cast<int>(r.rank)) row_off += x[d] * static_cast<int64_t>(r.gstride[d - 1]);
          }
          for (uint32_t i0 = 0; i0 < r.box[0]; ++i0, lin += es) {
            const int64_t x0 = b.c[0] + i0;
            const bool in = row_in && x0 >= 0 && x0 < static_cast<int64_t>(r.gdim[0]);
            f(tma_swizzle(smem + lin, r.swizzle), in ? g + row_off + x0 * es : nullptr);
          }
        }
}

// ------------------------------------------------------------------ per-block state
struct PendingLoad {
  TmaBox box;
  uint32_t dst;           // shared window address
};
struct PendingStore {
  TmaBox box;
  uint32_t src;                     // shared window address
  long long group;                  // commit groups of the thread before it was issued
  std::vector<unsigned char> snap;  // the source bytes at issue (tma_gather)
};
struct ThreadBulk {
  std::vector<PendingStore> pending;
  long long committed = 0;
};
struct TmaBlock {
  std::map<const void*, std::vector<PendingLoad>> loads;  // by mbarrier, in issue order
  std::vector<ThreadBulk> bulk;                           // by thread
  // proxy shadow (proxy_generic_write): per byte of dynamic shared memory, the thread whose
  // generic-proxy write is not yet fenced (-1: none); per thread, the byte ranges it marked
  std::vector<int16_t> owner;
  std::vector<std::vector<std::pair<uint32_t, uint32_t>>> unfenced;
};
inline BlockLocal<TmaBlock>& tma_local() {
  static thread_local BlockLocal<TmaBlock> b;
  return b;
}
// This block's state (reset when a new block or launch starts using it).
inline TmaBlock& tma_state() {
  return tma_local().state([](TmaBlock& b) {
    const Sched& s = S();
    b.loads.clear();
    b.bulk.assign(s.nthreads, ThreadBulk{});
    b.owner.clear();
    b.unfenced.assign(s.nthreads, {});
  });
}

// ------------------------------------------------------------------ async proxy
// The proxy shadow (REPORT §3.3). Generic-proxy writes to shared memory that a TMA store may
// read must be made visible to the async proxy by fence.proxy.async.shared::cta. The model:
//  * proxy_generic_write(p, bytes): the calling thread wrote these bytes through the generic
//    proxy (called by the emulated instructions that write shared memory, e.g. stmatrix); they
//    are "unfenced, by this thread". Writes outside the dynamic shared memory are ignored (the
//    TMA cannot address them here). Plain C++ stores are not tracked.
//  * fence_proxy_async(): the calling thread's own unfenced bytes become fenced (the fence
//    orders the executing thread's accesses; another thread's fence does not cover them).
//    Bytes written later by another thread belong to that thread.
//  * a TMA store that reads a byte still unfenced at its issue is an error naming the writer.
//    The ordering of the writer's fence before the store (CUTLASS: a named barrier) is not
//    checked here; a write after the store's issue shows as a modified source (see above).
//  * a TMA load that lands on bytes clears them (the data now comes from the async proxy).
inline void proxy_generic_write(const void* p, size_t bytes) {
  const Sched& s = S();
  const auto* q = static_cast<const unsigned char*>(p);
  if (bytes == 0 || s.dyn_base == nullptr || q < s.dyn_base || q + bytes > s.dyn_base + s.dyn_smem_bytes) return;
  TmaBlock& b = tma_state();
  if (b.owner.empty()) b.owner.assign(s.dyn_smem_bytes, -1);
  const uint32_t off = static_cast<uint32_t>(q - s.dyn_base);
  const int16_t t = static_cast<int16_t>(s.cur->lin);
  std::fill(b.owner.begin() + off, b.owner.begin() + off + bytes, t);
  auto& mine = b.unfenced[s.cur->lin];
  if (!mine.empty() && mine.back().first + mine.back().second == off) {
    mine.back().second += static_cast<uint32_t>(bytes);
  } else {
    mine.emplace_back(off, static_cast<uint32_t>(bytes));
  }
}
// fence.proxy.async.shared::cta (cutlass::arch::fence_view_async_shared, cute::tma_store_fence)
inline void fence_proxy_async() {
  TmaBlock& b = tma_state();
  auto& mine = b.unfenced[S().cur->lin];
  const int16_t t = static_cast<int16_t>(S().cur->lin);
  for (const auto& rg : mine) {
    for (uint32_t i = rg.first; i < rg.first + rg.second; ++i) {
      if (b.owner[i] == t) b.owner[i] = -1;
    }
  }
  mine.clear();
}

// ------------------------------------------------------------------ TMA load
// Performs the loads recorded on `mbar` (in issue order): smem written, complete_tx.
// sm90_emu.h's mbar_test_parity calls it first, so they land when a thread tests or waits.
inline void tma_deliver(const void* mbar) {
  TmaBlock& st = tma_state();
  auto it = st.loads.find(mbar);
  if (it == st.loads.end()) return;
  std::vector<PendingLoad> loads = std::move(it->second);
  st.loads.erase(it);
  for (const PendingLoad& l : loads) {
    const uint32_t es = l.box.r.esize;
    tma_for_each(l.box, l.dst, [&](uint32_t a, const unsigned char* g) {
      unsigned char* d = smem_window_ptr(a, es);
      if (g == nullptr) {
        std::memset(d, 0, es);  // OOB_FILL_NONE
      } else {
        if (overlaps_smem(g, es)) fail(tma_where("TMA load", l.box) + ": global source in shared memory");
        std::memcpy(d, g, es);
      }
    });
    if (!st.owner.empty()) {
      tma_for_each(l.box, l.dst, [&](uint32_t a, const unsigned char*) {
        const uint32_t off = a - kDynSmemWindowBase;
        std::fill(st.owner.begin() + off, st.owner.begin() + off + es, int16_t(-1));
      });
    }
    mbar_complete_tx(mbar, static_cast<uint32_t>(l.box.bytes));
  }
}

// cp.async.bulk.tensor.Nd.shared::cluster.global.mbarrier::complete_tx::bytes [smem], [desc, crd], [mbar]
inline void tma_load(const void* desc, const uint64_t* mbar, void* smem, std::initializer_list<int32_t> crd) {
  const TmaBox b = tma_box(desc, crd, "TMA load");
  if (b.r.oob != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) fail(tma_where("TMA load", b) + ": OOB fill NaN not emulated");
  const uint32_t dst = tma_smem_box(smem, b, "TMA load");
  mbar_get(mbar, "TMA load (complete_tx)");
  if (b.bytes >= (1u << 20)) fail(tma_where("TMA load", b) + ": more transaction bytes than an mbarrier counts");
  // undefined until the copy completes
  tma_for_each(b, dst, [&](uint32_t a, const unsigned char*) { std::memset(smem_window_ptr(a, b.r.esize), 0xFF, b.r.esize); });
  tma_state().loads[mbar].push_back(PendingLoad{b, dst});
  progress();
}

// cp.async.bulk.prefetch.tensor.Nd.L2.global [desc, crd]: a hint; the operands are checked.
inline void tma_prefetch_tile(const void* desc, std::initializer_list<int32_t> crd) {
  (void)tma_box(desc, crd, "TMA prefetch");
}
// prefetch.tensormap [desc]
inline void prefetch_tensormap(const void* desc) {
  if (overlaps_smem(desc, sizeof(CUtensorMap))) fail("prefetch.tensormap: the tensor map is in shared memory");
  (void)tensor_map(desc);
}

// ------------------------------------------------------------------ TMA store, bulk groups
// The box's bytes in shared memory, in the box's dense order.
inline std::vector<unsigned char> tma_gather(const TmaBox& b, uint32_t smem) {
  std::vector<unsigned char> v(b.bytes);
  const uint32_t es = b.r.esize;
  size_t k = 0;
  tma_for_each(b, smem, [&](uint32_t a, const unsigned char*) {
    std::memcpy(v.data() + k, smem_window_ptr(a, es), es);
    k += es;
  });
  return v;
}

inline void tma_store_perform(const PendingStore& p) {
  const std::vector<unsigned char> now = tma_gather(p.box, p.src);  // read now, at the wait
  if (now != p.snap) {
    size_t i = 0;
    while (now[i] == p.snap[i]) ++i;
    fail(tma_where("TMA store", p.box) + ": its shared source (box byte " + std::to_string(i) +
         ") was modified while the store was in flight (before a cp.async.bulk.wait_group.read "
         "covering it)");
  }
  const uint32_t es = p.box.r.esize;
  size_t k = 0;
  tma_for_each(p.box, p.src, [&](uint32_t, unsigned char* g) {
    if (g != nullptr) {  // else clipped
      if (overlaps_smem(g, es)) fail(tma_where("TMA store", p.box) + ": global destination in shared memory");
      std::memcpy(g, now.data() + k, es);
    }
    k += es;
  });
}

// cp.async.bulk.tensor.Nd.global.shared::cta.bulk_group [desc, crd], [smem]
inline void tma_store(const void* desc, const void* smem, std::initializer_list<int32_t> crd) {
  const TmaBox b = tma_box(desc, crd, "TMA store");
  const uint32_t src = tma_smem_box(smem, b, "TMA store");
  TmaBlock& st = tma_state();
  if (!st.owner.empty()) {
    tma_for_each(b, src, [&](uint32_t a, const unsigned char*) {
      for (uint32_t i = a - kDynSmemWindowBase; i < a - kDynSmemWindowBase + b.r.esize; ++i) {
        if (st.owner[i] >= 0) {
          fail(tma_where("TMA store", b) + ": shared source byte " + std::to_string(kDynSmemWindowBase + i) +
               " was written by thread " + std::to_string(st.owner[i]) + " through the generic proxy "
               "and not fenced by that thread (fence.proxy.async.shared::cta) before the store");
        }
      }
    });
  }
  ThreadBulk& tb = st.bulk[S().cur->lin];
  tb.pending.push_back(PendingStore{b, src, tb.committed, tma_gather(b, src)});
}

// cp.async.bulk.commit_group (cute::tma_store_arrive)
inline void bulk_commit_group() { ++tma_state().bulk[S().cur->lin].committed; }

// cp.async.bulk.wait_group.read n (cute::tma_store_wait<n>): the stores of all but the n most
// recent committed groups of this thread are performed; n < 0: every pending store, committed
// or not (thread exit).
inline void bulk_wait_group_read(int n) {
  TmaBlock& st = tma_state();
  ThreadBulk& tb = st.bulk[S().cur->lin];
  const long long upto = n < 0 ? tb.committed + 1 : tb.committed - n;
  std::vector<PendingStore> keep;
  std::vector<PendingStore> now;
  for (PendingStore& p : tb.pending) (p.group < upto ? now : keep).push_back(std::move(p));
  tb.pending.swap(keep);
  for (const PendingStore& p : now) tma_store_perform(p);
}

// simt_emu.h thread-exit hook: bulk stores never waited for are still performed.
inline void tma_thread_exit() {
  if (!tma_local().current()) return;
  TmaBlock& b = tma_local().value();
  const int t = S().cur->lin;
  if (t < static_cast<int>(b.bulk.size()) && !b.bulk[t].pending.empty()) bulk_wait_group_read(-1);
}
inline const bool kTmaThreadExitHook = (thread_exit_hooks().push_back(&tma_thread_exit), true);

// What the self-test inspects: the loads recorded on an mbarrier and not yet performed, the
// stores of the calling thread not yet performed.
inline size_t tma_pending_loads(const void* mbar) {
  TmaBlock& st = tma_state();
  auto it = st.loads.find(mbar);
  return it == st.loads.end() ? 0 : it->second.size();
}
inline size_t tma_pending_stores() { return tma_state().bulk[S().cur->lin].pending.size(); }

}  // namespace sm90
}  // namespace ostq_emu
