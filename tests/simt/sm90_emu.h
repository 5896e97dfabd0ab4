// sm90 pieces of the SIMT emulator (tests/simt/sm90_study/REPORT.md; PROGRESS.md), included by
// sm90_prelude.h after simt_emu.h in builds with the Hopper GEMMs; the sm90 overlay routes
// CUTLASS's barrier.h sites here. Self-test: sm90_selftest.cpp.
//
//  * cuTensorMapEncodeTiled stub (reached through cudaGetDriverEntryPointByVersion, see the
//    runtime entry points below): the driver's documented checks, the parameters recorded in the
//    128-byte CUtensorMap under a magic number (ported from sm90_study/proto_sm90.cpp).
//  * mbarrier with arrival and transaction counts and phase parity; blocking waits spin with
//    a yield to the scheduler, with a no-progress deadlock report.
//  * named barriers bar.sync id, count (ids 0..15, count a multiple of 32, the same count from
//    every arrival of a phase).
#pragma once

#include <cuda.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <vector>
#include <algorithm>

namespace ostq_emu {
namespace sm90 {

// ------------------------------------------------------------------ TMA descriptor (encode stub)
struct TensorMapRec {
  uint32_t magic, dtype, rank, interleave, swizzle, l2, oob, esize;  // 32 bytes
  uint64_t gaddr;                                                     // 8
  uint64_t gdim[5];                                                   // 40
  uint64_t gstride[4];                                                // 32 (bytes, dims 1..4)
  uint16_t box[5];                                                    // 10
  uint8_t estride[5];                                                 // 5
  uint8_t pad[1];
};
static_assert(sizeof(TensorMapRec) <= sizeof(CUtensorMap), "fits the opaque descriptor");
constexpr uint32_t kTensorMapMagic = 0x0A7E5A90u;

inline std::string& encode_log() {
  static thread_local std::string log;
  return log;
}

inline uint32_t elem_size(CUtensorMapDataType t) {
  switch (t) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: return 1;
    case CU_TENSOR_MAP_DATA_TYPE_UINT16: case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16: return 2;
    case CU_TENSOR_MAP_DATA_TYPE_UINT32: case CU_TENSOR_MAP_DATA_TYPE_INT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32: case CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32: case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ: return 4;
    case CU_TENSOR_MAP_DATA_TYPE_UINT64: case CU_TENSOR_MAP_DATA_TYPE_INT64:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT64: return 8;
    default: return 0;  // packed sub-byte types: not used by our kernels
  }
}

// cuTensorMapEncodeTiled's signature (CUDA 12/13 driver API). Returns CUDA_ERROR_INVALID_VALUE
// (and logs why in encode_log()) where the driver documents a requirement.
inline CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType dt, cuuint32_t rank, void* gaddr,
                             const cuuint64_t* gdim, const cuuint64_t* gstride, const cuuint32_t* box,
                             const cuuint32_t* estride, CUtensorMapInterleave il,
                             CUtensorMapSwizzle sw, CUtensorMapL2promotion l2,
                             CUtensorMapFloatOOBfill oob) {
  const uint32_t es = elem_size(dt);
  auto bad = [&](const char* why) {
    encode_log() += std::string("REJECT: ") + why + "\n";
    return CUDA_ERROR_INVALID_VALUE;
  };
  if (reinterpret_cast<uintptr_t>(map) % 64) return bad("tensorMap not 64-byte aligned");
  if (es == 0) return bad("data type not emulated");
  if (rank < 1 || rank > 5) return bad("rank");
  if (reinterpret_cast<uintptr_t>(gaddr) % 16) return bad("globalAddress not 16-byte aligned");
  if (il != CU_TENSOR_MAP_INTERLEAVE_NONE) return bad("interleave not emulated");
  for (uint32_t i = 0; i < rank; ++i) {
    if (gdim[i] == 0 || gdim[i] > (1ull << 32)) return bad("globalDim");
    if (box[i] == 0 || box[i] > 256) return bad("boxDim");
    if (estride[i] == 0 || estride[i] > 8) return bad("elementStrides");
    if (i > 0 && estride[i] != 1) return bad("elementStrides != 1 not emulated");
  }
  for (uint32_t i = 0; i + 1 < rank; ++i)
    if (gstride[i] % 16 || gstride[i] >= (1ull << 40)) return bad("globalStrides");
  if ((box[0] * es) % 16) return bad("boxDim[0] * elementSize not a multiple of 16 bytes");
  const uint32_t span = sw == CU_TENSOR_MAP_SWIZZLE_32B ? 32 : sw == CU_TENSOR_MAP_SWIZZLE_64B ? 64
                      : sw == CU_TENSOR_MAP_SWIZZLE_128B ? 128 : 0;
  if (sw != CU_TENSOR_MAP_SWIZZLE_NONE && span == 0) return bad("swizzle mode not emulated");
  if (span && box[0] * es > span) return bad("inner box dimension exceeds the swizzle span");
  TensorMapRec r{};
  r.magic = kTensorMapMagic; r.dtype = dt; r.rank = rank; r.interleave = il; r.swizzle = sw;
  r.l2 = l2; r.oob = oob; r.esize = es; r.gaddr = reinterpret_cast<uint64_t>(gaddr);
  for (uint32_t i = 0; i < 5; ++i) {
    r.gdim[i] = i < rank ? gdim[i] : 1;
    r.box[i] = static_cast<uint16_t>(i < rank ? box[i] : 1);
    r.estride[i] = static_cast<uint8_t>(i < rank ? estride[i] : 1);
  }
  for (uint32_t i = 0; i + 1 < rank; ++i) r.gstride[i] = gstride[i];
  std::memset(map, 0, sizeof(*map));
  std::memcpy(map, &r, sizeof(r));
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "encode: dtype=%u esize=%u rank=%u gdim=(%llu,%llu,%llu) gstride=(%llu,%llu) "
                "box=(%u,%u,%u) swizzle=%u oob=%u\n",
                dt, es, rank, (unsigned long long)r.gdim[0], (unsigned long long)r.gdim[1],
                (unsigned long long)r.gdim[2], (unsigned long long)r.gstride[0],
                (unsigned long long)r.gstride[1], r.box[0], r.box[1], r.box[2], sw, oob);
  encode_log() += buf;
  return CUDA_SUCCESS;
}

