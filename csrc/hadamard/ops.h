// Host entry point of the Hadamard transform CUDA op (registered in csrc/bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace ostquant {

// hadamard_transform(Tensor x, float scale=1.0) -> Tensor (ostquant/ops/library.py)
at::Tensor hadamard_transform_cuda(const at::Tensor& x, double scale);

// n = K * m with m a power of two and K = 1 or a base order, the smallest K (as
// ostquant.transforms.hadamard_matrices.hadamard_factor); false if there is none.
bool hadamard_factor(int64_t n, int* K, int64_t* m);
// The list of supported sizes, worded as hadamard_matrices' error message.
std::string hadamard_supported_sizes_message();

}  // namespace ostquant
