// Self-tests of sm90_emu.h (the sm90 spike's emulator pieces): built and run by
// sm90_spike.py (with simt_emu.h, sm90_prelude.h and sm90_spike_stubs.cpp). Exit status 0 and
// "sm90 selftest: ALL OK" when every check passes.
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda.h>
#include <cuda_runtime_api.h>

#include "cutlass/numeric_conversion.h"  // the sm90 overlay's copy (transcribed int4 -> int8 asm)

#include "sm90_selftest_util.h"

namespace {
using namespace ostq_selftest;  // check, error_of, has, g_fail

void test_encode() {
  using Fn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                          const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                          CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  void* p = nullptr;
  cudaDriverEntryPointQueryResult st;
  check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &st) ==
            cudaSuccess && p != nullptr && st == cudaDriverEntryPointSuccess, "entry point");
  auto encode = reinterpret_cast<Fn>(p);
  alignas(64) CUtensorMap map;
  alignas(16) static unsigned char w[64 * 200];
  // the kernel's A operand (w4a4_t128): uint8, gdim (K/2, N, 1), stride K/2, box (64, 128, 1), SW64
  cuuint64_t gdim[3] = {64, 200, 1}, gstride[2] = {64, 64 * 200};
  cuuint32_t box[3] = {64, 128, 1}, es[3] = {1, 1, 1};
  check(encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, w, gdim, gstride, box, es,
               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_64B,
               CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS,
        "encode A");
  const auto& r = ostq_emu::sm90::tensor_map(&map);
  check(r.rank == 3 && r.esize == 1 && r.gdim[0] == 64 && r.gdim[1] == 200 && r.gstride[0] == 64 &&
            r.box[0] == 64 && r.box[1] == 128 && r.swizzle == CU_TENSOR_MAP_SWIZZLE_64B &&
            r.gaddr == reinterpret_cast<uint64_t>(w), "A record");
  auto rejects = [&](CUtensorMap* m, void* g, cuuint64_t s0, cuuint32_t b0, CUtensorMapSwizzle sw,
                     const char* why) {
    cuuint64_t gs[2] = {s0, s0 * 200};
    cuuint32_t bx[3] = {b0, 128, 1};
    ostq_emu::sm90::encode_log().clear();
    const CUresult res = encode(m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, g, gdim, gs, bx, es,
                                CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    check(res == CUDA_ERROR_INVALID_VALUE && has(ostq_emu::sm90::encode_log(), why),
          std::string("encode rejects: ") + why);
  };
  rejects(&map, w + 8, 64, 64, CU_TENSOR_MAP_SWIZZLE_64B, "globalAddress");
  rejects(&map, w, 72, 64, CU_TENSOR_MAP_SWIZZLE_64B, "globalStrides");
  rejects(&map, w, 64, 24, CU_TENSOR_MAP_SWIZZLE_NONE, "multiple of 16");
  rejects(&map, w, 128, 128, CU_TENSOR_MAP_SWIZZLE_64B, "swizzle span");
  alignas(64) unsigned char raw[128] = {};
  check(has(error_of([&] { ostq_emu::sm90::tensor_map(raw); }), "not made by"), "foreign descriptor");
}

