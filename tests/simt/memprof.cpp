// Memory-access profile of the emulated kernels (tests/simt/memprof.py drives it; README).
//
// The memprof build (OSTQUANT_SIMT_MEMPROF=1, build.py) compiles the kernels at -O0 with GCC's
// `-fsanitize=kernel-address` and `asan-instrumentation-with-call-threshold=0`: every load and
// store the source makes becomes a call `__asan_{load,store}{1,2,4,8,16,N}_noabort(addr)`. No
// sanitizer runtime is linked; this file defines those hooks. At -O0 an access has the width
// the source gives it (a uint4 load is one 16-byte access, as nvcc keeps it), and the call's
// return address names the source line (-g; memprof.py resolves it with addr2line).
//
// While recording, an access made on a fiber (an emulated CUDA thread) is kept when it falls in
// the block's shared memory ("shared") or in a tensor's memory ("global": the tensors memprof.py
// registers, and every CPU tensor allocated while recording — outputs, workspaces — through an
// allocator wrapped around torch's). Locals on the fiber's stack and the emulator's own
// bookkeeping (compiled in the same translation units, so instrumented too) are not.
//
// When a block ends, each warp's accesses become warp-wide requests the way a GPU issues them:
// the k-th execution of one site by each lane of the warp is one request (the lanes that
// executed it k or more times are its active lanes; exact for converged code). Per request:
//
//   global: the distinct 32-byte sectors its bytes touch, against the fewest that could hold its
//           distinct bytes (ceil(bytes / 32));
//   shared: the wavefronts the banks need: 32 banks of 4-byte words; 8-byte accesses go in two
//           phases of 16 lanes, 16-byte ones in four of 8; a phase takes as many wavefronts as
//           its busiest bank has distinct words (one word read by several lanes is a broadcast);
//           the ideal is one per phase.
//
// These are the usual models of Nsight Compute's sectors per request and shared-memory
// wavefronts (bank conflicts = wavefronts - ideal); the L1/L2 caches, the order of requests and
// timing are not modelled.
#include <torch/extension.h>

#include <c10/core/CPUAllocator.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

#if defined(OSTQ_SIMT_MEMPROF)
constexpr bool kAvailable = true;
#else
constexpr bool kAvailable = false;
#endif

struct Access {
  uintptr_t pc;
  uintptr_t addr;
  uint32_t size;
  uint8_t store;
  uint8_t shared;
};

// per (kernel, site, space, direction, width)
struct Stat {
  long long requests = 0, lanes = 0, bytes = 0, unique_bytes = 0;
  long long sectors = 0, ideal_sectors = 0, wavefronts = 0, ideal_wavefronts = 0;
  long long max_wavefronts = 0;  // the worst request's (shared)
};
using Key = std::tuple<std::string, uintptr_t, int, int, int>;  // kernel, pc, shared, store, size

struct Recorder {
  std::vector<std::vector<Access>> per_thread;
  std::map<Key, Stat> stats;
  long long blocks = 0;
};

// Plain, constant-initialised globals: the hooks run from the first static initialiser of the
// module on (torch's registrations), before any dynamic initialisation could make a Recorder.
bool g_on = false;
bool g_busy = false;  // inside a hook or the block-end pass (their own code is instrumented too)
Recorder* g_rec = nullptr;
std::vector<std::pair<uintptr_t, uintptr_t>>* g_ranges = nullptr;  // global memory: [lo, hi)

Recorder& R() { return *g_rec; }

bool in_ranges(uintptr_t a, size_t n) {
  for (const auto& [lo, hi] : *g_ranges)
    if (a >= lo && a + n <= hi) return true;
  return false;
}
void add_range(const void* p, size_t n) {
  const bool was = g_busy;
  g_busy = true;
  const auto lo = reinterpret_cast<uintptr_t>(p);
  if (g_ranges != nullptr && n > 0) g_ranges->emplace_back(lo, lo + n);
  g_busy = was;
}
void remove_range(const void* p) {
  const bool was = g_busy;
  g_busy = true;
  const auto lo = reinterpret_cast<uintptr_t>(p);
  if (g_ranges != nullptr)
    g_ranges->erase(std::remove_if(g_ranges->begin(), g_ranges->end(),
                                   [lo](const auto& r) { return r.first == lo; }),
                    g_ranges->end());
  g_busy = was;
}