// The record of a descriptor made by encode_tiled (fails on anything else).
inline const TensorMapRec& tensor_map(const void* desc) {
  if (reinterpret_cast<uintptr_t>(desc) % 64) fail("TMA: descriptor not 64-byte aligned");
  const auto* r = static_cast<const TensorMapRec*>(desc);
  if (r->magic != kTensorMapMagic) fail("TMA: descriptor not made by the cuTensorMapEncodeTiled stub");
  return *r;
}

// State an sm90 piece keeps per block (spin counts, barriers, stream-K flag reads, TMA's
// queues, wgmma's warp groups):
// state(reset) returns it, after reset(value) when a new block or launch first uses it;
// current() tells whether this block has used it yet (the thread-exit hooks).
template <class T>
class BlockLocal {
 public:
  template <class Reset>
  T& state(Reset&& reset) {
    if (!current()) {
      const Sched& s = S();
      reset(value_);
      launch_ = s.launches;
      block_ = s.block_idx;
    }
    return value_;
  }
  bool current() const {
    const Sched& s = S();
    return launch_ == s.launches && block_.x == s.block_idx.x && block_.y == s.block_idx.y &&
           block_.z == s.block_idx.z;
  }
  T& value() { return value_; }

 private:
  long long launch_ = -1;
  uint3 block_{~0u, ~0u, ~0u};
  T value_{};
};

// ------------------------------------------------------------------ progress / spin waits
// Every barrier state change is progress. A thread whose wait is not satisfied yields to the
// scheduler (spin). The block is deadlocked when every runnable thread has spun twice since the
// last progress: each had its turn after the others and nothing changed (threads that block at
// __syncthreads or a warp collective are the scheduler's own deadlock check). spin_counts: the
// spins per thread since the last progress, in this block.
inline std::vector<int>& spin_counts() {
  static thread_local BlockLocal<std::vector<int>> b;
  return b.state([](std::vector<int>& v) { v.assign(S().nthreads, 0); });
}
inline void progress() {
  auto& v = spin_counts();
  std::fill(v.begin(), v.end(), 0);
}
inline void spin_yield(const std::string& what) {
  Sched& s = S();
  auto& v = spin_counts();
  ++v[s.cur->lin];
  bool stuck = true;
  for (int i = 0; i < s.nthreads && stuck; ++i) {
    if (s.fibers[i].state == St::kRun && v[i] < 2) stuck = false;
  }
  if (stuck) fail("deadlock: " + what + " never completes (every runnable thread waits, no barrier progress)");
  yield_to_scheduler();
}