// mbarrier: a producer thread (warp 0) arrives with expect_tx and, later, completes the bytes
// "as TMA would"; consumers (warp 1) wait on the phase parity and must see the data.
void test_mbarrier() {
  ostq_emu::launch("mbar_kernel", nullptr, dim3(2), dim3(64), 64, nullptr, [&] {
    auto* smem = reinterpret_cast<unsigned char*>(ostq_emu::dyn_smem_base());
    uint64_t* full = reinterpret_cast<uint64_t*>(smem);
    int* data = reinterpret_cast<int*>(smem + 16);
    const int t = threadIdx.x;
    if (t == 0) ostq_emu::sm90::mbar_init(full, 1);
    __syncthreads();
    for (int phase = 0; phase < 3; ++phase) {
      if (t == 0) {
        ostq_emu::sm90::mbar_arrive_expect_tx(full, 32);
        for (int i = 0; i < 5; ++i) ostq_emu::yield_to_scheduler();  // the copy lands later
        for (int i = 0; i < 8; ++i) data[i] = 100 * phase + i + blockIdx.x;
        ostq_emu::sm90::mbar_complete_tx(full, 16);
        ostq_emu::yield_to_scheduler();
        ostq_emu::sm90::mbar_complete_tx(full, 16);
      }
      if (t >= 32) {
        ostq_emu::sm90::mbar_wait_parity(full, phase & 1);
        for (int i = 0; i < 8; ++i) {
          if (data[i] != 100 * phase + i + static_cast<int>(blockIdx.x)) ostq_emu::fail("stale data after the wait");
        }
      }
      __syncthreads();  // nobody overwrites data before every consumer read it
    }
  });
  // never completed: a consumer waits for bytes that never come
  const std::string dead = error_of([&] {
    ostq_emu::launch("mbar_deadlock", nullptr, dim3(1), dim3(64), 64, nullptr, [&] {
      uint64_t* full = reinterpret_cast<uint64_t*>(ostq_emu::dyn_smem_base());
      if (threadIdx.x == 0) ostq_emu::sm90::mbar_init(full, 1);
      __syncthreads();
      if (threadIdx.x == 0) ostq_emu::sm90::mbar_arrive_expect_tx(full, 64);
      if (threadIdx.x == 0) ostq_emu::sm90::mbar_complete_tx(full, 32);
      ostq_emu::sm90::mbar_wait_parity(full, 0);
    });
  });
  check(has(dead, "deadlock") && has(dead, "mbarrier wait"), "mbarrier deadlock reported: " + dead);
  const std::string over = error_of([&] {
    ostq_emu::launch("mbar_over", nullptr, dim3(1), dim3(32), 64, nullptr, [&] {
      uint64_t* full = reinterpret_cast<uint64_t*>(ostq_emu::dyn_smem_base());
      if (threadIdx.x == 0) {
        ostq_emu::sm90::mbar_init(full, 1);
        ostq_emu::sm90::mbar_arrive_expect_tx(full, 16);
        ostq_emu::sm90::mbar_complete_tx(full, 32);
      }
    });
  });
  check(has(over, "more than expected"), "tx overflow reported: " + over);
  const std::string uninit = error_of([&] {
    ostq_emu::launch("mbar_uninit", nullptr, dim3(1), dim3(32), 64, nullptr, [&] {
      ostq_emu::sm90::mbar_arrive(ostq_emu::dyn_smem_base());
    });
  });
  check(has(uninit, "never initialised"), "uninitialised mbarrier reported: " + uninit);
  const std::string extra = error_of([&] {
    ostq_emu::launch("mbar_extra", nullptr, dim3(1), dim3(32), 64, nullptr, [&] {
      void* b = ostq_emu::dyn_smem_base();
      if (threadIdx.x == 0) ostq_emu::sm90::mbar_init(b, 1);
      __syncthreads();
      ostq_emu::sm90::mbar_arrive_expect_tx(b, 16);  // 32 arrivals at a count-1 barrier: phase
    });                                               // completes? no: tx pending -> 2nd arrive fails
  });
  check(has(extra, "pending"), "too many arrivals reported: " + extra);
}

