// Host entry point of the Hadamard transform CUDA op (registered in csrc/bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace ostquant {

// hadamard_transform(Tensor x, float scale=1.0) -> Tensor (ostquant/ops/library.py)
at::Tensor hadamard_transform_cuda(const at::Tensor& x, double scale);

}  // namespace ostquant
