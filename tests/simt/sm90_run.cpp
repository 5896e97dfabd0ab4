// Runs one Hopper GEMM instantiation (csrc/gemm/sm90, compiled by sm90_spike.py as host C++) on
// the SIMT emulator and compares it with a reference computed here the way
// ostquant.reference.int4_gemm does (exact int32 accumulation; the epilogue's explicitly rounded
// float ops in the same order; round-to-nearest to fp16). Bit-exact for W4A4.
//
//   sm90_run M N K [seed] [sm_count] [flags]     flags: z (x_zero + w_sum), b (bias)
//
// Prints "sm90 run: OK ..." and exits 0 when every output element matches; prints the emulator's
// error (the first not-yet-emulated site, a deadlock, a hazard, ...) or the mismatches and exits
// non-zero otherwise.
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "gemm/sm90/launch.h"

namespace {

float fp16_bits_to_float(uint16_t b) {
  __half h;
  std::memcpy(&h, &b, 2);
  return __half2float(h);
}
uint16_t float_to_fp16_bits(float f) {
  __half h = __float2half_rn(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: sm90_run M N K [seed] [sm_count] [flags: z b]\n");
    return 2;
  }
  const int64_t M = std::atoll(argv[1]), N = std::atoll(argv[2]), K = std::atoll(argv[3]);
  const unsigned seed = argc > 4 ? static_cast<unsigned>(std::atoi(argv[4])) : 0u;
  const int sms = argc > 5 ? std::atoi(argv[5]) : 1;
  const std::string flags = argc > 6 ? argv[6] : "";
  const bool zero = flags.find('z') != std::string::npos, with_bias = flags.find('b') != std::string::npos;
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> code(-8, 7);
  std::uniform_real_distribution<float> scale(0.001f, 0.05f), zf(-8.f, 8.f), bf(-1.f, 1.f);

  // operands: TMA needs 16-byte aligned bases, so every buffer is 64-byte aligned
  auto alloc = [](size_t bytes) {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    std::memset(p, 0xA5, (bytes + 63) / 64 * 64 + 64);
    return p;
  };
  auto* x = static_cast<int8_t*>(alloc(M * K));
  auto* w = static_cast<uint8_t*>(alloc(N * K / 2));
  std::vector<int8_t> wq(N * K);
  for (int64_t i = 0; i < M * K; ++i) x[i] = static_cast<int8_t>(code(rng));
  for (int64_t i = 0; i < N * K; ++i) wq[i] = static_cast<int8_t>(code(rng));
  for (int64_t i = 0; i < N * K / 2; ++i)
    w[i] = static_cast<uint8_t>((wq[2 * i] & 0xF) | ((wq[2 * i + 1] & 0xF) << 4));
  auto* x_scale = static_cast<float*>(alloc(M * 4));
  auto* x_zero = static_cast<float*>(alloc(M * 4));
  auto* w_scale = static_cast<float*>(alloc(N * 4));
  auto* w_sum = static_cast<float*>(alloc(N * 4));
  auto* bias = static_cast<float*>(alloc(N * 4));
  for (int64_t m = 0; m < M; ++m) x_scale[m] = scale(rng), x_zero[m] = std::nearbyint(zf(rng));
  for (int64_t n = 0; n < N; ++n) {
    w_scale[n] = scale(rng);
    bias[n] = bf(rng);
    long s = 0;
    for (int64_t k = 0; k < K; ++k) s += wq[n * K + k];
    w_sum[n] = static_cast<float>(s);
  }
  auto* out = static_cast<uint16_t*>(alloc(M * N * 2));
  std::memset(out, 0xFF, M * N * 2);  // NaN: an element the kernel does not write fails

  ostquant::CutlassGemmProblem p;
  p.x = x;
  p.w = w;
  p.M = M, p.N = N, p.K = K;
  p.epi.x_scale = x_scale;
  p.epi.x_zero = zero ? x_zero : nullptr;
  p.epi.w_scale = w_scale;
  p.epi.w_sum = zero ? w_sum : nullptr;
  p.epi.bias = with_bias ? bias : nullptr;
  p.epi.bias_type = ostquant::FloatType::kFloat32;
  p.epi.out = out;
  p.epi.out_type = ostquant::FloatType::kFloat16;
  p.sm_count = sms;
  p.tile = 128;
  ostq_emu::set_sm_count(sms);

  size_t ws_bytes = 0;
  cudaError_t e = ostquant::sm90::w4a4_t128_f16(p, nullptr, &ws_bytes, nullptr);
  if (e != cudaSuccess) {
    std::printf("sm90 run: the workspace query failed: %s\n", cudaGetErrorString(e));
    return 1;
  }
  void* ws = ws_bytes ? alloc(ws_bytes) : nullptr;
  std::printf("sm90 run: M=%lld N=%lld K=%lld sm_count=%d flags='%s' workspace=%zu bytes\n",
              (long long)M, (long long)N, (long long)K, sms, flags.c_str(), ws_bytes);
  std::fflush(stdout);
  try {
    e = ostquant::sm90::w4a4_t128_f16(p, ws, nullptr, nullptr);
  } catch (const std::exception& ex) {
    std::printf("sm90 run: the emulator stopped the kernel:\n%s\n", ex.what());
    return 1;
  }
  if (e != cudaSuccess) {
    std::printf("sm90 run: the launch returned %s\n", cudaGetErrorString(e));
    return 1;
  }

  // the reference (ostquant.reference.int4_gemm's order)
  long bad = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int32_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += int32_t(x[m * K + k]) * int32_t(wq[n * K + k]);
      float a = static_cast<float>(acc);
      if (zero) a = a - x_zero[m] * w_sum[n];
      float y = (a * x_scale[m]) * w_scale[n];
      if (with_bias) y = y + bias[n];
      const uint16_t want = float_to_fp16_bits(y), got = out[m * N + n];
      const bool same = want == got || (fp16_bits_to_float(want) == fp16_bits_to_float(got));
      if (!same && bad++ < 8) {
        std::printf("  out[%lld, %lld] = %g (0x%04x), want %g (0x%04x)\n", (long long)m, (long long)n,
                    fp16_bits_to_float(got), got, fp16_bits_to_float(want), want);
      }
    }
  if (bad) {
    std::printf("sm90 run: %ld of %lld elements differ\n", bad, (long long)(M * N));
    return 1;
  }
  std::printf("sm90 run: OK, %lld elements bit-exact\n", (long long)(M * N));
  return 0;
}