// named barriers: warp groups 0 and 1 sync on ids 1 and 2 with 128 threads each, in two rounds.
void test_named_barriers() {
  std::vector<int> order;
  ostq_emu::launch("bar_kernel", nullptr, dim3(1), dim3(256), 0, nullptr, [&] {
    const int t = threadIdx.x, g = t / 128;
    static int stage[2];
    if (t % 128 == 0) stage[g] = 0;
    ostq_emu::sm90::bar_sync(1 + g, 128);
    if (t % 128 == 5) stage[g] = 1;
    ostq_emu::sm90::bar_sync(1 + g, 128);
    if (stage[g] != 1) ostq_emu::fail("a thread passed bar.sync before its group's write");
    ostq_emu::sm90::bar_sync(1 + g, 128);
  });
  const std::string mismatch = error_of([&] {
    ostq_emu::launch("bar_mismatch", nullptr, dim3(1), dim3(128), 0, nullptr, [&] {
      ostq_emu::sm90::bar_sync(3, threadIdx.x < 64 ? 128 : 96);
    });
  });
  check(has(mismatch, "meets count"), "bar.sync count mismatch reported: " + mismatch);
  const std::string short_ = error_of([&] {
    ostq_emu::launch("bar_short", nullptr, dim3(1), dim3(128), 0, nullptr, [&] {
      if (threadIdx.x < 64) ostq_emu::sm90::bar_sync(3, 128);  // only 64 of 128 ever arrive
    });
  });
  check(!short_.empty(), "bar.sync with missing threads reported: " + short_);
  const std::string badcount = error_of([&] {
    ostq_emu::launch("bar_count", nullptr, dim3(1), dim3(64), 0, nullptr, [&] {
      ostq_emu::sm90::bar_sync(2, 48);
    });
  });
  check(has(badcount, "multiple of 32"), "bar.sync count not a warp multiple reported");
}
// the overlay's transcription of the int4 -> int8 converter asm (NumericArrayConverter<int8_t,
// int4b_t, 8>, the device branch) against sign extension of each nibble
void test_int4_to_int8() {
  cutlass::NumericArrayConverter<int8_t, cutlass::int4b_t, 8> conv;
  uint32_t x = 0x12345678u;
  int bad = 0;
  for (int it = 0; it < (1 << 18) + 16 * 8; ++it) {
    uint32_t w;
    if (it < 16 * 8) {
      w = static_cast<uint32_t>(it % 16) << (4 * (it / 16));  // every nibble value in every slot
    } else {
      x ^= x << 13; x ^= x >> 17; x ^= x << 5;
      w = x;
    }
    cutlass::Array<cutlass::int4b_t, 8> src;
    std::memcpy(&src, &w, 4);
    const cutlass::Array<int8_t, 8> out = conv(src);
    for (int i = 0; i < 8; ++i) {
      int v = static_cast<int>((w >> (4 * i)) & 0xF);
      if (v >= 8) v -= 16;
      if (out[i] != v && bad++ < 3) std::printf("int4->int8: word %08x element %d: %d, expected %d\n", w, i, int(out[i]), v);
    }
  }
  check(bad == 0, "int4 -> int8 converter transcription");
}

// The W4A16 mainloop's int4 -> fp16 / bf16 converters as the overlay transcribes them (prmt /
// lop3 asm -> ostq_emu::prmt / lop3; bf16 out of its __CUDA_ARCH__ block): Array sizes 8, 16 and
// 32 (the vectorized converter's packed-8 / 4 / 2 paths), every nibble in every slot plus random
// words, against nibble sign extension. And lop3 against its three projections and the
// converters' (a & b) ^ c table.
template <class T>
int check_int4_to(const char* name) {
  cutlass::NumericArrayConverter<T, cutlass::int4b_t, 32> conv;
  uint32_t x = 0x9E3779B9u;
  int bad = 0;
  for (int it = 0; it < (1 << 14) + 16 * 8; ++it) {
    uint32_t w[4];
    for (int q = 0; q < 4; ++q) {
      if (it < 16 * 8) {
        w[q] = static_cast<uint32_t>((it + 3 * q) % 16) << (4 * (it / 16));
      } else {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        w[q] = x;
      }
    }
    cutlass::Array<cutlass::int4b_t, 32> src;
    std::memcpy(&src, w, 16);
    const cutlass::Array<T, 32> out = conv(src);
    for (int i = 0; i < 32; ++i) {
      int v = static_cast<int>((w[i / 8] >> (4 * (i % 8))) & 0xF);
      if (v >= 8) v -= 16;
      const float got = static_cast<float>(out[i]);
      if (got != static_cast<float>(v) && bad++ < 3) {
        std::printf("int4->%s: word %08x element %d: %g, expected %d\n", name, w[i / 8], i, got, v);
      }
    }
  }
  return bad;
}
void test_int4_to_16bit() {
  check(ostq_emu::lop3(0x12345678u, 0x0F0F0F0Fu, 0xFF00FF00u, 0xF0) == 0x12345678u &&
            ostq_emu::lop3(0x12345678u, 0x0F0F0F0Fu, 0xFF00FF00u, 0xCC) == 0x0F0F0F0Fu &&
            ostq_emu::lop3(0x12345678u, 0x0F0F0F0Fu, 0xFF00FF00u, 0xAA) == 0xFF00FF00u &&
            ostq_emu::lop3(0x12345678u, 0x0F0F0F0Fu, 0xFF00FF00u, (0xF0 & 0xCC) ^ 0xAA) ==
                ((0x12345678u & 0x0F0F0F0Fu) ^ 0xFF00FF00u), "lop3 truth table");
  check(check_int4_to<cutlass::half_t>("fp16") == 0, "int4 -> fp16 converter transcription");
  check(check_int4_to<cutlass::bfloat16_t>("bf16") == 0, "int4 -> bf16 converter transcription");
}

