// Self-tests of the SIMT emulator (tests/test_simt_emu.py): that it finds what it claims to find
// (races between schedules, divergent barriers, collectives over returned lanes, bad launches)
// and that its mma fragment layouts agree with CUTLASS's (cute's MMA atoms, an independent
// transcription of the PTX ISA), when the CUTLASS headers are there.
#include <torch/extension.h>

#include <string>

#if defined(OSTQ_SIMT_HAVE_CUTE)
#include <cute/arch/copy_sm75.hpp>
#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/copy_traits_sm90.hpp>
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
  ostq_emu::S().smem_optin.erase(ostq_emu::fn_key(noop_kernel));  // (others keep theirs: CUTLASS sets its once)
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
// A [16, K], B [K, 8] (K = 16: float16 / bfloat16; K = 32: int8; K = 64: int8 holding int4
// codes) -> [16, 8] (fp32 / int32).
void mma_kernel(const at::Tensor& a, const at::Tensor& b, at::Tensor& d) {
  const int lane = threadIdx.x;
  uint32_t fa[4] = {0, 0, 0, 0}, fb[2] = {0, 0};
  if (a.scalar_type() == at::kChar && a.size(1) == 64) {  // s4: nibble e % 8 of register e / 8
    const int8_t* A = a.data_ptr<int8_t>();
    const int8_t* B = b.data_ptr<int8_t>();
    for (int e = 0; e < 32; ++e) {
      const auto c = ostq_emu::a_16864(lane, e);
      fa[e / 8] |= static_cast<uint32_t>(A[c.row * 64 + c.col] & 0xF) << (4 * (e % 8));
    }
    for (int e = 0; e < 16; ++e) {
      const auto c = ostq_emu::b_16864(lane, e);
      fb[e / 8] |= static_cast<uint32_t>(B[c.row * 8 + c.col] & 0xF) << (4 * (e % 8));
    }
    int acc[4] = {0, 0, 0, 0};
    ostq_emu::mma_m16n8k64_s4_sat(acc, fa, fb, acc);
    for (int e = 0; e < 4; ++e) {
      const auto c = ostq_emu::c_16n8(lane, e);
      d.data_ptr<int>()[c.row * 8 + c.col] = acc[e];
    }
    return;
  }
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
  if (r.empty()) {  // CUTLASS's int4 IMMA GEMM (csrc/gemm/sm80)
    r = compare_layouts<MMA_Traits<SM80_16x8x64_S32S4S4S32_TN>>(
        "m16n8k64.s4", 16, 8, 64, ostq_emu::a_16864, ostq_emu::b_16864, 32, 16);
  }
  return r;
}

// The emulated ldmatrix (what CUTLASS's ldsm becomes, tests/simt/cutlass_overlay.py) against
// cute's LDSM copy traits, whose DstLayout maps (lane, bit of the lane's registers) to the bit of
// the 8x8 b16 matrices as the lanes' row addresses give them (row = bit / 128). Lane l's row
// address points at row l of a 32 x 8 matrix of b16 values 8 * row + col.
template <class Traits>
std::string compare_ldsm(const char* name, int count, bool trans) {
  std::vector<uint32_t> got(32 * 4, 0xFFFFFFFFu);
  ostq_emu::launch(name, nullptr, dim3(1), dim3(32), 32 * 16, nullptr, [&] {
    auto* rows = reinterpret_cast<uint16_t*>(ostq_emu::dyn_smem_base());
    const int lane = threadIdx.x;
    for (int c = 0; c < 8; ++c) rows[8 * lane + c] = static_cast<uint16_t>(8 * lane + c);
    __syncwarp();
    unsigned d[4];
    ostq_emu::ldmatrix(d, count, trans, rows + 8 * lane);
    for (int j = 0; j < count; ++j) got[4 * lane + j] = d[j];
  });
  typename Traits::DstLayout dst{};
  for (int lane = 0; lane < 32; ++lane) {
    for (int j = 0; j < count; ++j) {
      for (int h = 0; h < 2; ++h) {  // the two b16 halves of register j
        const int bit = static_cast<int>(dst(lane, 32 * j + 16 * h));
        const int want = 8 * (bit / 128) + (bit % 128) / 16;
        const int have = static_cast<int>(got[4 * lane + j] >> (16 * h) & 0xFFFF);
        if (have != want) {
          return std::string(name) + ": lane " + std::to_string(lane) + " register " +
                 std::to_string(j) + " half " + std::to_string(h) + " holds element " +
                 std::to_string(have) + " here, " + std::to_string(want) + " in cute";
        }
      }
    }
  }
  return "";
}