// torch's CPU allocator, wrapped while recording: every tensor made then is global memory
// until it is freed (its memory may then hold the emulator's own data).
struct TrackingAllocator final : c10::Allocator {
  c10::Allocator* inner = nullptr;
  struct Ctx {
    c10::DataPtr inner;
  };
  static void del(void* ctx) {
    auto* c = static_cast<Ctx*>(ctx);
    remove_range(c->inner.get());
    delete c;
  }
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = inner->allocate(n);
    void* data = p.get();
    const c10::Device dev = p.device();
    add_range(data, n);
    return c10::DataPtr(data, new Ctx{std::move(p)}, &TrackingAllocator::del, dev);
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};
TrackingAllocator* g_alloc = nullptr;
constexpr uint8_t kAllocPriority = 200;

[[maybe_unused]] __attribute__((no_sanitize_address, noinline)) void record(uintptr_t addr, size_t size,
                                                                            bool store, uintptr_t pc) {
  if (!g_on || g_busy) return;
  g_busy = true;
  Recorder& r = R();
  ostq_emu::Sched& s = ostq_emu::S();
  ostq_emu::Fiber* f = s.cur;
  if (f != nullptr) {
    const auto* p = reinterpret_cast<const char*>(addr);
    const auto* dyn = reinterpret_cast<const char*>(s.dyn_base);
    int space = -1;  // 0 global, 1 shared
    if (p >= f->stack && p < f->stack + ostq_emu::kStackBytes) {
      space = -1;  // a local
    } else if (dyn != nullptr && p >= dyn && p + size <= dyn + s.dyn_smem_bytes) {
      space = 1;
    } else if (in_ranges(addr, size)) {
      space = 0;
    } else if (ostq_emu::in_smem(p, size)) {  // static __shared__ arrays
      space = 1;
    }
    if (space >= 0) {
      if (r.per_thread.size() < static_cast<size_t>(s.nthreads)) r.per_thread.resize(s.nthreads);
      r.per_thread[f->lin].push_back(
          Access{pc, addr, static_cast<uint32_t>(size), static_cast<uint8_t>(store), static_cast<uint8_t>(space)});
    }
  }
  g_busy = false;
}

// total length of a union of [a, b) intervals (sorted in place)
long long union_length(std::vector<std::pair<uintptr_t, uintptr_t>>& iv) {
  std::sort(iv.begin(), iv.end());
  long long n = 0;
  uintptr_t lo = 0, hi = 0;
  bool open = false;
  for (const auto& [a, b] : iv) {
    if (!open || a > hi) {
      if (open) n += static_cast<long long>(hi - lo);
      lo = a;
      hi = b;
      open = true;
    } else {
      hi = std::max(hi, b);
    }
  }
  if (open) n += static_cast<long long>(hi - lo);
  return n;
}

struct Lane {
  int lane;
  const Access* a;
};