// stream-K flags (cutlass::GenericBarrier's ld_acquire / red_release as the overlay routes them):
// blocks run in blockIdx order, so block 1 may wait for block 0's signal (it sees it at once),
// while block 0 waiting for block 1 is reported as a deadlock instead of spinning forever; a
// spinning thread lets the other threads of its block run (block-local signal).
void test_stream_k_flags() {
  alignas(16) static int flags[4];
  std::memset(flags, 0, sizeof flags);
  ostq_emu::launch("flags_ok", nullptr, dim3(2), dim3(64), 0, nullptr, [&] {
    if (blockIdx.x == 0) {
      __syncthreads();
      if (threadIdx.x == 0) ostq_emu::sm90::flag_red_release(&flags[0], 1);
    } else {
      if (threadIdx.x == 0) while (ostq_emu::sm90::flag_ld_acquire(&flags[0]) < 1) {}
      __syncthreads();
    }
  });
  check(flags[0] == 1, "stream-K flag: block 1 waits for block 0");
  ostq_emu::launch("flags_local", nullptr, dim3(1), dim3(64), 0, nullptr, [&] {
    if (threadIdx.x == 0) while (ostq_emu::sm90::flag_ld_acquire(&flags[1]) != 5) {}
    if (threadIdx.x == 33) for (int i = 0; i < 5; ++i) ostq_emu::sm90::flag_red_release(&flags[1], 1);
  });
  check(flags[1] == 5, "stream-K flag: a spin yields to the block's other threads");
  const std::string e = error_of([&] {
    ostq_emu::launch("flags_deadlock", nullptr, dim3(2), dim3(64), 0, nullptr, [&] {
      if (blockIdx.x == 0 && threadIdx.x == 0) while (ostq_emu::sm90::flag_ld_acquire(&flags[2]) < 1) {}
      __syncthreads();
      if (blockIdx.x == 1 && threadIdx.x == 0) ostq_emu::sm90::flag_red_release(&flags[2], 1);
    });
  });
  check(has(e, "deadlock") && has(e, "stream-K flag"), "stream-K flag: waiting on a later block: " + e);
  check(has(error_of([&] {
          ostq_emu::launch("flags_smem", nullptr, dim3(1), dim3(32), 64, nullptr, [&] {
            (void)ostq_emu::sm90::flag_ld_acquire(reinterpret_cast<int*>(ostq_emu::dyn_smem_base()));
          });
        }), "global access to shared memory"), "stream-K flag in shared memory");
}
}  // namespace

int main() {
  test_int4_to_int8();
  test_int4_to_16bit();
  test_encode();
  test_mbarrier();
  test_named_barriers();
  test_stream_k_flags();
  if (g_fail) {
    std::printf("sm90 selftest: %d FAILED\n", g_fail);
    return 1;
  }
  std::printf("sm90 selftest: ALL OK\n");
  return 0;
}
