// Host entry points of the quantization / packing CUDA ops (registered in csrc/bindings.cpp).
// Signatures follow the schemas in ostquant/ops/library.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace ostquant {

at::Tensor pack_int4_cuda(const at::Tensor& q);
at::Tensor unpack_int4_cuda(const at::Tensor& packed);

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x,
                                                                       int64_t bits, bool sym,
                                                                       double clip_ratio);

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_kv_cuda(const at::Tensor& x);

}  // namespace ostquant