// Per-block barrier state.
struct MBar {
  uint32_t expected = 0;   // arrivals per phase
  uint32_t pending = 0;    // arrivals still missing in the current phase
  long long tx = 0;        // transaction bytes expected and not yet completed
  uint32_t phase = 0;      // completed phases
};
struct NamedBar {
  uint32_t count = 0, arrived = 0;
  unsigned long long generation = 0;
};
struct BlockBarriers {
  std::map<const void*, MBar> mbar;
  NamedBar named[16];
};
inline BlockBarriers& barriers() {
  static thread_local BlockLocal<BlockBarriers> b;
  return b.state([](BlockBarriers& v) { v = BlockBarriers{}; });
}

inline std::string addr_str(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

// ------------------------------------------------------------------ mbarrier
inline void mbar_check(const void* p) {
  if (!in_smem(p, 8)) fail("mbarrier " + addr_str(p) + " is not in shared memory");
  if (reinterpret_cast<uintptr_t>(p) % 8) fail("mbarrier " + addr_str(p) + " not 8-byte aligned");
}
inline MBar& mbar_get(const void* p, const char* op) {
  mbar_check(p);
  auto& m = barriers().mbar;
  auto it = m.find(p);
  if (it == m.end()) fail(std::string(op) + " on mbarrier " + addr_str(p) + ", which was never initialised");
  return it->second;
}
inline void mbar_maybe_complete(MBar& b, const void* p) {
  if (b.pending == 0 && b.tx < 0) {
    fail("mbarrier " + addr_str(p) + ": " + std::to_string(-b.tx) +
         " transaction bytes more than expected completed in phase " + std::to_string(b.phase));
  }
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.expected;
    progress();
  }
}
inline void mbar_init(const void* p, uint32_t count) {
  mbar_check(p);
  if (count == 0 || count >= (1u << 20)) fail("mbarrier.init: arrival count " + std::to_string(count));
  barriers().mbar[p] = MBar{count, count, 0, 0};
  progress();
}
inline void mbar_arrive(const void* p, uint32_t count = 1) {
  MBar& b = mbar_get(p, "mbarrier.arrive");
  if (count > b.pending) {
    fail("mbarrier.arrive on " + addr_str(p) + ": " + std::to_string(count) + " arrival(s), " +
         std::to_string(b.pending) + " pending in phase " + std::to_string(b.phase));
  }
  b.pending -= count;
  progress();
  mbar_maybe_complete(b, p);
}
inline void mbar_expect_tx(const void* p, uint32_t bytes) {
  MBar& b = mbar_get(p, "mbarrier.expect_tx");
  b.tx += bytes;
  progress();
}
inline void mbar_arrive_expect_tx(const void* p, uint32_t bytes) {
  mbar_expect_tx(p, bytes);
  mbar_arrive(p);
}
inline void mbar_complete_tx(const void* p, uint32_t bytes) {
  MBar& b = mbar_get(p, "complete_tx");
  b.tx -= bytes;
  progress();
  mbar_maybe_complete(b, p);
}
// mbarrier.try_wait.parity / test_wait.parity: has the phase with this parity completed? (the
// current, incomplete phase has parity phase & 1)
inline bool mbar_test_parity(const void* p, uint32_t parity) {
  void tma_deliver(const void* mbar); tma_deliver(p);  // sm90_tma.h: pending TMA loads on p land first
  MBar& b = mbar_get(p, "mbarrier.try_wait.parity");
  return (b.phase & 1u) != (parity & 1u);
}
inline void mbar_wait_parity(const void* p, uint32_t parity) {
  while (!mbar_test_parity(p, parity)) {
    spin_yield("mbarrier wait on " + addr_str(p) + " for parity " + std::to_string(parity & 1u));
  }
}
inline uint32_t mbar_phase(const void* p) { return mbar_get(p, "phase").phase; }

// ------------------------------------------------------------------ named barriers
// bar.sync id, count (count in threads, a multiple of the warp size; every arrival of one phase
// names the same count). __syncthreads stays the emulator's own (id 0 with every thread).
inline void bar_sync(uint32_t id, uint32_t count) {
  if (id >= 16) fail("bar.sync: barrier id " + std::to_string(id) + " (0..15)");
  if (count == 0 || count % kWarpSize || count > static_cast<uint32_t>(S().nthreads)) {
    fail("bar.sync " + std::to_string(id) + ": thread count " + std::to_string(count) +
         " (a multiple of 32, at most the block's " + std::to_string(S().nthreads) + ")");
  }
  NamedBar& b = barriers().named[id];
  if (b.arrived == 0) {
    b.count = count;
  } else if (b.count != count) {
    fail("bar.sync " + std::to_string(id) + ": count " + std::to_string(count) +
         " meets count " + std::to_string(b.count) + " of earlier arrivals");
  }
  const unsigned long long gen = b.generation;
  progress();
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (barriers().named[id].generation == gen) {
    spin_yield("bar.sync " + std::to_string(id) + ", " + std::to_string(count));
  }
}

