// Host entry points of the quantization / packing CUDA ops (registered in csrc/bindings.cpp).
// Signatures follow the schemas in ostquant/ops/library.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace ostquant {

at::Tensor pack_int4_cuda(const at::Tensor& q);
at::Tensor unpack_int4_cuda(const at::Tensor& packed);

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x,
                                                                       int64_t bits, bool sym,
                                                                       double clip_ratio);

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_kv_cuda(const at::Tensor& x);

// Per-token quantization with packed int4 codes, plain or fused (fused_quant_ops.cpp); the
// fused ones also write unpacked int8 codes (packed = false).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token_packed_cuda(
    const at::Tensor& x, int64_t bits, bool sym, double clip_ratio);
std::tuple<at::Tensor, at::Tensor, at::Tensor> hadamard_quantize_per_token_cuda(
    const at::Tensor& x, double scale, int64_t bits, bool sym, double clip_ratio, bool packed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> rmsnorm_quantize_per_token_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps, int64_t bits,
    bool sym, double clip_ratio, bool packed);

}  // namespace ostquant
