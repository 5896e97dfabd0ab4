// CUTLASS sm_90a int4 GEMM instantiation (see kernel.cuh):
//   W4A16, bfloat16 activations and output, 128 channels x 64 tokens (16 < M <= 64).
// One kernel per file so that the build compiles them in parallel.
#include "gemm/sm90/launch.h"
#if OSTQUANT_SM90_GEMM
#include "gemm/sm90/kernel.cuh"
OSTQ_SM90_INSTANCE(w4a16_t64_bf16, false, cutlass::bfloat16_t, cutlass::bfloat16_t, 64)
#else
OSTQ_SM90_STUB(w4a16_t64_bf16)
#endif
