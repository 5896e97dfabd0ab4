// A SIMT emulator for ostquant's hand-written CUDA kernels, so that their code runs (and is
// tested against the reference ops) on a machine without a GPU.
//
// The kernel sources (csrc/) are compiled as plain C++ by the host compiler with this header
// force-included (tests/simt/build.py rewrites `k<<<grid, block, smem, stream>>>(args)` into
// ostq_emu::launch(...) and `extern __shared__ T x[]` into the launch's dynamic shared memory).
// Each CUDA thread of a block is a fiber (ucontext) on the calling OS thread; blocks run one
// after another. A fiber runs until it reaches __syncthreads() or a warp-collective operation
// (shuffle, vote, mma.sync) and waits there until every thread taking part has arrived, as on
// the GPU. Shared memory (`__shared__` arrays, rewritten by build.py, and the dynamic buffer)
// starts each block as 0xFF bytes. What it checks on the way (each raises std::runtime_error, naming the kernel):
//
//   * __syncthreads() reached by only part of a block (some threads returned or wait elsewhere);
//   * a warp collective whose mask names a lane that does not exist, has returned, or has not
//     reached the same collective; a shuffle from a lane outside the mask;
//   * launch configurations the GPU rejects (empty grid, > 1024 threads, grid.y/z > 65535,
//     dynamic shared memory above 48 KiB without cudaFuncSetAttribute, above 227 KiB at all),
//     reported like CUDA through cudaGetLastError();
//   * __trap().
//
// `order` (set_schedule) runs the threads of a block in ascending or descending order between
// barriers: a kernel that reads shared memory another thread writes without a barrier between
// gives different results under the two orders, which the tests compare.
//
// Tensor-core instructions are emulated from the fragment layouts of the PTX ISA
// (mma.sync.aligned.m16n8k16 f16/bf16 -> f32, m16n8k32 s8 -> s32, m16n8k64 s4 -> s32), ex2.approx
// as exp2f. For CUTLASS's Ampere int4 GEMM (csrc/gemm/sm80, through the patched headers of
// cutlass_overlay.py) also ldmatrix, cp.async (landing at cp.async.wait_group), ld/st.global,
// with alignment and shared-vs-global checks. Only what ostquant's kernels use is here; the
// Hopper CUTLASS kernels (TMA, wgmma) are out of reach.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <vector>

// Fiber switches: _setjmp/_longjmp between stacks (no signal-mask syscall: ~50x faster than
// swapcontext, which only starts each fiber), or swapcontext throughout under AddressSanitizer,
// with every switch announced to it (__sanitizer_start/finish_switch_fiber): ASan then knows
// which stack is current, so a C++ throw on a fiber unpoisons that fiber's stack rather than a
// guess at the main thread's (which reported the fiber's own frames as use-after-scope).
// (The memprof build's kernel-address instrumentation defines __SANITIZE_ADDRESS__ too, but runs
// no ASan runtime: it keeps the fast switch.)
#if defined(__SANITIZE_ADDRESS__) && !defined(OSTQ_SIMT_MEMPROF)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define OSTQ_SIMT_FAST_SWITCH 0
#else
#define OSTQ_SIMT_FAST_SWITCH 1
#endif

namespace ostq_emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultSmemLimit = 48 * 1024;
// The 32-bit shared window (cvta.to.shared, cute::cast_smem_ptr_to_uint): the first KiB is the
// system's (as on Hopper), the launch's dynamic shared memory starts at 1024, 1024-byte aligned
constexpr size_t kSmemWindowAlign = 1024;
constexpr uint32_t kDynSmemWindowBase = 1024;

enum class St { kRun, kBlockWait, kWarpWait, kDone };

// A cp.async in flight (CUTLASS's multistage mainloops): the bytes it read, written to shared
// memory only when a cp.async.wait_group that covers its group runs (or the thread ends).
struct PendingCopy {
  unsigned char* dst;
  unsigned char data[16];
  int bytes;
  long long group;      // commit groups of the thread before it was issued
};

struct Fiber {
  ucontext_t ctx;
  jmp_buf jb;           // where a suspended fiber resumes (fast switch)
  bool started = false;
  char* stack = nullptr;
  void* asan_fake_stack = nullptr;  // (ASan) the fiber's fake stack while it is switched out
  uint3 tid;
  int lin = 0;
  St state = St::kDone;
  std::vector<PendingCopy> cp_pending;  // cp.async issued, not yet waited for
  long long cp_committed = 0;           // cp.async.commit_group count
};

struct WarpState {
  unsigned arrived = 0;      // lanes waiting at the current collective
  unsigned mask = 0;         // the collective's mask (all arrivals must agree)
  const char* what = nullptr;
  alignas(16) unsigned char slot[kWarpSize][64];  // per-lane payload of the collective
};

struct Sched {
  ucontext_t main_ctx;
  jmp_buf main_jb;
  // (ASan) the scheduler's stack, as the first switch into a fiber reports it
  const void* asan_main_bottom = nullptr;
  size_t asan_main_size = 0;
  void* asan_main_fake_stack = nullptr;
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  uint3 block_idx{0, 0, 0};
  dim3 grid_dim{1, 1, 1};
  dim3 block_dim{1, 1, 1};
  int nthreads = 0;
  int live = 0;              // threads of the block that have not returned
  int block_arrived = 0;
  std::vector<WarpState> warps;
  std::vector<unsigned char> dyn_smem;  // storage; the block's dynamic shared memory is dyn_base
  unsigned char* dyn_base = nullptr;   // 1024-byte aligned inside dyn_smem (see smem_window_addr)
  int sync_count = 0;         // __syncthreads_count's sum
  size_t dyn_smem_bytes = 0; // the launch's dynamic shared memory (dyn_base has 16 more)
  std::map<std::string, long long> launch_names;  // launches per kernel name (tests: which path ran)
  // per block: (declaration site, element type, count) -> storage
  std::map<std::tuple<int, size_t, size_t>, std::vector<unsigned char>> static_smem;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::string kernel;        // name for messages
  const char* kernel_name = "";  // the launch's kernel expression (memprof: per-kernel rows)
  std::string error;         // first error of the launch
  bool aborting = false;
  bool reverse = false;      // schedule order within a block
  cudaError_t last_error = cudaSuccess;
  std::map<const void*, size_t> smem_optin;
  long long launches = 0;
};