void add_request(const std::string& kernel, const std::vector<Lane>& req) {
  const Access& first = *req[0].a;
  Stat& st = R().stats[Key{kernel, first.pc, first.shared, first.store, static_cast<int>(first.size)}];
  st.requests += 1;
  st.lanes += static_cast<long long>(req.size());
  std::vector<std::pair<uintptr_t, uintptr_t>> iv;
  iv.reserve(req.size());
  for (const Lane& l : req) {
    st.bytes += l.a->size;
    iv.emplace_back(l.a->addr, l.a->addr + l.a->size);
  }
  const long long unique = union_length(iv);
  st.unique_bytes += unique;
  if (!first.shared) {
    std::vector<std::pair<uintptr_t, uintptr_t>> sec;
    sec.reserve(iv.size());
    for (const auto& [a, b] : iv) sec.emplace_back(a / 32, (b - 1) / 32 + 1);
    st.sectors += union_length(sec);
    st.ideal_sectors += (unique + 31) / 32;
    return;
  }
  const int phases = first.size <= 4 ? 1 : first.size <= 8 ? 2 : 4;
  const int per_phase = 32 / phases;
  long long wf = 0, ideal = 0;
  for (int ph = 0; ph < phases; ++ph) {
    std::map<uintptr_t, std::vector<uintptr_t>> words_by_bank;  // bank -> distinct words
    bool any = false;
    for (const Lane& l : req) {
      if (l.lane / per_phase != ph) continue;
      any = true;
      for (uintptr_t w = l.a->addr / 4; w <= (l.a->addr + l.a->size - 1) / 4; ++w) {
        auto& v = words_by_bank[w % 32];
        if (std::find(v.begin(), v.end(), w) == v.end()) v.push_back(w);
      }
    }
    if (!any) continue;
    size_t worst = 1;
    for (const auto& kv : words_by_bank) worst = std::max(worst, kv.second.size());
    wf += static_cast<long long>(worst);
    ideal += 1;
  }
  st.wavefronts += wf;
  st.ideal_wavefronts += ideal;
  st.max_wavefronts = std::max(st.max_wavefronts, wf);
}

}  // namespace

namespace ostq_emu {

// The block's accesses, warp by warp: the k-th execution of a site by each lane is one request.
// A block that failed (the launch throws) is dropped, so its accesses do not reach the next one.
void memprof_block_end(bool keep) {
  if (!g_on) return;
  g_busy = true;
  Recorder& r = R();
  if (!keep) {
    for (auto& v : r.per_thread) v.clear();
    g_busy = false;
    return;
  }
  const Sched& s = S();
  const std::string kernel = s.kernel_name;
  using Site = std::tuple<uintptr_t, int, int, int>;  // pc, shared, store, size
  for (int w0 = 0; w0 < s.nthreads; w0 += kWarpSize) {
    std::map<std::pair<Site, long long>, std::vector<Lane>> reqs;
    for (int lane = 0; lane < kWarpSize && w0 + lane < s.nthreads; ++lane) {
      if (static_cast<size_t>(w0 + lane) >= r.per_thread.size()) break;
      std::map<Site, long long> seen;
      for (const Access& a : r.per_thread[w0 + lane]) {
        const Site site{a.pc, a.shared, a.store, static_cast<int>(a.size)};
        const long long k = seen[site]++;
        reqs[{site, k}].push_back(Lane{lane, &a});
      }
    }
    for (const auto& kv : reqs) add_request(kernel, kv.second);
  }
  for (auto& v : r.per_thread) v.clear();
  ++r.blocks;
  g_busy = false;
}

}  // namespace ostq_emu

#if defined(OSTQ_SIMT_MEMPROF)
#define OSTQ_MEMPROF_HOOKS(n)                                                                   \
  extern "C" __attribute__((no_sanitize_address)) void __asan_load##n##_noabort(uintptr_t a) {  \
    record(a, n, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));            \
  }                                                                                             \
  extern "C" __attribute__((no_sanitize_address)) void __asan_store##n##_noabort(uintptr_t a) { \
    record(a, n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));             \
  }
