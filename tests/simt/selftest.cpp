// Self-tests of the SIMT emulator (tests/test_simt_emu.py): that it finds what it claims to find
// (races between schedules, divergent barriers, collectives over returned lanes, bad launches)
// and that its mma fragment layouts agree with CUTLASS's (cute's MMA atoms, an independent
// transcription of the PTX ISA), when the CUTLASS headers are there.
#include <torch/extension.h>

#include <string>

#if defined(OSTQ_SIMT_HAVE_CUTE)
#include <cute/atom/mma_traits_sm80.hpp>
#endif

namespace {

// Thread i writes s[i], then (with or without a barrier) reads s[(i + 1) % n].
void neighbour_kernel(int* out, bool sync) {
  __shared__ int s[256];
  const int i = threadIdx.x, n = blockDim.x;
  s[i] = 1000 * blockIdx.x + i;
  if (sync) __syncthreads();
  out[blockIdx.x * n + i] = s[(i + 1) % n];
}

at::Tensor neighbour(int64_t threads, bool sync) {
  at::Tensor out = at::full({2 * threads}, -1, at::kInt);
  int* p = out.data_ptr<int>();
  ostq_emu::launch("neighbour_kernel", nullptr, dim3(2), dim3(threads), 0, nullptr,
                   [&] { neighbour_kernel(p, sync); });
  return out;
}

// Block 0 writes its shared array, block 1 only reads it: on a GPU block 1 reads garbage (its
// own shared memory); here 0xFF bytes (-1), not block 0's values.
void stale_shared_kernel(int* out) {
  __shared__ int s[64];
  if (blockIdx.x == 0) s[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = s[threadIdx.x];
}

at::Tensor stale_shared() {
  at::Tensor out = at::zeros({128}, at::kInt);
  int* p = out.data_ptr<int>();
  ostq_emu::launch("stale_shared_kernel", nullptr, dim3(2), dim3(64), 0, nullptr,
                   [&] { stale_shared_kernel(p); });
  return out;
}

// Threads below `exit_below` return before the block's barrier.
void early_exit_kernel(int exit_below) {
  if (static_cast<int>(threadIdx.x) < exit_below) return;
  __syncthreads();
}

// Lane 0 returns; the others shuffle with the full mask.
void shfl_after_exit_kernel() {
  if (threadIdx.x == 0) return;
  (void)__shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// Even lanes shuffle, odd lanes vote: two different collectives meet.
void mixed_collectives_kernel() {
  if (threadIdx.x % 2 == 0) {
    (void)__shfl_xor_sync(0xffffffffu, 1, 1);
  } else {
    (void)__ballot_sync(0xffffffffu, 1);
  }
}

void trap_kernel() {
  if (threadIdx.x == 5) __trap();
}

// Runs one of the faulty kernels above; returns the emulator's error message ("" if none).
std::string faulty(const std::string& which) {
  try {
    if (which == "early_exit") {
      ostq_emu::launch("early_exit_kernel", nullptr, dim3(1), dim3(64), 0, nullptr,
                       [&] { early_exit_kernel(16); });
    } else if (which == "all_exit") {  // every thread returns: no barrier pending, fine
      ostq_emu::launch("early_exit_kernel", nullptr, dim3(1), dim3(64), 0, nullptr,
                       [&] { early_exit_kernel(64); });
    } else if (which == "shfl_after_exit") {
      ostq_emu::launch("shfl_after_exit_kernel", nullptr, dim3(1), dim3(32), 0, nullptr,
                       [&] { shfl_after_exit_kernel(); });
    } else if (which == "mixed_collectives") {
      ostq_emu::launch("mixed_collectives_kernel", nullptr, dim3(1), dim3(32), 0, nullptr,
                       [&] { mixed_collectives_kernel(); });
    } else if (which == "trap") {
      ostq_emu::launch("trap_kernel", nullptr, dim3(3), dim3(32), 0, nullptr,
                       [&] { trap_kernel(); });
    } else {
      TORCH_CHECK_VALUE(false, "unknown self-test ", which);
    }
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

void noop_kernel() {}

// The cudaError_t a launch configuration leaves in cudaGetLastError() (0: launched), after
// cudaFuncSetAttribute(MaxDynamicSharedMemorySize, optin) when optin > 0 (whose own error wins).
int launch_error(int64_t grid_x, int64_t block_x, int64_t smem, int64_t optin) {
  (void)cudaGetLastError();
  ostq_emu::S().smem_optin.clear();
  if (optin > 0) {
    const cudaError_t e = cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(optin));
    if (e != cudaSuccess) {
      (void)cudaGetLastError();  // the failed call is the last error too, as in CUDA
      return static_cast<int>(e);
    }
  }
  ostq_emu::launch("noop_kernel", ostq_emu::fn_key(noop_kernel), dim3(static_cast<unsigned>(grid_x)),
                   dim3(static_cast<unsigned>(block_x)), static_cast<size_t>(smem), nullptr,
                   [] { noop_kernel(); });
  return static_cast<int>(cudaGetLastError());
}

// One warp-wide mma on the given matrices, fragments loaded through the emulator's own layouts:
// A [16, K], B [K, 8] (K = 16: float16 / bfloat16; K = 32: int8) -> [16, 8] (fp32 / int32).
void mma_kernel(const at::Tensor& a, const at::Tensor& b, at::Tensor& d) {
  const int lane = threadIdx.x;
  uint32_t fa[4] = {0, 0, 0, 0}, fb[2] = {0, 0};
  if (a.scalar_type() == at::kChar) {
    const int8_t* A = a.data_ptr<int8_t>();
    const int8_t* B = b.data_ptr<int8_t>();
    for (int e = 0; e < 16; ++e) {
      const auto c = ostq_emu::a_16832(lane, e);
      fa[e / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(A[c.row * 32 + c.col])) << (8 * (e % 4));
    }
    for (int e = 0; e < 8; ++e) {
      const auto c = ostq_emu::b_16832(lane, e);
      fb[e / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(B[c.row * 8 + c.col])) << (8 * (e % 4));
    }
    int acc[4] = {0, 0, 0, 0};
    ostq_emu::mma_m16n8k32_s8(acc, fa, fb[0], fb[1]);
    for (int e = 0; e < 4; ++e) {
      const auto c = ostq_emu::c_16n8(lane, e);
      d.data_ptr<int>()[c.row * 8 + c.col] = acc[e];
    }
    return;
  }
  const uint16_t* A = reinterpret_cast<const uint16_t*>(a.data_ptr());
  const uint16_t* B = reinterpret_cast<const uint16_t*>(b.data_ptr());
  for (int e = 0; e < 8; ++e) {
    const auto c = ostq_emu::a_16816(lane, e);
    fa[e / 2] |= static_cast<uint32_t>(A[c.row * 16 + c.col]) << (16 * (e % 2));
  }
  for (int e = 0; e < 4; ++e) {
    const auto c = ostq_emu::b_16816(lane, e);
    fb[e / 2] |= static_cast<uint32_t>(B[c.row * 8 + c.col]) << (16 * (e % 2));
  }
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (a.scalar_type() == at::kHalf) {
    ostq_emu::mma_m16n8k16<__half>(acc, fa, fb[0], fb[1]);
  } else {
    ostq_emu::mma_m16n8k16<__nv_bfloat16>(acc, fa, fb[0], fb[1]);
  }
  for (int e = 0; e < 4; ++e) {
    const auto c = ostq_emu::c_16n8(lane, e);
    d.data_ptr<float>()[c.row * 8 + c.col] = acc[e];
  }
}

at::Tensor mma(const at::Tensor& a_in, const at::Tensor& b_in) {
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor d = at::zeros({16, 8}, a.scalar_type() == at::kChar ? at::kInt : at::kFloat);
  ostq_emu::launch("mma_kernel", nullptr, dim3(1), dim3(32), 0, nullptr,
                   [&] { mma_kernel(a, b, d); });
  return d;
}

#if defined(OSTQ_SIMT_HAVE_CUTE)
// Compare (lane, element) -> (row, col) of the emulator with cute's thread-value layouts, which
// map (thread, value) to a column-major index into the M x K (A), N x K (B), M x N (C) tile.
template <class Traits>
std::string compare_layouts(const char* name, int M, int N, int K, ostq_emu::Coord (*fa)(int, int),
                            ostq_emu::Coord (*fb)(int, int), int na, int nb) {
  using namespace cute;
  std::string bad;
  auto check = [&](const char* what, auto layout, int rows, int lane, int v, int want_r, int want_c) {
    const int idx = static_cast<int>(layout(lane, v));
    const int r = idx % rows, c = idx / rows;
    if ((r != want_r || c != want_c) && bad.empty()) {
      bad = std::string(name) + " " + what + ": lane " + std::to_string(lane) + " element " +
            std::to_string(v) + " is (" + std::to_string(want_r) + ", " + std::to_string(want_c) +
            ") here, (" + std::to_string(r) + ", " + std::to_string(c) + ") in cute";
    }
  };
  for (int lane = 0; lane < 32; ++lane) {
    for (int v = 0; v < na; ++v) {
      const auto c = fa(lane, v);
      check("A", typename Traits::ALayout{}, M, lane, v, c.row, c.col);
    }
    for (int v = 0; v < nb; ++v) {  // cute's B is N x K: (n, k)
      const auto c = fb(lane, v);
      check("B", typename Traits::BLayout{}, N, lane, v, c.col, c.row);
    }
    for (int v = 0; v < 4; ++v) {
      const auto c = ostq_emu::c_16n8(lane, v);
      check("C", typename Traits::CLayout{}, M, lane, v, c.row, c.col);
    }
  }
  (void)K;
  return bad;
}

// "" when every layout agrees; else the first disagreement.
std::string mma_layouts_vs_cute() {
  using namespace cute;
  std::string r = compare_layouts<MMA_Traits<SM80_16x8x16_F32F16F16F32_TN>>(
      "m16n8k16.f16", 16, 8, 16, ostq_emu::a_16816, ostq_emu::b_16816, 8, 4);
  if (r.empty()) {
    r = compare_layouts<MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>>(
        "m16n8k16.bf16", 16, 8, 16, ostq_emu::a_16816, ostq_emu::b_16816, 8, 4);
  }
  if (r.empty()) {
    r = compare_layouts<MMA_Traits<SM80_16x8x32_S32S8S8S32_TN>>(
        "m16n8k32.s8", 16, 8, 32, ostq_emu::a_16832, ostq_emu::b_16832, 16, 8);
  }
  return r;
}
#endif

}  // namespace

void register_selftests(pybind11::module_& m) {
  auto t = m.def_submodule("selftest", "checks of the SIMT emulator itself");
  t.def("neighbour", &neighbour, "threads write s[i], read s[i+1] with or without a barrier");
  t.def("stale_shared", &stale_shared, "block 1 reads a shared array only block 0 wrote");
  t.def("faulty", &faulty, "run a faulty kernel; returns the emulator's error message");
  t.def("launch_error", &launch_error, "cudaGetLastError() after a launch configuration");
  t.def("mma", &mma, "one emulated warp-wide mma of A [16, K] and B [K, 8]");
#if defined(OSTQ_SIMT_HAVE_CUTE)
  t.def("mma_layouts_vs_cute", &mma_layouts_vs_cute);
  t.attr("have_cute") = true;
#else
  t.attr("have_cute") = false;
#endif
}
