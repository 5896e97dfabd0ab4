// Host entry points of the int4 GEMM CUDA ops (registered in csrc/bindings.cpp). Signatures
// follow the schemas in ostquant/ops/library.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>

namespace ostquant {

at::Tensor int4_gemm_cuda(const at::Tensor& x_packed, const at::Tensor& x_scale,
                          const std::optional<at::Tensor>& x_zero, const at::Tensor& w_packed,
                          const at::Tensor& w_scale, const std::optional<at::Tensor>& w_sum,
                          const std::optional<at::Tensor>& bias, at::ScalarType out_dtype);

// True when int4_gemm_cuda runs this problem on the Hopper kernel, which reads the activations
// as int8 codes [M, K] (a caller that can write them so saves the widening pass); false when
// the path it takes reads packed codes. device: a CUDA device index; fp32_out: out_dtype is
// float32.
bool int4_gemm_takes_codes(int device, int64_t M, int64_t N, int64_t K, bool fp32_out);

at::Tensor w4a16_gemm_cuda(const at::Tensor& x, const at::Tensor& w_packed,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias);

}  // namespace ostquant