OSTQ_MEMPROF_HOOKS(1)
OSTQ_MEMPROF_HOOKS(2)
OSTQ_MEMPROF_HOOKS(4)
OSTQ_MEMPROF_HOOKS(8)
OSTQ_MEMPROF_HOOKS(16)
#undef OSTQ_MEMPROF_HOOKS
extern "C" __attribute__((no_sanitize_address)) void __asan_loadN_noabort(uintptr_t a, size_t n) {
  record(a, n, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
extern "C" __attribute__((no_sanitize_address)) void __asan_storeN_noabort(uintptr_t a, size_t n) {
  record(a, n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
extern "C" void __asan_handle_no_return() {}
extern "C" void __asan_before_dynamic_init(const char*) {}  // (initialisation-order checks)
extern "C" void __asan_after_dynamic_init() {}
#endif

// Access patterns with known answers (tests/test_simt_memprof.py): one warp (or `threads`
// threads), global memory `g` (float32, at least 32 * threads + 4 elements, registered by the
// caller), results to `out` (float32, threads elements). Shared-memory patterns use the launch's
// dynamic shared memory (first written, then read, with a barrier between).
void memprof_pattern(const std::string& pattern, at::Tensor g, at::Tensor out, int threads) {
  TORCH_CHECK(g.dtype() == at::kFloat && out.dtype() == at::kFloat && g.is_contiguous() &&
              out.is_contiguous() && out.numel() >= threads && g.numel() >= 32 * threads + 4,
              "memprof_pattern: float32 buffers g (>= 32 * threads + 4) and out (>= threads)");
  float* gp = g.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const size_t smem = 32 * 1024;
  auto run = [&](auto body) {
    ostq_emu::launch(pattern.c_str(), nullptr, dim3(1), dim3(threads), smem, nullptr, body);
  };
  auto smem_f = [] { return reinterpret_cast<float*>(ostq_emu::dyn_smem_base()); };
  if (pattern == "global_coalesced_4") {         // 32 lanes x 4 B contiguous: 4 sectors
    run([&] { const int t = threadIdx.x; op[t] = gp[t]; });
  } else if (pattern == "global_strided_4") {    // stride 128 B: one sector per lane
    run([&] { const int t = threadIdx.x; op[t] = gp[32 * t]; });
  } else if (pattern == "global_misaligned_4") { // 128 B starting 4 B into a sector: 5 sectors
    run([&] { const int t = threadIdx.x; op[t] = gp[t + 1]; });
  } else if (pattern == "global_vector_16") {    // 32 lanes x 16 B: 16 sectors
    run([&] {
      const int t = threadIdx.x;
      const float4 v = reinterpret_cast<const float4*>(gp)[t];
      op[t] = v.x + v.w;
    });
  } else if (pattern == "global_then_trap") {    // loads, then the block fails: nothing kept
    run([&] {
      const int t = threadIdx.x;
      op[t] = gp[t];
      __syncthreads();
      if (t == 0) __trap();
    });
  } else if (pattern == "global_broadcast_4") {  // every lane the same word: 1 sector
    run([&] { const int t = threadIdx.x; op[t] = gp[0]; });
  } else if (pattern == "shared_4") {            // conflict-free: 1 wavefront
    run([&] {
      const int t = threadIdx.x;
      smem_f()[t] = 1.0f;
      __syncthreads();
      op[t] = smem_f()[t];
    });
  } else if (pattern == "shared_4_stride2") {    // word 2t: 2-way conflicts, 2 wavefronts
    run([&] {
      const int t = threadIdx.x;
      smem_f()[2 * t] = 1.0f;
      __syncthreads();
      op[t] = smem_f()[2 * t];
    });
  } else if (pattern == "shared_4_stride32") {   // word 32t: all lanes in bank 0, 32 wavefronts
    run([&] {
      const int t = threadIdx.x;
      smem_f()[32 * t] = 1.0f;
      __syncthreads();
      op[t] = smem_f()[32 * t];
    });
  } else if (pattern == "shared_4_broadcast") {  // one word for all: 1 wavefront
    run([&] {
      const int t = threadIdx.x;
      if (t == 0) smem_f()[0] = 1.0f;
      __syncthreads();
      op[t] = smem_f()[0];
    });
  } else if (pattern == "shared_8") {            // 8 B per lane, contiguous: 2 wavefronts
    run([&] {
      const int t = threadIdx.x;
      auto* s2 = reinterpret_cast<float2*>(smem_f());
      s2[t] = make_float2(1.0f, 2.0f);
      __syncthreads();
      const float2 v = s2[t];
      op[t] = v.x + v.y;
    });
  } else if (pattern == "shared_16") {           // 16 B per lane, contiguous: 4 wavefronts
    run([&] {
      const int t = threadIdx.x;
      auto* s4 = reinterpret_cast<float4*>(smem_f());
      s4[t] = make_float4(1.0f, 2.0f, 3.0f, 4.0f);
      __syncthreads();
      const float4 v = s4[t];
      op[t] = v.x + v.w;
    });
  } else if (pattern == "shared_16_stride2") {   // 16 B at a 32 B stride: 2 per phase, 8
    run([&] {
      const int t = threadIdx.x;
      auto* s4 = reinterpret_cast<float4*>(smem_f());
      s4[2 * t] = make_float4(1.0f, 2.0f, 3.0f, 4.0f);
      __syncthreads();
      const float4 v = s4[2 * t];
      op[t] = v.x + v.w;
    });
  } else {
    throw std::runtime_error("memprof_pattern: unknown pattern " + pattern);
  }
}

void register_memprof(pybind11::module_& m) {
  m.def("memprof_pattern", &memprof_pattern, "Run an access pattern with a known profile (tests).");
  m.attr("memprof_available") = kAvailable;
  m.def("memprof_start", []() {
    if (!kAvailable) throw std::runtime_error("memprof: this module was not built with OSTQUANT_SIMT_MEMPROF=1");
    g_busy = true;
    delete g_rec;
    g_rec = new Recorder();
    if (g_ranges == nullptr) g_ranges = new std::vector<std::pair<uintptr_t, uintptr_t>>();
    if (g_alloc == nullptr) {
      g_alloc = new TrackingAllocator();
      g_alloc->inner = c10::GetCPUAllocator();
      c10::SetCPUAllocator(g_alloc, kAllocPriority);
    }
    g_busy = false;
    g_on = true;
  }, "Start recording the emulated kernels' memory accesses (clears what was recorded) and "
     "count every CPU tensor allocated from now on as global memory.");
  m.def("memprof_stop", []() {
    g_on = false;
    // (the wrapper stays installed, so tensors made while recording unregister when freed)
  }, "Stop recording.");
  m.def("memprof_register", [](const at::Tensor& t) {
    if (g_ranges == nullptr) g_ranges = new std::vector<std::pair<uintptr_t, uintptr_t>>();
    const auto& st = t.storage();
    if (st.nbytes() > 0) {
      const auto lo = reinterpret_cast<uintptr_t>(st.data());
      g_ranges->emplace_back(lo, lo + st.nbytes());
    }
  }, "Count tensor t's storage as global memory (a tensor made before memprof_start).");
  m.def("memprof_clear_ranges", []() {
    if (g_ranges != nullptr) g_ranges->clear();
  }, "Forget the registered tensors (after the profiled call).");
  m.def("memprof_stats", []() {
    // rows: kernel, pc offset in this module, shared, store, width, then the counters
    pybind11::list rows;
    if (g_rec == nullptr) throw std::runtime_error("memprof: nothing recorded (call memprof_start first)");
    Dl_info info{};
    dladdr(reinterpret_cast<void*>(&register_memprof), &info);
    const auto base = reinterpret_cast<uintptr_t>(info.dli_fbase);
    for (const auto& [k, st] : R().stats) {
      const auto& [kernel, pc, shared, store, size] = k;
      // the return address is just past the call: pc - 1 lies in the access's own line
      rows.append(pybind11::make_tuple(kernel, static_cast<long long>(pc - base - 1), shared != 0,
                                       store != 0, size, st.requests, st.lanes, st.bytes,
                                       st.unique_bytes, st.sectors, st.ideal_sectors, st.wavefronts,
                                       st.ideal_wavefronts, st.max_wavefronts));
    }
    return pybind11::make_tuple(rows, std::string(info.dli_fname ? info.dli_fname : ""),
                                R().blocks);
  }, "(rows, module file, blocks): the recorded requests per kernel and access site.");
}