inline Sched& S() {
  static thread_local Sched s;
  return s;
}

inline void set_schedule(bool reverse) { S().reverse = reverse; }
inline long long launch_count() { return S().launches; }

// The emulated device (runtime API below): an H100 SXM unless a test says otherwise.
struct Device {
  int cc_major = 9, cc_minor = 0;
  int sm_count = 132;
  size_t smem_optin = 227 * 1024;        // cudaDevAttrMaxSharedMemoryPerBlockOptin
  size_t smem_per_sm = 228 * 1024;       // for the occupancy query
};
inline Device& device() {
  static Device d;
  return d;
}
// Compute capability and the shared memory that goes with it (A100 8.0: 163 KiB opt-in per
// block, 164 KiB per SM; 8.6 / 8.9: 99 / 100 KiB; 9.0: 227 / 228 KiB).
inline void set_compute_capability(int major, int minor) {
  Device& d = device();
  d.cc_major = major;
  d.cc_minor = minor;
  const int cc = 10 * major + minor;
  if (cc == 80 || cc == 87) {
    d.smem_optin = 163 * 1024;
    d.smem_per_sm = 164 * 1024;
  } else if (cc >= 86 && cc < 90) {
    d.smem_optin = 99 * 1024;
    d.smem_per_sm = 100 * 1024;
  } else {
    d.smem_optin = 227 * 1024;
    d.smem_per_sm = 228 * 1024;
  }
}

// Abort the whole launch from inside a fiber (launch() adds the kernel and the block).
[[noreturn]] inline void fail(const std::string& what) {
  Sched& s = S();
  std::string msg;
  if (s.cur != nullptr) {
    msg = "thread (" + std::to_string(s.cur->tid.x) + "," + std::to_string(s.cur->tid.y) + "," +
          std::to_string(s.cur->tid.z) + "): ";
  }
  throw std::runtime_error(msg + what);
}

inline void yield_to_scheduler() {
  Sched& s = S();
  Fiber* f = s.cur;
#if OSTQ_SIMT_FAST_SWITCH
  if (!_setjmp(f->jb)) _longjmp(s.main_jb, 1);
#else
  __sanitizer_start_switch_fiber(&f->asan_fake_stack, s.asan_main_bottom, s.asan_main_size);
  swapcontext(&f->ctx, &s.main_ctx);
  __sanitizer_finish_switch_fiber(f->asan_fake_stack, nullptr, nullptr);
#endif
}

inline int lane_id() { return S().cur->lin % kWarpSize; }
inline int warp_id() { return S().cur->lin / kWarpSize; }

// Lanes that exist in the current thread's warp (a partial last warp has fewer).
inline unsigned warp_lanes(int warp) {
  const int n = std::min(kWarpSize, S().nthreads - warp * kWarpSize);
  return n >= kWarpSize ? 0xffffffffu : ((1u << n) - 1u);
}

inline void syncthreads() {
  Sched& s = S();
  if (s.live != s.nthreads) {
    fail("__syncthreads() after " + std::to_string(s.nthreads - s.live) +
         " thread(s) of the block returned");
  }
  s.cur->state = St::kBlockWait;
  if (++s.block_arrived == s.live) {
    s.block_arrived = 0;
    for (auto& f : s.fibers) {
      if (f.state == St::kBlockWait) f.state = St::kRun;
    }
  } else {
    yield_to_scheduler();
  }
}

// Arrive at a warp collective named `what` with `mask`; returns once every lane of the mask has
// arrived at it. The payload slot of this lane may be written before and read after.
inline void warp_arrive(unsigned mask, const char* what) {
  Sched& s = S();
  const int lane = lane_id();
  const int w = warp_id();
  WarpState& ws = s.warps[w];
  if (!(mask >> lane & 1u)) fail(std::string(what) + ": calling lane not in the mask");
  const unsigned exists = warp_lanes(w);
  if (mask & ~exists) fail(std::string(what) + ": mask names lanes that do not exist");
  for (int l = 0; l < kWarpSize; ++l) {
    if ((mask >> l & 1u) && s.fibers[w * kWarpSize + l].state == St::kDone) {
      fail(std::string(what) + ": mask names lane " + std::to_string(l) + ", which has returned");
    }
  }
  if (ws.arrived == 0) {
    ws.mask = mask;
    ws.what = what;
  } else if (ws.mask != mask || std::strcmp(ws.what, what) != 0) {
    fail(std::string(what) + " meets " + ws.what + " of other lanes of the warp (masks " +
         std::to_string(mask) + " / " + std::to_string(ws.mask) + ")");
  }
  ws.arrived |= 1u << lane;
  s.cur->state = St::kWarpWait;
  if (ws.arrived == mask) {
    ws.arrived = 0;
    for (int l = 0; l < kWarpSize; ++l) {
      if (mask >> l & 1u) s.fibers[w * kWarpSize + l].state = St::kRun;
    }
  } else {
    yield_to_scheduler();
  }
}

inline unsigned char* lane_slot(int lane) { return S().warps[warp_id()].slot[lane]; }

