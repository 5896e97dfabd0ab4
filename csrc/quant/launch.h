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
// quantize_per_token with packed codes (uint8 [rows, K/2], bits <= 4) and float32 scale/zero:
// x [rows, K] of `type`, K even, x aligned to 2 elements.
cudaError_t launch_quantize_per_token_packed(FloatType type, const void* x,
                                             const RowQuantArgs& args, cudaStream_t stream);

// ---- fused per-token quantization (hadamard_quant.cu, rmsnorm_quant.cu): packed int4 codes
// (packed = true) or the int4 codes one per int8 (packed = false: what the Hopper GEMM reads)
struct FusedQuantArgs {
  int64_t rows = 0;
  int64_t K = 0;          // elements per row (even)
  int bits = 4;           // 2..4
  bool sym = false;
  float clip = 1.f;       // clip ratio, rounded to float32
  float eps = 0.f;        // rmsnorm: epsilon, rounded to float32
  float scale_h = 1.f;    // hadamard: transform scale, rounded to float32
  bool packed = true;     // codes packed two per byte, else one int8 per code
  void* q = nullptr;      // packed: uint8 [rows, K/2]; else int8 [rows, K]
  float* scale = nullptr; // float32 [rows]
  float* zero = nullptr;  // float32 [rows]
};

// rmsnorm_quantize_per_token: x [rows, K] of `type`, weight [K] of `type` or nullptr; K even,
// x and weight aligned to 2 elements (16 bytes for the vectorized path).
cudaError_t launch_rmsnorm_quantize(FloatType type, const void* x, const void* weight,
                                    const FusedQuantArgs& args, cudaStream_t stream);

// hadamard_quantize_per_token in one kernel: x [rows, K*m] of `type` (args.K = Kh*m), 16-byte
// aligned when m >= 8. Kh is 1 or a base order of hadamard_tables.h, m a power of two.
// hadamard_quantize_fits() says whether one CTA can hold a row on `device`; when it cannot,
// the launcher returns cudaErrorInvalidValue and the caller must take the unfused path.
bool hadamard_quantize_fits(FloatType type, int Kh, int64_t m, int device);
cudaError_t launch_hadamard_quantize(FloatType type, const void* x, int Kh, int64_t m,
                                     const FusedQuantArgs& args, cudaStream_t stream);

}  // namespace ostquant
