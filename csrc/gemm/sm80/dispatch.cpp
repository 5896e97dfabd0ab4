// Selection among the CUTLASS 2.x int4 IMMA instantiations (sm80/*.cu). Plain C++: no CUTLASS.
#include <cstdint>
#include <limits>

#include "gemm/sm80/launch.h"

namespace ostquant {

bool sm80_gemm_built() { return OSTQUANT_SM80_GEMM != 0; }

bool sm80_gemm_supported(int64_t M, int64_t N, int64_t K) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  return M > 0 && N > 0 && K > 0 && N % 8 == 0 && M <= kMax && N <= kMax && K <= kMax;
}

cudaError_t sm80_w4a4_gemm(FloatType out_type, const CutlassGemmProblem& p, void* workspace,
                           size_t* workspace_bytes, cudaStream_t stream) {
  sm80::Sm80GemmFn fn = nullptr;
  switch (out_type) {
    case FloatType::kFloat16: fn = sm80::w4a4_imma_f16; break;
    case FloatType::kBFloat16: fn = sm80::w4a4_imma_bf16; break;
    case FloatType::kFloat32: break;  // not instantiated: portable path
  }
  if (fn == nullptr) return cudaErrorNotSupported;
  return fn(p, workspace, workspace_bytes, stream);
}

}  // namespace ostquant