// The emulated stmatrix (the Hopper epilogue's smem stores, sm90 overlay) against cute's STSM copy
// traits, whose SrcLayout maps (lane, bit of the lane's registers) to the bit of the 8x8 b16
// matrices at the lanes' row addresses. Lane l's row address points at row l of a 32 x 8 matrix;
// lane l's register j half h holds the value 8 * l + 2 * j + h.
template <class Traits>
std::string compare_stsm(const char* name, int count, bool trans) {
  std::vector<uint16_t> rows(32 * 8, 0xFFFF);
  ostq_emu::launch(name, nullptr, dim3(1), dim3(32), 32 * 16, nullptr, [&] {
    auto* s = reinterpret_cast<uint16_t*>(ostq_emu::dyn_smem_base());
    const unsigned lane = threadIdx.x;
    unsigned v[4];
    for (int j = 0; j < 4; ++j) v[j] = (8 * lane + 2 * j) | (8 * lane + 2 * j + 1) << 16;
    ostq_emu::stmatrix(v, count, trans, s + 8 * lane);
    __syncwarp();
    for (int c = 0; c < 8; ++c) rows[8 * lane + c] = s[8 * lane + c];
  });
  typename Traits::SrcLayout src{};
  std::vector<int> seen(32 * 8, 0);
  for (int lane = 0; lane < 32; ++lane) {
    for (int j = 0; j < count; ++j) {
      for (int h = 0; h < 2; ++h) {
        const int bit = static_cast<int>(src(lane, 32 * j + 16 * h));
        const int at = 8 * (bit / 128) + (bit % 128) / 16;
        ++seen[at];
        if (rows[at] != 8 * lane + 2 * j + h) {
          return std::string(name) + ": element " + std::to_string(at) + " holds " +
                 std::to_string(rows[at]) + " here, lane " + std::to_string(lane) + " register " +
                 std::to_string(j) + " half " + std::to_string(h) + " in cute";
        }
      }
    }
  }
  for (int at = 0; at < 32 * 8; ++at) {
    if (!seen[at] && rows[at] != 0xFFFF) {
      return std::string(name) + ": element " + std::to_string(at) + " written, no register maps there";
    }
  }
  return "";
}

std::string stmatrix_vs_cute() {
  using namespace cute;
  std::string r = compare_stsm<Copy_Traits<SM90_U32x1_STSM_N>>("stmatrix.x1", 1, false);
  if (r.empty()) r = compare_stsm<Copy_Traits<SM90_U32x2_STSM_N>>("stmatrix.x2", 2, false);
  if (r.empty()) r = compare_stsm<Copy_Traits<SM90_U32x4_STSM_N>>("stmatrix.x4", 4, false);
  if (r.empty()) r = compare_stsm<Copy_Traits<SM90_U16x2_STSM_T>>("stmatrix.x1.trans", 1, true);
  if (r.empty()) r = compare_stsm<Copy_Traits<SM90_U16x4_STSM_T>>("stmatrix.x2.trans", 2, true);
  if (r.empty()) r = compare_stsm<Copy_Traits<SM90_U16x8_STSM_T>>("stmatrix.x4.trans", 4, true);
  return r;
}

std::string ldmatrix_vs_cute() {
  using namespace cute;
  std::string r = compare_ldsm<Copy_Traits<SM75_U32x1_LDSM_N>>("ldmatrix.x1", 1, false);
  if (r.empty()) r = compare_ldsm<Copy_Traits<SM75_U32x2_LDSM_N>>("ldmatrix.x2", 2, false);
  if (r.empty()) r = compare_ldsm<Copy_Traits<SM75_U32x4_LDSM_N>>("ldmatrix.x4", 4, false);
  if (r.empty()) r = compare_ldsm<Copy_Traits<SM75_U16x2_LDSM_T>>("ldmatrix.x1.trans", 1, true);
  if (r.empty()) r = compare_ldsm<Copy_Traits<SM75_U16x4_LDSM_T>>("ldmatrix.x2.trans", 2, true);
  if (r.empty()) r = compare_ldsm<Copy_Traits<SM75_U16x8_LDSM_T>>("ldmatrix.x4.trans", 4, true);
  return r;
}
#endif

