// Host entry points of the int4 GEMM CUDA ops (registered in csrc/bindings.cpp). Signatures
// follow the schemas in ostquant/ops/library.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <optional>

namespace ostquant {

at::Tensor int4_gemm_cuda(const at::Tensor& x_packed, const at::Tensor& x_scale,
                          const std::optional<at::Tensor>& x_zero, const at::Tensor& w_packed,
                          const at::Tensor& w_scale, const std::optional<at::Tensor>& w_sum,
                          const std::optional<at::Tensor>& bias, at::ScalarType out_dtype);

at::Tensor w4a16_gemm_cuda(const at::Tensor& x, const at::Tensor& w_packed,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias);

}  // namespace ostquant
