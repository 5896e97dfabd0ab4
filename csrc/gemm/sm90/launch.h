// ATen-free entry points of the CUTLASS sm_90a int4 GEMMs (kernel.cuh, one instantiation per
// sm90/*.cu file), used by gemm_ops.cpp for M > 16 on compute capability 9.0.
//
// Built only when the extension is compiled with CUTLASS and for sm_90a
// (OSTQUANT_SM90_GEMM=1, set by setup.py / CMakeLists.txt); otherwise every entry point returns
// cudaErrorNotSupported and sm90_gemm_built() is false, and the ops keep the portable path.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/dispatch.h"
#include "gemm/launch.h"

#ifndef OSTQUANT_SM90_GEMM
#define OSTQUANT_SM90_GEMM 0
#endif

namespace ostquant {

// One GEMM call (gemm/launch.h): out[M, N] = epilogue(x[M, K] · w[N, K]ᵀ), with
//   x: W4A4: int8 [M, K] (int4 codes widened, see launch_unpack_int4); W4A16: fp16/bf16 [M, K].
using Sm90GemmProblem = CutlassGemmProblem;

// True when the CUTLASS kernels were compiled in (OSTQUANT_SM90_GEMM).
bool sm90_gemm_built();

// Shape/alignment conditions of the CUTLASS path beyond the op's own checks (N % 8 == 0 for the
// TMA store, every dimension < 2^31); false -> use the portable path.
bool sm90_gemm_supported(int64_t M, int64_t N, int64_t K);

// The largest M the 64-token tile takes by default.
constexpr int64_t kSm90SmallTileMaxM = 64;

// Tokens per CTA tile (64 or 128) the Hopper kernels use for M rows: 64 for M <= 64, else 128;
// the environment variable OSTQUANT_GEMM_SM90_TILE=64|128 (read on every call; other values are
// ignored) forces one, to compare the two on a GPU (bench/gemm.py). The ops choose once per
// call and pass it in CutlassGemmProblem::tile, so the workspace query and the launch agree.
int sm90_gemm_tile(int64_t M);

// Tiles by M bucket (128 output channels x TileN tokens, TileN = sm90_gemm_tile(M)): 64 tokens
// for 16 < M <= 64 (batched decode, short prompts: half the wasted wgmma work of a 128-token
// tile on 33..64 tokens, twice the stages in the same shared memory), 128 above. Each
// instantiation costs about two minutes of CPU to compile and CI compiles them all on two
// cores, so the set is kept to these eight (fp16/bf16 models, two tiles, W4A4 and W4A16).
//
// With workspace_bytes != nullptr: checks that the kernel can run the problem and stores the
// workspace it needs (stream-K partials), launching nothing. Otherwise launches on `stream`
// with `workspace` (that many bytes, may be null when 0). Returns cudaErrorNotSupported for
// combinations that were not instantiated (float32 output or activations) or problems the
// kernel cannot run; the caller then takes the portable path.
cudaError_t sm90_w4a4_gemm(FloatType out_type, const Sm90GemmProblem& p, void* workspace,
                           size_t* workspace_bytes, cudaStream_t stream);
cudaError_t sm90_w4a16_gemm(FloatType x_type, const Sm90GemmProblem& p, void* workspace,
                            size_t* workspace_bytes, cudaStream_t stream);

namespace sm90 {
// The instantiations (sm90/w4a*_t{64,128}_*.cu): W4A4 out type / W4A16 activation type, tile.
using Sm90GemmFn = cudaError_t (*)(const Sm90GemmProblem&, void*, size_t*, cudaStream_t);
cudaError_t w4a4_t128_f16(const Sm90GemmProblem&, void*, size_t*, cudaStream_t);
cudaError_t w4a4_t128_bf16(const Sm90GemmProblem&, void*, size_t*, cudaStream_t);
cudaError_t w4a16_t128_f16(const Sm90GemmProblem&, void*, size_t*, cudaStream_t);
cudaError_t w4a16_t128_bf16(const Sm90GemmProblem&, void*, size_t*, cudaStream_t);
cudaError_t w4a4_t64_f16(const Sm90GemmProblem&, void*, size_t*, cudaStream_t);
cudaError_t w4a4_t64_bf16(const Sm90GemmProblem&, void*, size_t*, cudaStream_t);
cudaError_t w4a16_t64_f16(const Sm90GemmProblem&, void*, size_t*, cudaStream_t);
cudaError_t w4a16_t64_bf16(const Sm90GemmProblem&, void*, size_t*, cudaStream_t);
}  // namespace sm90

}  // namespace ostquant

// The body of an instantiation file without the CUTLASS kernels: reports "not supported".
#define OSTQ_SM90_STUB(NAME)                                                             \
  namespace ostquant {                                                                   \
  namespace sm90 {                                                                       \
  cudaError_t NAME(const Sm90GemmProblem&, void*, size_t*, cudaStream_t) {              \
    return cudaErrorNotSupported;                                                        \
  }                                                                                      \
  }                                                                                      \
  }