// Exchange one value per lane: returns the values of all lanes of the warp (mask lanes valid).
template <typename T>
inline void warp_exchange(unsigned mask, const T& v, const char* what, T (&all)[kWarpSize]) {
  static_assert(sizeof(T) <= 64 && std::is_trivially_copyable<T>::value, "payload");
  std::memcpy(lane_slot(lane_id()), &v, sizeof(T));
  warp_arrive(mask, what);
  for (int l = 0; l < kWarpSize; ++l) std::memcpy(&all[l], lane_slot(l), sizeof(T));
  warp_arrive(mask, what);  // nobody overwrites a slot before every lane has read it
}

template <typename T>
inline T shfl_from(unsigned mask, T v, int src, const char* what) {
  T all[kWarpSize];
  warp_exchange(mask, v, what, all);
  if (!(mask >> src & 1u)) fail(std::string(what) + ": source lane " + std::to_string(src) +
                                " is not in the mask");
  return all[src];
}

// ------------------------------------------------------------------------------ mma.sync

// Fragment layouts of the PTX ISA ("Matrix fragments for mma.m16n8k16 with floating point type",
// "... mma.m16n8k32"): lane = 4 * group + t. Element e of a lane's fragment (e counts 16-bit
// halves for m16n8k16, bytes for m16n8k32, nibbles for m16n8k64, low bits first, register after register) holds:
struct Coord {
  int row, col;
};
// The A and B fragments of m16n8k16 (f16/bf16), m16n8k32 (s8) and m16n8k64 (s4) share one
// pattern with E = elements per 32-bit register (2, 4, 8; element 0 in the low bits) and
// K = 8E: A (16xK, row-major): a0 (row g, k Et..Et+E-1), a1 (row g+8), a2 (row g, k+K/2),
// a3 (row g+8, k+K/2). B (Kx8, "col"; Coord = (k, n)): b0 (k Et..Et+E-1, col g), b1 (k+K/2).
template <int E>
inline Coord a_frag(int lane, int e) {
  const int g = lane / 4, t = lane % 4, reg = e / E;
  return {g + (reg & 1) * 8, E * t + e % E + (reg >> 1) * 4 * E};
}
template <int E>
inline Coord b_frag(int lane, int e) {
  const int g = lane / 4, t = lane % 4, reg = e / E;
  return {E * t + e % E + reg * 4 * E, g};
}
inline Coord a_16816(int lane, int e) { return a_frag<2>(lane, e); }
inline Coord b_16816(int lane, int e) { return b_frag<2>(lane, e); }
inline Coord a_16832(int lane, int e) { return a_frag<4>(lane, e); }
inline Coord b_16832(int lane, int e) { return b_frag<4>(lane, e); }
inline Coord a_16864(int lane, int e) { return a_frag<8>(lane, e); }  // CUTLASS's int4 IMMA GEMM
inline Coord b_16864(int lane, int e) { return b_frag<8>(lane, e); }
// C/D (16x8, fp32 or s32) of every shape: c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8).
inline Coord c_16n8(int lane, int e) {
  const int g = lane / 4, t = lane % 4;
  return {g + (e >> 1) * 8, 2 * t + (e & 1)};
}

template <typename H>
inline float half_bits_to_float(uint16_t b) {
  H h;
  std::memcpy(&h, &b, 2);
  if constexpr (std::is_same<H, __half>::value) {
    return __half2float(h);
  } else {
    return __bfloat162float(h);
  }
}

struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
};

// Where element (row, col) of A / B sits: (lane, element) — the inverse of the maps above, built
// from them (so the two can never disagree).
struct Slot {
  int8_t lane = -1, e = -1;
};
template <int R, int C, int NE>
struct InverseMap {
  Slot at[R][C];
  explicit InverseMap(Coord (*fwd)(int, int)) {
    for (int l = 0; l < kWarpSize; ++l)
      for (int e = 0; e < NE; ++e) {
        const Coord c = fwd(l, e);
        at[c.row][c.col] = Slot{static_cast<int8_t>(l), static_cast<int8_t>(e)};
      }
  }
};

// The warp's operands of one m16n8k(8E) mma: every lane posts its fragments (a rendezvous of
// the whole warp), then reads the elements of the rows / columns it needs; dec(reg, i) decodes
// element i (E per 32-bit register, low bits first).
template <int E, class Dec>
struct MmaWarpOperands {
  MmaOperands all[kWarpSize];
  MmaWarpOperands(const uint32_t* a, const uint32_t* b, const char* what) {
    warp_exchange(0xffffffffu, MmaOperands{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, what, all);
  }
  auto A(int r, int k) const {
    static const InverseMap<16, 8 * E, 4 * E> ia(a_frag<E>);
    const Slot s = ia.at[r][k];
    return Dec{}(all[s.lane].a[s.e / E], s.e % E);
  }
  auto B(int k, int n) const {
    static const InverseMap<8 * E, 8, 2 * E> ib(b_frag<E>);
    const Slot s = ib.at[k][n];
    return Dec{}(all[s.lane].b[s.e / E], s.e % E);
  }
};
template <typename H>
struct DecHalf {
  float operator()(uint32_t reg, int i) const {
    return half_bits_to_float<H>(static_cast<uint16_t>(reg >> (16 * i)));
  }
};
struct DecS8 {
  int operator()(uint32_t reg, int i) const { return static_cast<int8_t>(reg >> (8 * i)); }
};
struct DecS4 {  // sign-extended 4-bit code
  int operator()(uint32_t reg, int i) const {
    return static_cast<int32_t>(reg << (28 - 4 * i)) >> 28;
  }
};

// D = A·B + C for the warp, each lane computing its own four D elements. fp16/bf16 products are
// exact in fp32; the 16 products are summed in k order in fp32 (the hardware's order is
// unspecified).
template <typename H>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  const MmaWarpOperands<2, DecHalf<H>> op(a, b, "mma.sync.m16n8k16");
  const int lane = lane_id();
  for (int e = 0; e < 4; ++e) {
    const Coord cc = c_16n8(lane, e);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += op.A(cc.row, k) * op.B(k, cc.col);
    c[e] += acc;
  }
}

