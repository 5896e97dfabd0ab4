// Host-side glue between ATen tensors and the ATen-free kernel launchers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "common/dispatch.h"

namespace ostquant {

inline FloatType to_float_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return FloatType::kFloat16;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kFloat: return FloatType::kFloat32;
    default: TORCH_CHECK(false, "ostquant: internal error: no kernel for dtype ", t);
  }
}

}  // namespace ostquant

// Raise a RuntimeError naming the op if a launcher reported a CUDA error.
#define OSTQ_CHECK_LAUNCH(op, expr)                                                      \
  do {                                                                                   \
    const cudaError_t ostq_err_ = (expr);                                                \
    TORCH_CHECK(ostq_err_ == cudaSuccess, "ostquant.", op, ": CUDA kernel launch failed: ", \
                cudaGetErrorString(ostq_err_));                                          \
  } while (0)
