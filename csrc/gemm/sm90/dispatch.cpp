// Selection among the CUTLASS sm_90a instantiations (sm90/*.cu). Plain C++: no CUTLASS here.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "gemm/sm90/launch.h"

namespace ostquant {

bool sm90_gemm_built() { return OSTQUANT_SM90_GEMM != 0; }

bool sm90_gemm_supported(int64_t M, int64_t N, int64_t K) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  // N % 8: the TMA store writes rows of N outputs (16-byte multiple for 16-bit outputs) and the
  // per-channel vectors are read 4 floats at a time. K > 0: a zero-length reduction stays on
  // the portable path.
  return M > 0 && N > 0 && K > 0 && N % 8 == 0 && M <= kMax && N <= kMax && K <= kMax;
}

int sm90_gemm_tile(int64_t M) {
  const char* e = std::getenv("OSTQUANT_GEMM_SM90_TILE");
  if (e != nullptr && std::strcmp(e, "64") == 0) return 64;
  if (e != nullptr && std::strcmp(e, "128") == 0) return 128;
  return M <= kSm90SmallTileMaxM ? 64 : 128;
}

cudaError_t sm90_w4a4_gemm(FloatType out_type, const Sm90GemmProblem& p, void* workspace,
                           size_t* workspace_bytes, cudaStream_t stream) {
  const bool t64 = (p.tile != 0 ? p.tile : sm90_gemm_tile(p.M)) == 64;
  sm90::Sm90GemmFn fn = nullptr;
  switch (out_type) {
    case FloatType::kFloat16: fn = t64 ? sm90::w4a4_t64_f16 : sm90::w4a4_t128_f16; break;
    case FloatType::kBFloat16: fn = t64 ? sm90::w4a4_t64_bf16 : sm90::w4a4_t128_bf16; break;
    case FloatType::kFloat32: break;  // not instantiated: portable path
  }
  if (fn == nullptr) return cudaErrorNotSupported;
  return fn(p, workspace, workspace_bytes, stream);
}

cudaError_t sm90_w4a16_gemm(FloatType x_type, const Sm90GemmProblem& p, void* workspace,
                            size_t* workspace_bytes, cudaStream_t stream) {
  const bool t64 = (p.tile != 0 ? p.tile : sm90_gemm_tile(p.M)) == 64;
  sm90::Sm90GemmFn fn = nullptr;
  switch (x_type) {
    case FloatType::kFloat16: fn = t64 ? sm90::w4a16_t64_f16 : sm90::w4a16_t128_f16; break;
    case FloatType::kBFloat16: fn = t64 ? sm90::w4a16_t64_bf16 : sm90::w4a16_t128_bf16; break;
    case FloatType::kFloat32: break;  // no fp32 tensor-core path: portable path
  }
  if (fn == nullptr) return cudaErrorNotSupported;
  return fn(p, workspace, workspace_bytes, stream);
}

}  // namespace ostquant