inline void mma_m16n8k32_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  const MmaWarpOperands<4, DecS8> op(a, b, "mma.sync.m16n8k32");
  const int lane = lane_id();
  for (int e = 0; e < 4; ++e) {
    const Coord cc = c_16n8(lane, e);
    int acc = 0;
    for (int k = 0; k < 32; ++k) acc += op.A(cc.row, k) * op.B(k, cc.col);
    c[e] += acc;
  }
}

// mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32.satfinite: D = sat(A·B + C), exact int sums
// clamped to the int32 range.
inline void mma_m16n8k64_s4_sat(int* d, const uint32_t* a, const uint32_t* b, const int* c) {
  const MmaWarpOperands<8, DecS4> op(a, b, "mma.sync.m16n8k64.s4");
  const int lane = lane_id();
  for (int e = 0; e < 4; ++e) {
    const Coord cc = c_16n8(lane, e);
    long long acc = c[e];
    for (int k = 0; k < 64; ++k) acc += op.A(cc.row, k) * op.B(k, cc.col);
    d[e] = static_cast<int>(std::clamp<long long>(acc, INT32_MIN, INT32_MAX));
  }
}

// ------------------------------------------------------------------------------ launches

inline void cp_async_wait(int n);  // (CUTLASS 2.x section below)

// Run by each thread after the kernel body returns (errors fail the launch): extensions
// register here what a thread leaves in flight (sm90_tma.h: bulk stores never waited for).
inline std::vector<void (*)()>& thread_exit_hooks() {
  static std::vector<void (*)()> hooks;
  return hooks;
}

inline void fiber_entry() {
  Sched& s = S();
#if !OSTQ_SIMT_FAST_SWITCH
  __sanitizer_finish_switch_fiber(nullptr, &s.asan_main_bottom, &s.asan_main_size);
#endif
  try {
    s.body(s.body_arg);
    // copies still in flight land anyway (a kernel that never waits for them: its problem)
    cp_async_wait(-1);
    for (auto* hook : thread_exit_hooks()) hook();
  } catch (const std::exception& e) {
    if (s.error.empty()) s.error = e.what();
    s.aborting = true;
  } catch (...) {
    if (s.error.empty()) s.error = "unknown exception in a kernel thread";
    s.aborting = true;
  }
  s.cur->state = St::kDone;
  --s.live;
  if (!s.aborting && s.block_arrived > 0 && s.block_arrived == s.live) {
    s.error = "a thread returned while " + std::to_string(s.block_arrived) +
              " thread(s) wait at __syncthreads()";
    s.aborting = true;
  }
#if OSTQ_SIMT_FAST_SWITCH
  _longjmp(s.main_jb, 1);  // never returns: the scheduler resumes
#else
  // returns to main_ctx through uc_link; a null save slot: this fiber's fake stack goes
  __sanitizer_start_switch_fiber(nullptr, s.asan_main_bottom, s.asan_main_size);
#endif
}

