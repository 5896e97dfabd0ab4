// quantize_per_token kernels: per-row int8 codes (or packed int4 codes, the unfused fallback of
// hadamard_quantize_per_token) + float32 scale/zero, bit-identical to
// reference.quantize_per_token (see common/quant_math.cuh and quant/row_quant.cuh).
#include "common/dispatch.h"
#include "quant/launch.h"
#include "quant/row_quant.cuh"

namespace ostquant {

cudaError_t launch_quantize_per_token(FloatType type, const void* x, const RowQuantArgs& args,
                                      cudaStream_t stream) {
  return OSTQ_DISPATCH_FLOAT(type, [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);  // 16-byte loads
    const auto* xp = static_cast<const scalar_t*>(x);
    if (args.K % kVec == 0 && is_aligned(xp, 16)) {
      return launch_row_quant<RowQuantMode::kPerToken, scalar_t, kVec>(xp, args, stream);
    }
    return launch_row_quant<RowQuantMode::kPerToken, scalar_t, 1>(xp, args, stream);
  });
}

cudaError_t launch_quantize_per_token_packed(FloatType type, const void* x,
                                             const RowQuantArgs& args, cudaStream_t stream) {
  if (args.bits < 2 || args.bits > 4) return cudaErrorInvalidValue;
  return OSTQ_DISPATCH_FLOAT(type, [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);  // 16-byte loads
    const auto* xp = static_cast<const scalar_t*>(x);
    if (args.K % 2 != 0 || !is_aligned(xp, 2 * sizeof(scalar_t))) return cudaErrorInvalidValue;
    if (args.K % kVec == 0 && is_aligned(xp, 16)) {
      return launch_row_quant<RowQuantMode::kPerTokenPacked, scalar_t, kVec>(xp, args, stream);
    }
    return launch_row_quant<RowQuantMode::kPerTokenPacked, scalar_t, 2>(xp, args, stream);
  });
}

}  // namespace ostquant
