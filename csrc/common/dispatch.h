// dtype dispatch for the floating-point inputs ostquant kernels accept.
//
// Kernels (.cu) never include ATen: the host wrappers (.cpp) map the tensor's at::ScalarType to
// ostquant::FloatType (to_float_type in common/torch_utils.h) and the launcher dispatches with
//
//   OSTQ_DISPATCH_FLOAT(type, [&] { launch<scalar_t>(...); });
//
// which binds `scalar_t` to the CUDA device type (__half, __nv_bfloat16, float). Keeping ATen out
// of the .cu files keeps nvcc fast (ATen headers dominate compile time).
#pragma once

namespace ostquant {

enum class FloatType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

}  // namespace ostquant

#if defined(__CUDACC__) || defined(OSTQ_SIMT_EMU)  // OSTQ_SIMT_EMU: tests/simt
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define OSTQ_DISPATCH_CASE(ENUM, TYPE, ...) \
  case ENUM: {                              \
    using scalar_t = TYPE;                  \
    return __VA_ARGS__();                   \
  }

// Evaluates to the lambda's result; an unknown type returns cudaErrorInvalidValue.
#define OSTQ_DISPATCH_FLOAT(TYPE, ...)                                               \
  [&] {                                                                              \
    switch (TYPE) {                                                                  \
      OSTQ_DISPATCH_CASE(::ostquant::FloatType::kFloat16, __half, __VA_ARGS__)       \
      OSTQ_DISPATCH_CASE(::ostquant::FloatType::kBFloat16, __nv_bfloat16, __VA_ARGS__) \
      OSTQ_DISPATCH_CASE(::ostquant::FloatType::kFloat32, float, __VA_ARGS__)        \
    }                                                                                \
    return cudaErrorInvalidValue;                                                    \
  }()
#endif
