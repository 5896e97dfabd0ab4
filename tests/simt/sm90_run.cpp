// Runs one Hopper GEMM instantiation (csrc/gemm/sm90/OSTQ_SM90_FN.cu, compiled by sm90_spike.py as
// host C++; -DOSTQ_SM90_FN=w4a4_t128_f16 etc.) on the SIMT emulator and compares it with a
// reference computed here the way ostquant.reference.int4_gemm does: W4A4 bit-exact (exact int32
// accumulation, the epilogue's explicitly rounded float ops in the same order, round-to-nearest
// to the output type); W4A16 bit-exact in the emulated wgmma's fp32 summation order when no tile
// is split, else to a tolerance (on a GPU the tensor core's order is unspecified).
//
//   sm90_run M N K [seed] [sm_count] [flags]     flags: z (x_zero + w_sum), b (bias)
//
// Prints "sm90 run: OK ..." and exits 0 when every output element matches; prints the emulator's
// error (the first not-yet-emulated site, a deadlock, a hazard, ...) or the mismatches and exits
// non-zero otherwise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
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

#define OSTQ_RUN_STR2(x) #x
#define OSTQ_RUN_STR(x) OSTQ_RUN_STR2(x)
const std::string kFn = OSTQ_RUN_STR(OSTQ_SM90_FN);
const bool kW4A4 = kFn.rfind("w4a4_", 0) == 0;
const bool kBf16 = kFn.size() > 5 && kFn.compare(kFn.size() - 5, 5, "_bf16") == 0;
const int kTile = kFn.find("_t64_") != std::string::npos ? 64 : 128;

float bits_to_float(uint16_t b) {
  if (kBf16) {
    __nv_bfloat16 h;
    std::memcpy(&h, &b, 2);
    return __bfloat162float(h);
  }
  __half h;
  std::memcpy(&h, &b, 2);
  return __half2float(h);
}
uint16_t float_to_bits(float f) {
  uint16_t b;
  if (kBf16) {
    __nv_bfloat16 h = __float2bfloat16_rn(f);
    std::memcpy(&b, &h, 2);
  } else {
    __half h = __float2half_rn(f);
    std::memcpy(&b, &h, 2);
  }
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
  auto* x = static_cast<int8_t*>(alloc(M * K));             // W4A4: int4 codes as int8
  auto* xh = static_cast<uint16_t*>(alloc(M * K * 2));      // W4A16: fp16 / bf16 activations
  std::vector<float> xf(M * K);
  auto* w = static_cast<uint8_t*>(alloc(N * K / 2));
  std::vector<int8_t> wq(N * K);
  std::normal_distribution<float> act(0.f, 1.f);
  for (int64_t i = 0; i < M * K; ++i) {
    x[i] = static_cast<int8_t>(code(rng));
    xh[i] = float_to_bits(act(rng));
    xf[i] = kW4A4 ? static_cast<float>(x[i]) : bits_to_float(xh[i]);
  }
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
  p.x = kW4A4 ? static_cast<const void*>(x) : static_cast<const void*>(xh);
  p.w = w;
  p.M = M, p.N = N, p.K = K;
  p.epi.x_scale = kW4A4 ? x_scale : nullptr;
  p.epi.x_zero = zero && kW4A4 ? x_zero : nullptr;
  p.epi.w_scale = w_scale;
  p.epi.w_sum = zero && kW4A4 ? w_sum : nullptr;
  p.epi.bias = with_bias ? bias : nullptr;
  p.epi.bias_type = ostquant::FloatType::kFloat32;
  p.epi.out = out;
  p.epi.out_type = kBf16 ? ostquant::FloatType::kBFloat16 : ostquant::FloatType::kFloat16;
  p.sm_count = sms;
  p.tile = kTile;
  ostq_emu::set_sm_count(sms);

  size_t ws_bytes = 0;
  cudaError_t e = ostquant::sm90::OSTQ_SM90_FN(p, nullptr, &ws_bytes, nullptr);
  if (e != cudaSuccess) {
    std::printf("sm90 run: the workspace query failed: %s\n", cudaGetErrorString(e));
    return 1;
  }
  void* ws = ws_bytes ? alloc(ws_bytes) : nullptr;
  std::printf("sm90 run: %s M=%lld N=%lld K=%lld sm_count=%d flags='%s' workspace=%zu bytes\n",
              kFn.c_str(), (long long)M, (long long)N, (long long)K, sms, flags.c_str(), ws_bytes);
  std::fflush(stdout);
  try {
    e = ostquant::sm90::OSTQ_SM90_FN(p, ws, nullptr, nullptr);
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
  double worst = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float y;
      double tol = 0;
      if (kW4A4) {
        int32_t acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += int32_t(x[m * K + k]) * int32_t(wq[n * K + k]);
        float a = static_cast<float>(acc);
        if (zero) a = a - x_zero[m] * w_sum[n];
        y = (a * x_scale[m]) * w_scale[n];
        if (with_bias) y = y + bias[n];
      } else {
        // y = acc * sw + b with acc in fp32 in the emulated wgmma's order (sm90_wgmma.h: per
        // k16 instruction the exact products summed in k order in fp32, then added to D), which
        // holds when no tile is split (no stream-K workspace): bit-exact then; otherwise (and on
        // a GPU, whose order is unspecified) a tolerance
        float acc = 0.f;
        double mag = 0;
        for (int64_t k0 = 0; k0 < K; k0 += 16) {
          float s = 0.f;
          for (int64_t k = k0; k < k0 + 16 && k < K; ++k) {
            s += xf[m * K + k] * static_cast<float>(wq[n * K + k]);
            mag += std::fabs(double(xf[m * K + k]) * wq[n * K + k]);
          }
          acc = k0 == 0 ? s : acc + s;
        }
        y = acc * w_scale[n];
        if (with_bias) y = y + bias[n];
        if (ws_bytes != 0) tol = mag * w_scale[n] * 1e-6 + std::fabs(y) * (kBf16 ? 1.0 / 128 : 1.0 / 1024);
      }
      const uint16_t want = float_to_bits(y), got = out[m * N + n];
      const double diff = std::fabs(double(bits_to_float(got)) - double(bits_to_float(want)));
      worst = std::max(worst, diff);
      const bool same = want == got || diff <= tol;
      if (!same && bad++ < 8) {
        std::printf("  out[%lld, %lld] = %g (0x%04x), want %g (0x%04x)\n", (long long)m, (long long)n,
                    bits_to_float(got), got, bits_to_float(want), want);
      }
    }
  if (bad) {
    std::printf("sm90 run: %ld of %lld elements differ\n", bad, (long long)(M * N));
    return 1;
  }
  if (kW4A4 || ws_bytes == 0) {
    std::printf("sm90 run: OK, %lld elements bit-exact\n", (long long)(M * N));
  } else {
    std::printf("sm90 run: OK, %lld elements within tolerance (largest difference %g)\n", (long long)(M * N), worst);
  }
  return 0;
}