inline std::string dim_str(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

inline const void* fn_key_void(const void* p) { return p; }
template <typename F>
inline const void* fn_key(F* f) {
  return reinterpret_cast<const void*>(f);
}

inline cudaError_t set_error(cudaError_t e) {
  if (S().last_error == cudaSuccess) S().last_error = e;
  return e;
}

#if defined(OSTQ_SIMT_MEMPROF)
void memprof_block_end(bool keep);  // tests/simt/memprof.cpp (keep = false: the block failed)
#endif

// Run `body` (the kernel call) for every thread of every block.
template <typename F>
void launch(const char* name, const void* fn, dim3 grid, dim3 block, size_t smem,
            cudaStream_t /*stream*/, F&& body) {
  Sched& s = S();
  const long long nthreads = 1LL * block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nthreads == 0 || nthreads > 1024 ||
      grid.y > 65535 || grid.z > 65535 || block.z > 64) {
    set_error(cudaErrorInvalidConfiguration);
    return;
  }
  size_t limit = kDefaultSmemLimit;
  auto it = s.smem_optin.find(fn);
  if (it != s.smem_optin.end()) limit = std::max(limit, std::min(it->second, device().smem_optin));
  if (smem > limit) {
    set_error(cudaErrorInvalidValue);
    return;
  }
  ++s.launches;
  ++s.launch_names[name];
  s.kernel_name = name;
  s.kernel = std::string(name) + "<<<" + dim_str(grid) + ", " + dim_str(block) + ", " +
             std::to_string(smem) + ">>>";
  s.grid_dim = grid;
  s.block_dim = block;
  s.nthreads = static_cast<int>(nthreads);
  if (s.fibers.size() < static_cast<size_t>(nthreads)) s.fibers.resize(nthreads);
  s.warps.assign((nthreads + kWarpSize - 1) / kWarpSize, WarpState{});
  using B = std::remove_reference_t<F>;
  s.body = [](void* p) { (*static_cast<B*>(p))(); };
  s.body_arg = &body;
  s.error.clear();
  s.aborting = false;
  // 1024-byte alignment, as the hardware's: the TMA / GMMA swizzles act on shared address bits
  s.dyn_smem.resize(smem + 16 + kSmemWindowAlign);
  s.dyn_base = s.dyn_smem.data() + (kSmemWindowAlign - reinterpret_cast<uintptr_t>(s.dyn_smem.data()) %
                                                           kSmemWindowAlign) % kSmemWindowAlign;
  s.dyn_smem_bytes = smem;
  for (unsigned bz = 0; bz < grid.z && !s.aborting; ++bz)
    for (unsigned by = 0; by < grid.y && !s.aborting; ++by)
      for (unsigned bx = 0; bx < grid.x && !s.aborting; ++bx) {
        s.block_idx = uint3{bx, by, bz};
        // every block starts with garbage shared memory (NaN floats, -1 integers), so a read
        // of what no thread of *this* block wrote shows
        std::fill(s.dyn_base, s.dyn_base + smem + 16, 0xFF);
        s.static_smem.clear();
        s.live = s.nthreads;
        s.block_arrived = 0;
        s.sync_count = 0;
        for (auto& w : s.warps) w.arrived = 0;
        for (int i = 0; i < s.nthreads; ++i) {
          Fiber& f = s.fibers[i];
          if (f.stack == nullptr) f.stack = static_cast<char*>(std::malloc(kStackBytes));
#if !OSTQ_SIMT_FAST_SWITCH && defined(__SANITIZE_ADDRESS__)
          // a fresh fiber on a reused stack: the red zones of the previous fiber's frames (left
          // behind when it was switched away from for good) are not this fiber's
          ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
#endif
          f.lin = i;
          f.tid = uint3{static_cast<unsigned>(i % block.x),
                        static_cast<unsigned>(i / block.x % block.y),
                        static_cast<unsigned>(i / (block.x * block.y))};
          f.state = St::kRun;
          f.started = false;
          f.cp_pending.clear();
          f.cp_committed = 0;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack;
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &s.main_ctx;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        for (;;) {
          bool ran = false, all_done = true;
          for (int j = 0; j < s.nthreads; ++j) {
            Fiber& f = s.fibers[s.reverse ? s.nthreads - 1 - j : j];
            if (f.state != St::kDone) all_done = false;
            if (f.state != St::kRun) continue;
            s.cur = &f;
#if OSTQ_SIMT_FAST_SWITCH
            if (!_setjmp(s.main_jb)) {
              if (!f.started) {
                f.started = true;
                ucontext_t here;  // never resumed: the fiber comes back through main_jb
                swapcontext(&here, &f.ctx);
              } else {
                _longjmp(f.jb, 1);
              }
            }
#else
            __sanitizer_start_switch_fiber(&s.asan_main_fake_stack, f.stack, kStackBytes);
            swapcontext(&s.main_ctx, &f.ctx);
            __sanitizer_finish_switch_fiber(s.asan_main_fake_stack, nullptr, nullptr);
#endif
            s.cur = nullptr;
            ran = true;
            if (s.aborting) break;
          }
          if (s.aborting) break;  // suspended fibers are dropped (kernels hold no resources)
          if (all_done) break;
          if (!ran) {
            int bw = 0, ww = 0;
            std::string where;
            for (int j = 0; j < s.nthreads; ++j) {
              if (s.fibers[j].state == St::kBlockWait) ++bw;
              if (s.fibers[j].state == St::kWarpWait) {
                ++ww;
                if (where.empty()) where = s.warps[j / kWarpSize].what;
              }
            }
            s.error = "deadlock: " + std::to_string(bw) + " thread(s) at __syncthreads(), " +
                      std::to_string(ww) + " at a warp collective (" + where + ") never completed";
            s.aborting = true;
            break;
          }
        }
#if defined(OSTQ_SIMT_MEMPROF)
        memprof_block_end(!s.aborting);  // memprof.cpp: the block's accesses -> warp requests
#endif
      }
  s.cur = nullptr;
  if (!s.error.empty()) {
    const std::string msg = "simt emulator: kernel " + s.kernel + ", block (" +
                            std::to_string(s.block_idx.x) + "," + std::to_string(s.block_idx.y) +
                            "," + std::to_string(s.block_idx.z) + "): " + s.error;
    s.error.clear();
    s.aborting = false;
    throw std::runtime_error(msg);
  }
}

// `__shared__ T name[N];` (build.py rewrites it into this): the block's array for declaration
// `site`, the same storage for every thread of the block, fresh garbage in each block.
template <typename T, size_t N>
inline T (&shared_array(int site))[N] {
  auto& buf = S().static_smem[std::make_tuple(site, typeid(T).hash_code(), N)];
  if (buf.empty()) buf.assign(sizeof(T) * N + 16, 0xFF);
  return *reinterpret_cast<T(*)[N]>(buf.data());
}

// ------------------------------------------------------------------------------ CUTLASS 2.x
// What tests/simt/cutlass_overlay.py puts in place of the inline PTX of CUTLASS's Ampere GEMM
// (ldmatrix, cp.async, ld/st.global, ld.shared), with the checks the hardware makes: shared
// memory operands inside the launch's shared memory, global ones outside it, addresses aligned
// to the access size.

inline bool in_smem(const void* p, size_t bytes) {
  const Sched& s = S();
  const auto* b = static_cast<const unsigned char*>(p);
  const unsigned char* lo = s.dyn_base;
  if (b >= lo && b + bytes <= lo + s.dyn_smem_bytes) return true;
  for (const auto& kv : s.static_smem) {
    const unsigned char* a = kv.second.data();
    if (b >= a && b + bytes <= a + kv.second.size() - 16) return true;
  }
  return false;
}
inline bool overlaps_smem(const void* p, size_t bytes) {
  const Sched& s = S();
  const auto* b = static_cast<const unsigned char*>(p);
  const unsigned char* lo = s.dyn_base;
  return lo != nullptr && b < lo + s.dyn_smem_bytes + 16 && b + bytes > lo;
}
inline void check_access(const char* what, const void* p, size_t bytes, bool shared) {
  if (reinterpret_cast<uintptr_t>(p) % std::min<size_t>(bytes, 16) != 0) {
    fail(std::string(what) + ": address " + std::to_string(reinterpret_cast<uintptr_t>(p)) +
         " is not aligned to " + std::to_string(std::min<size_t>(bytes, 16)) + " bytes");
  }
  if (shared && !in_smem(p, bytes)) fail(std::string(what) + ": address outside shared memory");
  if (!shared && overlaps_smem(p, bytes)) fail(std::string(what) + ": global access to shared memory");
}

// The launch's dynamic shared memory (`extern __shared__` arrays; build.py rewrites them into this).
inline unsigned char* dyn_smem_base() { return S().dyn_base; }

// A generic pointer into the block's dynamic shared memory -> its 32-bit shared-window address,
// and back (with `bytes` in range). Static `__shared__` arrays have no window address here.
inline uint32_t smem_window_addr(const void* p) {
  const Sched& s = S();
  const auto* b = static_cast<const unsigned char*>(p);
  if (s.dyn_base == nullptr || b < s.dyn_base || b > s.dyn_base + s.dyn_smem_bytes) {
    fail("shared window address of a pointer outside the block's dynamic shared memory (" +
         (s.dyn_base == nullptr ? std::string("no launch")
                                : std::to_string(static_cast<long long>(b - s.dyn_base)) + " bytes from its start, " +
                                      std::to_string(s.dyn_smem_bytes) + " bytes long") + ")");
  }
  return kDynSmemWindowBase + static_cast<uint32_t>(b - s.dyn_base);
}
inline unsigned char* smem_window_ptr(uint32_t addr, size_t bytes) {
  const Sched& s = S();
  if (addr < kDynSmemWindowBase || addr - kDynSmemWindowBase + bytes > s.dyn_smem_bytes) {
    fail("shared window address " + std::to_string(addr) + " (+" + std::to_string(bytes) +
         " bytes) outside the block's dynamic shared memory [" + std::to_string(kDynSmemWindowBase) +
         ", " + std::to_string(kDynSmemWindowBase + s.dyn_smem_bytes) + ")");
  }
  return s.dyn_base + (addr - kDynSmemWindowBase);
}

// ld.global / st.global of `bytes` (predicated: nothing happens, nothing is checked, when off).
inline void global_load(void* dst, const void* src, int bytes, bool pred) {
  if (!pred) return;
  check_access("ld.global", src, bytes, false);
  std::memcpy(dst, src, bytes);
}
inline void global_store(void* dst, const void* src, int bytes, bool pred) {
  if (!pred) return;
  check_access("st.global", dst, bytes, false);
  std::memcpy(dst, src, bytes);
}
inline void shared_load(void* dst, const void* src, int bytes) {
  check_access("ld.shared", src, bytes, true);
  std::memcpy(dst, src, bytes);
}

// cp.async.{ca,cg}.shared.global [dst], [src], bytes[, src_bytes]: the source is read now, the
// destination written when a cp.async.wait_group covering it runs (so a read of the stage
// before the wait sees the old bytes). zfill with pred off: src_bytes = 0, zeros are written.
inline void cp_async(void* dst, const void* src, int bytes, bool pred, bool zfill) {
  if (!pred && !zfill) return;
  check_access("cp.async (shared destination)", dst, bytes, true);
  PendingCopy c;
  c.dst = static_cast<unsigned char*>(dst);
  c.bytes = bytes;
  if (pred) {
    check_access("cp.async (global source)", src, bytes, false);
    std::memcpy(c.data, src, bytes);
  } else {
    std::memset(c.data, 0, bytes);
  }
  Fiber* f = S().cur;
  c.group = f->cp_committed;
  f->cp_pending.push_back(c);
}
inline void cp_async_commit() { ++S().cur->cp_committed; }
// cp.async.wait_group n: every group but the n most recent committed ones has landed;
// n < 0: cp.async.wait_all (the uncommitted copies too).
inline void cp_async_wait(int n) {
  Fiber* f = S().cur;
  const long long upto = n < 0 ? f->cp_committed + 1 : f->cp_committed - n;
  std::vector<PendingCopy> keep;
  for (const PendingCopy& c : f->cp_pending) {
    if (c.group < upto) {
      std::memcpy(c.dst, c.data, c.bytes);
    } else {
      keep.push_back(c);
    }
  }
  f->cp_pending.swap(keep);
}

// ldmatrix.sync.aligned.m8n8{.x1,.x2,.x4}{,.trans}.shared.b16: a warp collective. Lane 8j + r
// names row r of matrix j (16 bytes); lane l receives in d[j] the 32 bits (row l/4, b16 columns
// 2(l%4), 2(l%4)+1) of matrix j, or with .trans (rows 2(l%4), 2(l%4)+1 of column l/4).
inline void ldmatrix(unsigned* d, int count, bool trans, const void* ptr) {
  const void* rows[kWarpSize];
  warp_exchange(0xffffffffu, ptr, trans ? "ldmatrix.trans" : "ldmatrix", rows);
  const int lane = lane_id();
  for (int j = 0; j < count; ++j) {
    for (int r = 0; r < 8; ++r) check_access("ldmatrix (row address)", rows[8 * j + r], 16, true);
    auto at = [&](int r, int c) {
      uint16_t v;
      std::memcpy(&v, static_cast<const unsigned char*>(rows[8 * j + r]) + 2 * c, 2);
      return static_cast<uint32_t>(v);
    };
    const int g = lane / 4, t = lane % 4;
    d[j] = trans ? (at(2 * t, g) | at(2 * t + 1, g) << 16) : (at(g, 2 * t) | at(g, 2 * t + 1) << 16);
  }
}

// stmatrix.sync.aligned.m8n8{.x1,.x2,.x4}{,.trans}.shared.b16 (sm_90): the inverse of ldmatrix, a
// warp collective. Lane 8j + r names row r of matrix j (16 bytes); lane l's s[j] holds the 32 bits
// (row l/4, b16 columns 2(l%4), 2(l%4)+1) of matrix j, stored there, or with .trans at rows
// 2(l%4), 2(l%4)+1 of column l/4. Each lane writes its own elements once every row address is in;
// `on_write` (if given) is told each 2-byte element the lane wrote (sm90_tma.h's async-proxy marks).
inline void stmatrix(const unsigned* s, int count, bool trans, void* ptr,
                     void (*on_write)(const void*, size_t) = nullptr) {
  void* rows[kWarpSize];
  warp_exchange(0xffffffffu, ptr, trans ? "stmatrix.trans" : "stmatrix", rows);
  const int lane = lane_id(), g = lane / 4, t = lane % 4;
  for (int j = 0; j < count; ++j) {
    for (int r = 0; r < 8; ++r) check_access("stmatrix (row address)", rows[8 * j + r], 16, true);
    auto put = [&](int r, int c, uint32_t v) {
      const uint16_t h = static_cast<uint16_t>(v);
      unsigned char* at = static_cast<unsigned char*>(rows[8 * j + r]) + 2 * c;
      std::memcpy(at, &h, 2);
      if (on_write) on_write(at, 2);
    };
    if (trans) {
      put(2 * t, g, s[j]), put(2 * t + 1, g, s[j] >> 16);
    } else {
      put(g, 2 * t, s[j]), put(g, 2 * t + 1, s[j] >> 16);
    }
  }
}

// cudaOccupancyMaxActiveBlocksPerMultiprocessor[WithFlags]: blocks of `threads` threads and
// `smem` bytes of dynamic shared memory per SM (2048 threads, 32 blocks, 1 KiB reserved per block).
template <typename F>
inline cudaError_t occupancy(int* blocks, F* /*fn*/, int threads, size_t smem, unsigned = 0) {
  if (threads <= 0 || threads > 1024) return set_error(cudaErrorInvalidValue);
  const size_t by_smem = device().smem_per_sm / (smem + 1024);
  *blocks = static_cast<int>(std::min<size_t>({32, static_cast<size_t>(2048 / threads), by_smem}));
  return cudaSuccess;
}

// ------------------------------------------------------------------------------ runtime API

inline cudaError_t getLastError() {
  const cudaError_t e = S().last_error;
  S().last_error = cudaSuccess;
  return e;
}
inline cudaError_t peekAtLastError() { return S().last_error; }
inline cudaError_t getDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
// The emulated device: an H100 SXM (compute capability 9.0, 132 SMs, 227 KiB opt-in smem)
// unless set_compute_capability / set_sm_count say otherwise.
inline void set_sm_count(int n) { device().sm_count = n; }
inline cudaError_t deviceGetAttribute(int* v, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *v = device().sm_count; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = device().cc_major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = device().cc_minor; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = static_cast<int>(device().smem_optin); return cudaSuccess;
    default: return set_error(cudaErrorInvalidValue);
  }
}
template <typename F>
inline cudaError_t funcSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<size_t>(value) > device().smem_optin) return set_error(cudaErrorInvalidValue);
  S().smem_optin[reinterpret_cast<const void*>(fn)] = static_cast<size_t>(value);
  return cudaSuccess;
}
inline cudaError_t hostAlloc(void** p, size_t bytes, unsigned /*flags*/) {
  *p = std::calloc(1, bytes);
  return *p ? cudaSuccess : set_error(cudaErrorMemoryAllocation);
}
inline cudaError_t hostGetDevicePointer(void** d, void* h, unsigned /*flags*/) {
  *d = h;
  return cudaSuccess;
}
inline cudaError_t freeHost(void* p) {
  std::free(p);
  return cudaSuccess;
}