// ------------------------------------------------------------------ runtime entry points
// What the host-compiled CUTLASS Hopper GEMM calls in the CUDA runtime beyond simt_emu.h's, as
// macros in sm90_prelude.h (like simt_emu.h's: a link-time definition would lose to libcudart,
// which torch has loaded, and the real driver's cuTensorMapEncodeTiled would run):
//  * cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled") -> encode_tiled (CUDA >= 13:
//    cuda_host_adapter.hpp fetches the encoder through it); any other symbol fails;
//  * cudaMemsetAsync (workspace.h zero_workspace, the stream-K locks): emulated memory is host
//    memory and streams are synchronous.
// (cudaLaunchKernelExC, reached by kernel_launch.h's programmatic-dependent-launch branch, which
// our kernels never take: a weak definition below fails loudly where no libcudart is linked, as
// in sm90_spike.py's programs; in the torch extension the real runtime's may win, and fails
// without a GPU.)
inline cudaError_t get_driver_entry_point_by_version(const char* symbol, void** fn, unsigned int,
                                                     unsigned long long,
                                                     cudaDriverEntryPointQueryResult* status) {
  if (std::string(symbol) == "cuTensorMapEncodeTiled") {
    *fn = reinterpret_cast<void*>(&encode_tiled);
    if (status) *status = cudaDriverEntryPointSuccess;
    return cudaSuccess;
  }
  fail(std::string("sm90 emulator: driver entry point not emulated: ") + symbol);
}
inline cudaError_t memset_async(void* p, int value, size_t count, cudaStream_t = nullptr) {
  if (count == 0) return cudaSuccess;
  if (p == nullptr) return cudaErrorInvalidValue;
  std::memset(p, value, count);
  return cudaSuccess;
}

// ------------------------------------------------------------------ stream-K flags
// cutlass::GenericBarrier (stream-K partial-tile locks in global memory): one thread of a CTA spins
// on ld.acquire.gpu until other CTAs' red.release adds reach a value. The emulator runs blocks one
// after another in blockIdx order (sm90_study/REPORT.md §2.5: with that order no CTA waits on a
// later one), so a wait that is not satisfied when reached can only be satisfied by its own
// block: a load that returns the same value as this thread's previous load of the flag is a spin
// (yield, and the deadlock report when nothing in the block makes progress).
struct FlagSpin {  // this thread's previous flag load in this block
  const int* ptr = nullptr;
  int value = 0;
};
inline FlagSpin& flag_spin() {
  static thread_local BlockLocal<std::vector<FlagSpin>> b;
  return b.state([](std::vector<FlagSpin>& v) { v.assign(S().nthreads, FlagSpin{}); })[S().cur->lin];
}
inline int flag_ld_acquire(const int* ptr) {
  check_access("ld.global.acquire.gpu (stream-K flag)", ptr, 4, false);
  FlagSpin& f = flag_spin();
  int v;
  std::memcpy(&v, ptr, 4);
  if (f.ptr == ptr && f.value == v) {
    spin_yield("the stream-K flag at " + addr_str(ptr) + " (stays " + std::to_string(v) +
               "; block (" + std::to_string(S().block_idx.x) + "," + std::to_string(S().block_idx.y) +
               ") waits on a CTA that has not run or will not signal)");
    std::memcpy(&v, ptr, 4);
  }
  f = FlagSpin{ptr, v};
  return v;
}
inline void flag_red_release(int* ptr, int val) {
  check_access("red.relaxed.gpu.global.add (stream-K flag)", ptr, 4, false);
  int v;
  std::memcpy(&v, ptr, 4);
  v += val;
  std::memcpy(ptr, &v, 4);
  progress();
}

}  // namespace sm90
}  // namespace ostq_emu

extern "C" __attribute__((weak)) cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t*, const void*,
                                                                 void**) {
  ::ostq_emu::fail("sm90 emulator: cudaLaunchKernelExC (programmatic dependent launch) is not emulated");
}
