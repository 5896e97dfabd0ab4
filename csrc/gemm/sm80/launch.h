// ATen-free entry points of the CUTLASS 2.x int4 IMMA GEMM (kernel.cuh, one instantiation per
// sm80/*.cu file), used by gemm_ops.cpp for W4A4 at M > 16 on Ampere/Ada (sm_80/86/89), where
// int4 tensor cores run at twice the int8 rate.
//
// Built when the extension is compiled with CUTLASS for at least one arch >= 8.0
// (OSTQUANT_SM80_GEMM=1, set by setup.py / CMakeLists.txt; sm_90a counts, so that a Hopper
// machine can test the path: int4 mma.sync runs there in emulation, correct but slow);
// otherwise every entry point returns cudaErrorNotSupported and sm80_gemm_built() is false.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/dispatch.h"
#include "gemm/launch.h"

#ifndef OSTQUANT_SM80_GEMM
#define OSTQUANT_SM80_GEMM 0
#endif

namespace ostquant {

// True when the CUTLASS 2.x int4 kernels were compiled in (OSTQUANT_SM80_GEMM).
bool sm80_gemm_built();

// Shape conditions of the path beyond the op's own checks: N % 8 == 0 (8 outputs per vector
// store, per-channel vectors read 4 floats at a time), K > 0, every dimension < 2^31.
bool sm80_gemm_supported(int64_t M, int64_t N, int64_t K);

// W4A4: p.x = the packed int4 activations [M, K/2] as they are (no widening pass: the
// canonical packing is cutlass::int4b_t's RowMajor layout), p.w = packed int4 weights [N, K/2]
// (= ColumnMajor [K, N]). Exact int32 sums, the fused epilogue of gemm/cutlass_common.cuh,
// fp16/bf16 output (float32: cudaErrorNotSupported, the caller takes the portable path).
// With workspace_bytes != nullptr: checks the problem and stores the workspace it needs (0),
// launching nothing; otherwise launches on `stream`.
// One tile (128 tokens x 256 channels x 128 k, CUTLASS's default for int4 on sm_80, 3 stages)
// and data-parallel tiles: two instantiations keep the CI build short.
cudaError_t sm80_w4a4_gemm(FloatType out_type, const CutlassGemmProblem& p, void* workspace,
                           size_t* workspace_bytes, cudaStream_t stream);

namespace sm80 {
using Sm80GemmFn = cudaError_t (*)(const CutlassGemmProblem&, void*, size_t*, cudaStream_t);
cudaError_t w4a4_imma_f16(const CutlassGemmProblem&, void*, size_t*, cudaStream_t);
cudaError_t w4a4_imma_bf16(const CutlassGemmProblem&, void*, size_t*, cudaStream_t);
}  // namespace sm80

}  // namespace ostquant

// The body of an instantiation file without the CUTLASS kernels: reports "not supported".
#define OSTQ_SM80_STUB(NAME)                                                             \
  namespace ostquant {                                                                   \
  namespace sm80 {                                                                       \
  cudaError_t NAME(const CutlassGemmProblem&, void*, size_t*, cudaStream_t) {           \
    return cudaErrorNotSupported;                                                        \
  }                                                                                      \
  }                                                                                      \
  }