// ------------------------------------------------------------------------------ intrinsics

inline uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t v = static_cast<uint64_t>(y) << 32 | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t sel = (s >> (4 * i)) & 0xF;
    uint32_t b = static_cast<uint32_t>(v >> (8 * (sel & 7))) & 0xFF;
    if (sel & 8) b = (b & 0x80) ? 0xFF : 0x00;  // sign replication mode
    r |= b << (8 * i);
  }
  return r;
}

// prmt.b32 d, a, b, c (default mode): byte_perm, selector bit 3 replicating the sign
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t c) { return byte_perm(a, b, c); }

// lop3.b32 d, a, b, c, immLut: bit i of d is bit (4a_i + 2b_i + c_i) of immLut (the table of
// f(0xF0, 0xCC, 0xAA), PTX ISA)
inline uint32_t lop3(uint32_t a, uint32_t b, uint32_t c, uint32_t lut) {
  uint32_t r = 0;
  for (int i = 0; i < 8; ++i) {
    if (!((lut >> i) & 1)) continue;
    r |= ((i & 4) ? a : ~a) & ((i & 2) ? b : ~b) & ((i & 1) ? c : ~c);
  }
  return r;
}

inline int dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) {
    c += static_cast<int>(static_cast<int8_t>(a >> (8 * i))) *
         static_cast<int>(static_cast<int8_t>(b >> (8 * i)));
  }
  return c;
}

}  // namespace ostq_emu

