// ATen-free launcher of the Hadamard transform kernel (hadamard.cu), called by hadamard_ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dispatch.h"

namespace ostquant {

// out[r, :] = scale * kron(H_K, H_m) @ x[r, :] for r < rows; x, out contiguous [rows, K*m] of
// `type`, 16-byte aligned when m >= 8. K is 1 or a base order in hadamard_tables.h, m a power
// of two, and K*m*4 bytes must fit in the device's shared memory (hadamard_max_row_elems).
// Returns cudaErrorInvalidValue for an unsupported (K, m), else cudaGetLastError().
cudaError_t launch_hadamard(FloatType type, const void* x, void* out, int64_t rows, int K,
                            int64_t m, float scale, cudaStream_t stream);

// Largest row length K*m (elements) one CTA can hold in shared memory on `device`.
int64_t hadamard_max_row_elems(int device);

}  // namespace ostquant