// cp.async as the emulator runs it: copies land at the cp.async.wait_group that covers their
// commit group, not before; zfill with the predicate off writes zeros; the checks on addresses.
// "" when all holds, else what did not.
std::string cp_async_semantics() {
  std::string bad;
  alignas(16) static int src[16];
  for (int i = 0; i < 16; ++i) src[i] = 100 + i;
  auto expect = [&](bool ok, const char* what) {
    if (!ok && bad.empty()) bad = what;
  };
  ostq_emu::launch("cp_async_semantics", nullptr, dim3(1), dim3(1), 64, nullptr, [&] {
    int* s = reinterpret_cast<int*>(ostq_emu::dyn_smem_base());  // 16 ints, 0xFF bytes
    ostq_emu::cp_async(s, src, 16, true, false);                      // group 0
    ostq_emu::cp_async_commit();
    ostq_emu::cp_async(s + 4, src + 4, 16, true, true);               // group 1
    ostq_emu::cp_async(s + 8, src + 8, 16, false, true);              // group 1, zfill
    ostq_emu::cp_async_commit();
    ostq_emu::cp_async(s + 12, src + 12, 16, false, false);           // predicated off
    expect(s[0] == -1 && s[4] == -1, "a copy landed before any wait");
    ostq_emu::cp_async_wait(1);
    expect(s[0] == 100 && s[3] == 103, "wait_group 1 did not land group 0");
    expect(s[4] == -1 && s[8] == -1, "wait_group 1 landed the newest group");
    ostq_emu::cp_async_wait(0);
    expect(s[4] == 104 && s[7] == 107, "wait_group 0 did not land group 1");
    expect(s[8] == 0 && s[11] == 0, "zfill with the predicate off did not write zeros");
    expect(s[12] == -1, "a predicated-off cp.async wrote");
    ostq_emu::cp_async(s + 12, src + 12, 16, true, false);            // not committed
    ostq_emu::cp_async_wait(-1);                                      // wait_all
    expect(s[12] == 112, "wait_all did not land the uncommitted copy");
  });
  auto error_of = [](auto&& body) -> std::string {
    try {
      ostq_emu::launch("cp_async_checks", nullptr, dim3(1), dim3(1), 64, nullptr, body);
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    return "";
  };
  const std::string misaligned = error_of([&] {
    ostq_emu::cp_async(ostq_emu::dyn_smem_base() + 8, src, 16, true, true);
  });
  expect(misaligned.find("not aligned to 16 bytes") != std::string::npos,
         "a misaligned cp.async destination passed");
  const std::string global_dst = error_of([&] { ostq_emu::cp_async(src, src + 4, 16, true, true); });
  expect(global_dst.find("outside shared memory") != std::string::npos,
         "a cp.async into global memory passed");
  const std::string smem_src = error_of([&] {
    unsigned char* s = ostq_emu::dyn_smem_base();
    ostq_emu::cp_async(s, s + 16, 16, true, true);
  });
  expect(smem_src.find("global access to shared memory") != std::string::npos,
         "a cp.async from shared memory passed");
  return bad;
}

// The 32-bit shared window: the dynamic shared memory is 1024-byte aligned and starts at window
// address 1024; addresses map back to the same bytes; pointers and addresses outside fail.
// "" when all holds, else what did not.
std::string smem_window() {
  std::string bad;
  auto expect = [&](bool ok, const char* what) {
    if (!ok && bad.empty()) bad = what;
  };
  auto error_of = [](size_t smem, auto&& body) -> std::string {
    try {
      ostq_emu::launch("smem_window", nullptr, dim3(1), dim3(1), smem, nullptr, body);
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    return "";
  };
  for (size_t smem : {size_t(16), size_t(3000), size_t(40960)}) {
    const std::string err = error_of(smem, [&] {
      unsigned char* s = ostq_emu::dyn_smem_base();
      expect(reinterpret_cast<uintptr_t>(s) % 1024 == 0, "dynamic shared memory not 1024-byte aligned");
      expect(ostq_emu::smem_window_addr(s) == 1024, "dynamic shared memory not at window address 1024");
      const size_t off = smem - 8;
      expect(ostq_emu::smem_window_addr(s + off) == 1024 + off, "window address not base + offset");
      expect(ostq_emu::smem_window_ptr(static_cast<uint32_t>(1024 + off), 8) == s + off,
             "window address does not map back to its byte");
    });
    expect(err.empty(), "a window access inside the dynamic shared memory failed");
  }
  alignas(16) static int global[4];
  expect(error_of(64, [&] { (void)ostq_emu::smem_window_addr(global); }).find("outside the block's dynamic") !=
             std::string::npos, "the window address of a global pointer passed");
  expect(error_of(64, [&] { (void)ostq_emu::smem_window_ptr(1024 + 60, 8); }).find("outside the block's dynamic") !=
             std::string::npos, "a window access past the end passed");
  expect(error_of(64, [&] { (void)ostq_emu::smem_window_ptr(1000, 4); }).find("outside the block's dynamic") !=
             std::string::npos, "a window access into the system KiB passed");
  return bad;
}

}  // namespace

void register_selftests(pybind11::module_& m) {
  auto t = m.def_submodule("selftest", "checks of the SIMT emulator itself");
  t.def("neighbour", &neighbour, "threads write s[i], read s[i+1] with or without a barrier");
  t.def("stale_shared", &stale_shared, "block 1 reads a shared array only block 0 wrote");
  t.def("faulty", &faulty, "run a faulty kernel; returns the emulator's error message");
  t.def("launch_error", &launch_error, "cudaGetLastError() after a launch configuration");
  t.def("mma", &mma, "one emulated warp-wide mma of A [16, K] and B [K, 8]");
  t.def("cp_async_semantics", &cp_async_semantics,
        "cp.async groups, zfill and address checks of the emulator ('' when they hold)");
  t.def("smem_window", &smem_window,
        "the 32-bit shared window of the dynamic shared memory ('' when it holds)");
#if defined(OSTQ_SIMT_HAVE_CUTE)
  t.def("mma_layouts_vs_cute", &mma_layouts_vs_cute);
  t.def("ldmatrix_vs_cute", &ldmatrix_vs_cute);
  t.def("stmatrix_vs_cute", &stmatrix_vs_cute);
  t.attr("have_cute") = true;
#else
  t.attr("have_cute") = false;
#endif
}
