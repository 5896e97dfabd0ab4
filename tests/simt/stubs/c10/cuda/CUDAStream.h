// SIMT emulator stand-in for c10/cuda/CUDAStream.h: one (null) stream.
#pragma once
#include <cuda_runtime_api.h>

namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace c10::cuda