// ------------------------------------------------------------------------------ the CUDA names

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#ifndef __grid_constant__
#define __grid_constant__
#endif

// CUDA's device min/max overloads (integer and float): one template, the usual conversions.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
// and CUDA's non-template overloads, which win over cute::min / cute::max templates where
// CUTLASS calls min(int, int) unqualified (the templates above alone are ambiguous there)
#define OSTQ_EMU_MINMAX(T)                         \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
OSTQ_EMU_MINMAX(int)
OSTQ_EMU_MINMAX(unsigned)
OSTQ_EMU_MINMAX(long)
OSTQ_EMU_MINMAX(unsigned long)
OSTQ_EMU_MINMAX(long long)
OSTQ_EMU_MINMAX(unsigned long long)
OSTQ_EMU_MINMAX(float)
OSTQ_EMU_MINMAX(double)
#undef OSTQ_EMU_MINMAX
#undef __trap
#define __trap() ::ostq_emu::fail("__trap()")

#define threadIdx (::ostq_emu::S().cur->tid)
#define blockIdx (::ostq_emu::S().block_idx)
#define blockDim (::ostq_emu::S().block_dim)
#define gridDim (::ostq_emu::S().grid_dim)

inline void __syncthreads() { ::ostq_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::ostq_emu::warp_arrive(mask, "__syncwarp"); }
// __syncthreads_count / _and / _or: a barrier that also counts the threads whose predicate holds
inline int __syncthreads_count(int pred) {
  ::ostq_emu::Sched& s = ::ostq_emu::S();
  s.sync_count += pred ? 1 : 0;
  ::ostq_emu::syncthreads();  // every thread has counted
  const int r = s.sync_count;
  ::ostq_emu::syncthreads();  // every thread has read
  s.sync_count = 0;
  ::ostq_emu::syncthreads();  // reset before anyone counts again
  return r;
}
inline int __syncthreads_and(int pred) { return __syncthreads_count(pred) == ::ostq_emu::S().nthreads; }
inline int __syncthreads_or(int pred) { return __syncthreads_count(pred) != 0; }
// Blocks run one after another and a fiber yields only at barriers and collectives, so plain
// read-modify-writes are atomic here and fences have nothing to order.
inline void __threadfence() {}
inline void __threadfence_block() {}
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) {
  const T old = *p;
  if (old == cmp) *p = v;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
// fma.rn.f16 (one rounding of a·b + c to fp16): a·b is exact in double (11-bit significands), and
// p + c rounded to double, then to fp16, is the single rounding: a double rounding could only
// differ where p + c is not exact in double AND lands on an fp16 midpoint, and an fp16 midpoint
// needs p's top bit near c's fp16 ulp, so p's 22 bits and c span at most ~34 bits (exact) for
// every finite fp16 result.
inline __half hfma_rn(__half a, __half b, __half c) {
  const double p = static_cast<double>(__half2float(a)) * static_cast<double>(__half2float(b));
  return __double2half(p + static_cast<double>(__half2float(c)));
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return __halves2half2(hfma_rn(__low2half(a), __low2half(b), __low2half(c)),
                        hfma_rn(__high2half(a), __high2half(b), __high2half(c)));
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ::ostq_emu::lane_id();
  return ::ostq_emu::shfl_from(mask, v, (lane & ~(width - 1)) + (src & (width - 1)), "__shfl_sync");
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::ostq_emu::lane_id();
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return ::ostq_emu::shfl_from(mask, v, src, "__shfl_xor_sync");
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::ostq_emu::lane_id();
  int src = lane + static_cast<int>(delta);
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return ::ostq_emu::shfl_from(mask, v, src, "__shfl_down_sync");
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::ostq_emu::lane_id();
  int src = lane - static_cast<int>(delta);
  if (src < (lane & ~(width - 1))) src = lane;
  return ::ostq_emu::shfl_from(mask, v, src, "__shfl_up_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  int all[::ostq_emu::kWarpSize];
  ::ostq_emu::warp_exchange(mask, pred ? 1 : 0, "__ballot_sync", all);
  unsigned r = 0;
  for (int l = 0; l < ::ostq_emu::kWarpSize; ++l) r |= ((mask >> l & 1u) && all[l]) ? 1u << l : 0u;
  return r;
}
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }

// (memprof builds at -O0: always inlined, so the load is the call site's, not one shared site)
template <typename T>
__attribute__((always_inline)) inline T __ldg(const T* p) {
  return *p;
}
// CUDA's __byte_perm uses the low 3 bits of each selector nibble (no sign mode, unlike prmt)
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) { return ::ostq_emu::byte_perm(x, y, s & 0x7777u); }
inline int __dp4a(int a, int b, int c) { return ::ostq_emu::dp4a(a, b, c); }
inline int __dp4a(unsigned a, int b, int c) { return ::ostq_emu::dp4a(static_cast<int>(a), b, c); }

// Correctly rounded arithmetic: the host's IEEE operations (build with -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __double2float_rn(double a) { return static_cast<float>(a); }
inline float __int2float_rn(int a) { return static_cast<float>(a); }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline int __float_as_int(float f) {
  int u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The runtime functions the launchers and ops call (the emulator links no CUDA runtime).
#define cudaGetLastError ::ostq_emu::getLastError
#define cudaPeekAtLastError ::ostq_emu::peekAtLastError
#define cudaGetDevice ::ostq_emu::getDevice
#define cudaDeviceGetAttribute ::ostq_emu::deviceGetAttribute
#define cudaFuncSetAttribute ::ostq_emu::funcSetAttribute
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor ::ostq_emu::occupancy
#define cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags ::ostq_emu::occupancy
#define cudaHostAlloc ::ostq_emu::hostAlloc
#define cudaHostGetDevicePointer ::ostq_emu::hostGetDevicePointer
#define cudaFreeHost ::ostq_emu::freeHost
#define cudaGetErrorString ::ostq_emu_error_string
inline const char* ostq_emu_error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorMemoryAllocation: return "out of memory";
    default: return "unknown error";
  }
}
