// CUTLASS sm_90a int4 GEMM instantiation (see kernel.cuh):
//   W4A4 (int8 x int4 wgmma, int32 sums), float16 output, 128 channels x 64 tokens (16 < M <= 64).
// One kernel per file so that the build compiles them in parallel.
#include "gemm/sm90/launch.h"
#if OSTQUANT_SM90_GEMM
#include "gemm/sm90/kernel.cuh"
OSTQ_SM90_INSTANCE(w4a4_t64_f16, true, int8_t, cutlass::half_t, 64)
#else
OSTQ_SM90_STUB(w4a4_t64_f16)
#endif
