// ATen-free launchers of the quantization / packing kernels (defined in the .cu files of this
// folder, called by quant_ops.cpp). Pointers are device pointers of contiguous tensors; every
// launcher enqueues on `stream` and returns cudaGetLastError() (cudaSuccess if there was nothing
// to do).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dispatch.h"

namespace ostquant {

// int8 [n_out * 2] -> uint8 [n_out]
cudaError_t launch_pack_int4(const int8_t* in, uint8_t* out, int64_t n_out, cudaStream_t stream);
// uint8 [n_in] -> int8 [n_in * 2]
cudaError_t launch_unpack_int4(const uint8_t* in, int8_t* out, int64_t n_in, cudaStream_t stream);

struct RowQuantArgs {
  int64_t rows = 0;
  int64_t K = 0;     // elements per row
  int bits = 4;      // quantize_per_token only
  bool sym = false;  // quantize_per_token only
  float clip = 1.f;  // quantize_per_token only, already rounded to float32
  void* q = nullptr;      // int8 [rows, K] (per token) or uint8 [rows, K/2] (KV)
  void* scale = nullptr;  // float32 [rows] (per token) or float16 [rows] (KV)
  void* zero = nullptr;   // same as scale
};

// quantize_per_token: x [rows, K] of `type`.
cudaError_t launch_quantize_per_token(FloatType type, const void* x, const RowQuantArgs& args,
                                      cudaStream_t stream);
// quantize_kv: x [rows, K] of `type`, K even, x aligned to 2 elements.
cudaError_t launch_quantize_kv(FloatType type, const void* x, const RowQuantArgs& args,
                               cudaStream_t stream);

}  // namespace ostquant
