// quantize_kv kernels: asymmetric int4 per (token, head) over head_dim, packed codes and
// float16 scale/zero, bit-identical to reference.quantize_kv (see common/quant_math.cuh).
#include "common/dispatch.h"
#include "quant/launch.h"
#include "quant/row_quant.cuh"

namespace ostquant {

cudaError_t launch_quantize_kv(FloatType type, const void* x, const RowQuantArgs& args,
                               cudaStream_t stream) {
  return OSTQ_DISPATCH_FLOAT(type, [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);  // 16-byte loads
    const auto* xp = static_cast<const scalar_t*>(x);
    if (args.K % 2 != 0 || !is_aligned(xp, 2 * sizeof(scalar_t))) return cudaErrorInvalidValue;
    if (args.K % kVec == 0 && is_aligned(xp, 16)) {
      return launch_row_quant<RowQuantMode::kKV, scalar_t, kVec>(xp, args, stream);
    }
    return launch_row_quant<RowQuantMode::kKV, scalar_t, 2>(xp, args, stream);
  });
}

}  // namespace ostquant
